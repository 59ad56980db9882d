"""The web console end to end: a real server and real workers, looked at
and operated through headless Chromium."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect
from realm.v1 import realm_service_pb2 as spb
from realm.v1 import resources_pb2 as pb

from tests.e2e.conftest import System
from tests.e2e.helpers import RPC_TIMEOUT, bulk_cards, create_realm, get_job, poll, wait_job
from tests.web.conftest import screenshot, start_console

SLOW = ("--concurrency", "1", "--batch-size", "5")


def test_overview_shows_a_queued_job_then_the_worker_drains_it(
    system: System, store_url: str, page: Page
) -> None:
    console = start_console(system, store_url)
    stub = console.server.stub()
    # A small reindex storm at SYSTEM priority, then a user's realm.
    storm = [create_realm(stub, f"storm-{i}", bulk_cards(20), priority=0) for i in range(4)]
    created = create_realm(stub, "notes", bulk_cards(30), display_name="Team notes")
    assert created.job.state == pb.Job.STATE_QUEUED

    page.goto(console.url + "/")
    # No worker yet: the jobs wait, and the overview says so.
    expect(page.locator("#queued-total")).to_have_text("5")
    expect(page.locator("#depth")).to_contain_text("from-scratch")
    expect(page.locator("#oldest tbody tr")).to_have_count(2)  # priorities 10 and 0
    expect(page.locator("#workers")).to_contain_text("no worker connected")
    expect(page.locator("#health")).to_contain_text("SERVING")
    expect(page.locator("#chart polyline")).to_have_count(2)

    system.start_worker(console.server, "w1", *SLOW, "--files-per-second", "15")
    # Pushed, not reloaded: the page follows the worker taking the user's
    # job first, then draining the storm.
    expect(page.locator("#workers")).to_contain_text("w1")
    assert wait_job(stub, created.job.job_id).state == pb.Job.STATE_SUCCEEDED
    expect(page.locator("#finished")).to_contain_text("succeeded")
    queued = int(page.inner_text("#queued-total"))
    assert 0 < queued < 5
    screenshot(page, "overview")
    expect(page.locator("#queued-total")).to_have_text("0")
    for job in storm:
        assert wait_job(stub, job.job.job_id).state == pb.Job.STATE_SUCCEEDED
    expect(page.locator("#running-total")).to_have_text("0")

    page.goto(console.url + "/workers")
    expect(page.locator("#workers")).to_contain_text("w1")
    expect(page.locator("#workers")).to_contain_text("all kinds")
    screenshot(page, "workers")

    page.goto(console.url + "/jobs?state=succeeded")
    expect(page.locator("table.jobs")).to_contain_text("notes")
    page.goto(console.url + "/jobs?state=queued")
    expect(page.locator("table.jobs")).to_contain_text("no jobs")
    page.goto(console.url + "/jobs")
    screenshot(page, "jobs")


def test_job_page_shows_progress_moving_then_succeeded(
    system: System, store_url: str, page: Page
) -> None:
    console = start_console(system, store_url)
    stub = console.server.stub()
    system.start_worker(console.server, "w1", *SLOW, "--files-per-second", "25")
    created = create_realm(stub, "moving", bulk_cards(150))
    job_id = created.job.job_id

    page.goto(f"{console.url}/jobs/{job_id}")
    seen: set[int] = set()
    total = 0

    def moved() -> bool:
        nonlocal total
        progress = page.locator("#progress")
        done = int(progress.get_attribute("data-done") or 0)
        total = int(progress.get_attribute("data-total") or 0)
        if 0 < done < total:
            seen.add(done)
        return len(seen) >= 2

    poll(moved, what="the page to show progress moving", interval=0.2)
    screenshot(page, "job-running")
    assert total >= 150  # the cards, and the files every realm starts with
    expect(page.locator("#job-state")).to_have_text("SUCCEEDED")
    expect(page.locator("#progress")).to_have_attribute("data-done", str(total))
    expect(page.locator("#attempts")).to_contain_text("completed")
    expect(page.locator("#attempts")).to_contain_text("worker w1")
    # A finished job's page stops following it.
    expect(page.locator("#live")).to_have_attribute("data-ended", "true")
    screenshot(page, "job")


def test_cancel_from_the_page_stops_a_running_job(
    system: System, store_url: str, page: Page
) -> None:
    console = start_console(system, store_url)
    stub = console.server.stub()
    worker = system.start_worker(console.server, "w1", *SLOW, "--files-per-second", "5")
    created = create_realm(stub, "stopme", bulk_cards(200))
    job_id = created.job.job_id

    page.goto(f"{console.url}/jobs/{job_id}")
    expect(page.locator("#job-state")).to_have_text("RUNNING")
    expect(page.locator("#running")).to_contain_text("w1")
    page.fill("input[name=reason]", "stopped from the console <test>")
    page.click("#cancel")

    expect(page.locator("#notice")).to_have_text("Cancelled.")
    expect(page.locator("#job-state")).to_have_text("CANCELLED")
    expect(page.locator("#attempts")).to_contain_text("cancelled")
    expect(page.locator("#cancel")).to_have_count(0)
    expect(page.locator("#retry")).to_have_count(1)
    job = get_job(stub, job_id)
    assert job.state == pb.Job.STATE_CANCELLED
    assert "stopped from the console <test>" in job.error_message
    screenshot(page, "job-cancelled")
    # The worker let go of it (its lease was revoked) and is still serving.
    expect(page.locator("#summary")).to_contain_text("cancelled")
    page.goto(console.url + "/workers")
    expect(page.locator("#workers td").nth(7)).to_have_text("0")
    assert worker.alive()

    # Retry from the page queues its work again, and the worker takes it.
    page.goto(f"{console.url}/jobs/{job_id}")
    page.click("#retry")
    expect(page.locator("#notice")).to_have_text("Queued again.")
    retried = re.search(r"/jobs/(\d+)", page.url)
    assert retried is not None and retried.group(1) != job_id


def test_realm_page_search_reindex_and_delete(system: System, store_url: str, page: Page) -> None:
    console = start_console(system, store_url)
    stub = console.server.stub()
    system.start_worker(console.server, "w1")
    files = {**bulk_cards(5), "broken.json": b"{ not json"}
    created = create_realm(stub, "cards", files, display_name="Card box")
    assert wait_job(stub, created.job.job_id).state == pb.Job.STATE_SUCCEEDED

    page.goto(console.url + "/realms")
    page.click("#realms a:text-is('cards')")
    expect(page.locator("#realm-name")).to_have_text("Card box")
    expect(page.locator("#errors")).to_contain_text("broken.json")
    page.fill("#search input[name=text]", "person 00003")
    page.click("#search button")
    expect(page.locator("#hits")).to_contain_text("cards/card-00003.json")
    expect(page.locator("#hits tbody tr")).to_have_count(1)
    screenshot(page, "realm")

    page.click("#reindex")
    expect(page.locator("#notice")).to_have_text("A reindex is queued.")
    jobs = stub.ListJobs(spb.ListJobsRequest(realm_id="cards"), timeout=RPC_TIMEOUT).jobs
    assert len(jobs) == 2

    # Deleting asks for the realm's id; a wrong one deletes nothing.
    page.on("dialog", lambda dialog: dialog.accept())
    page.fill("#confirm", "other")
    page.click("#delete")
    expect(page.locator("#problem")).to_contain_text("type its id")
    stub.GetRealm(spb.GetRealmRequest(realm_id="cards"), timeout=RPC_TIMEOUT)
    page.go_back()
    page.fill("#confirm", "cards")
    page.click("#delete")
    expect(page.locator("#notice")).to_contain_text("file(s) deleted")
    page.goto(console.url + "/realms/cards")
    expect(page.locator("#problem")).to_contain_text("cards")
    page.goto(console.url + "/realms")
    screenshot(page, "realms")
