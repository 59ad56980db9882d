"""Fixtures of the web console tests: a real `realm-service serve` process
with `--web-listen`, real `index-worker` processes (tests/e2e's `System`),
and headless Chromium from Debian's packages driven by Playwright with that
system browser (no browser is downloaded).

Screenshots of every page go to test-artifacts/web/ (WEB_ARTIFACTS
overrides it); CI keeps that folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from tests.e2e.conftest import Server, System

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("WEB_ARTIFACTS", ROOT / "test-artifacts" / "web"))
CHROMIUM = os.environ.get("WEB_CHROMIUM", "/usr/bin/chromium")
# As the machine notes ask: no sandbox as root, and no background traffic.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 60_000  # bounds a hung wait; nothing asserts speed
TOKENS = {"admin": "admin-token-0123456789", "client": "client-token-0123456789",
          "worker": "worker-token-0123456789"}  # fmt: skip
expect.set_options(timeout=WAIT_MS)


def _chromium() -> str:
    found = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if found:
        return found
    message = f"no Chromium at {CHROMIUM}: apt-get install chromium chromium-driver"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def browser() -> Iterator[Browser]:
    """A browser per test: Playwright's sync API keeps an event loop running
    in its thread while it is open, and other tests sharing the process
    (pytest-xdist) call asyncio.run."""
    executable = _chromium()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(WAIT_MS)
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'realm.db'}"


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    started = System(log_dir)
    try:
        yield started
    finally:
        started.cleanup(failed=False)


@dataclass
class Console:
    server: Server
    url: str  # ends without a slash: url + "/jobs"


def start_console(system: System, store_url: str, *flags: str) -> Console:
    server = system.start_server(store_url, "--web-listen", "127.0.0.1:0", *flags)
    match = server.proc.wait_for_stdout(r"web console on (http://127\.0\.0\.1:\d+)/\n")
    return Console(server, match.group(1))


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
