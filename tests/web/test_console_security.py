"""The console's security: the gRPC API's tokens and roles, no actions for
the client role, cross-site and forged POSTs refused, user strings escaped."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from playwright.sync_api import BrowserContext, Page, expect
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from tests.e2e.conftest import System
from tests.e2e.helpers import RPC_TIMEOUT, create_realm, wait_job
from tests.web.conftest import TOKENS, Console, screenshot, start_console

TOKEN_FLAGS = ("--tokens", ",".join(f"{role}:{token}" for role, token in TOKENS.items()))


def sign_in(page: Page, console: Console, role: str) -> None:
    page.goto(console.url + "/")
    expect(page).to_have_url(console.url + "/login")
    page.fill("#token", TOKENS[role])
    page.click("#sign-in")
    expect(page.locator("#role")).to_have_text(role)


def forged_post(page: Page, path: str, body: str) -> int:
    """A POST sent by the page's own script, as a forger with the cookie would."""
    status: int = page.evaluate(
        """async ([path, body]) => (await fetch(path, {method: "POST", body: body,
             headers: {"Content-Type": "application/x-www-form-urlencoded"}})).status""",
        [path, body],
    )
    return status


@contextmanager
def attacker_site(target: str) -> Iterator[str]:
    """Another origin on loopback whose page posts a cancel to `target` at once."""
    page = f"""<!doctype html><form id=f method=post action="{target}">
<input name=reason value=forged></form><script>document.getElementById('f').submit()</script>"""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = page.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_client_role_sees_no_actions_and_forged_posts_are_refused(
    system: System, store_url: str, context: BrowserContext
) -> None:
    console = start_console(system, store_url, *TOKEN_FLAGS)
    stub = console.server.stub()
    metadata = (("authorization", f"Bearer {TOKENS['admin']}"),)
    request = spb.CreateRealmRequest(realm_id="watched", display_name="Watched")
    created = stub.CreateRealm(request, timeout=RPC_TIMEOUT, metadata=metadata)  # no worker
    job_id = created.job.job_id

    page = context.new_page()
    page.goto(console.url + "/login")
    page.fill("#token", "not-a-token")
    page.click("#sign-in")
    expect(page.locator("#problem")).to_have_text("unknown token")
    page.fill("#token", TOKENS["worker"])
    page.click("#sign-in")
    expect(page.locator("#problem")).to_contain_text("not a client or admin token")
    screenshot(page, "login")

    sign_in(page, console, "client")
    page.goto(f"{console.url}/jobs/{job_id}")
    expect(page.locator("#job-state")).to_have_text("QUEUED")
    expect(page.locator("#summary")).to_contain_text("no worker")
    expect(page.locator("#actions")).to_have_count(0)
    expect(page.locator("button")).to_have_text(["Sign out"])
    page.goto(console.url + "/realms/watched")
    expect(page.locator("#actions")).to_have_count(0)
    # The client's cookie is good, the role is not: refused whatever is sent.
    assert forged_post(page, f"/jobs/{job_id}/cancel", "csrf=guess") == 403
    assert forged_post(page, "/realms/watched/delete", "csrf=guess&confirm=watched") == 403
    page.click("text=Sign out")
    expect(page).to_have_url(console.url + "/login")
    page.goto(f"{console.url}/jobs/{job_id}")
    expect(page).to_have_url(console.url + "/login")

    # An admin's session without the form's CSRF token: refused too.
    sign_in(page, console, "admin")
    page.goto(f"{console.url}/jobs/{job_id}")
    expect(page.locator("#cancel")).to_have_count(1)
    assert forged_post(page, f"/jobs/{job_id}/cancel", "reason=x") == 403
    assert forged_post(page, f"/jobs/{job_id}/cancel", "reason=x&csrf=wrong") == 403

    # Another site (another port on loopback) posting with the admin's cookie.
    with attacker_site(f"{console.url}/jobs/{job_id}/cancel") as evil:
        attacker = context.new_page()
        with attacker.expect_response(f"{console.url}/jobs/{job_id}/cancel") as answer:
            attacker.goto(evil)
        assert answer.value.status == 403
        expect(attacker.locator("#problem")).to_have_text("cross-site request refused")

    job = stub.GetJob(spb.GetJobRequest(job_id=job_id), timeout=RPC_TIMEOUT, metadata=metadata)
    assert job.job.state == pb.Job.STATE_QUEUED
    page.reload()
    expect(page.locator("#job-state")).to_have_text("QUEUED")
    # The token never shows in a URL or the server's log.
    logs = console.server.proc.stdout() + console.server.proc.stderr()
    assert all(token not in logs for token in TOKENS.values())
    assert "web console sign-in" in logs


def test_a_realm_name_with_script_is_shown_as_text(
    system: System, store_url: str, page: Page
) -> None:
    console = start_console(system, store_url)
    stub = console.server.stub()
    system.start_worker(console.server, "w1")
    name = '<script>window.__pwned = 1</script><b id="bold">bold</b> & "quotes"'
    created = create_realm(stub, "scripted", {"a.json": b"{}"}, display_name=name)
    assert wait_job(stub, created.job.job_id).state == pb.Job.STATE_SUCCEEDED

    for path in ("/realms", "/realms/scripted"):
        page.goto(console.url + path)
        expect(page.locator("main")).to_contain_text(name)
        assert page.evaluate("window.__pwned") is None
        expect(page.locator("#bold")).to_have_count(0)
    expect(page.locator("#realm-name")).to_have_text(name)
    screenshot(page, "realm-escaped")
    # A search text and a filter come back as text too.
    page.goto(console.url + "/realms/scripted?text=%3Cscript%3Ewindow.__pwned%3D2%3C%2Fscript%3E")
    expect(page.locator("#search input[name=text]")).to_have_value(
        "<script>window.__pwned=2</script>"
    )
    assert page.evaluate("window.__pwned") is None
    page.goto(console.url + "/jobs?realm=%3Cimg%20src%3Dx%20onerror%3D__pwned%3D3%3E")
    expect(page.locator("input[name=realm]")).to_have_value("<img src=x onerror=__pwned=3>")
    assert page.evaluate("window.__pwned") is None
