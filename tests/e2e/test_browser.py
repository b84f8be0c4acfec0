"""The web page in headless Chromium, its fake mic playing the sentence, against the REAL worker: the
transcript shows the model's own final. The screenshot (tests/artifacts/, docs/screenshot.png) is of
that real output.

Loopback only: the page talks to a `rawwave ingest` on the stack's Redis whose ICE drops datagrams
from anywhere but 127.0.0.1 (tests/e2e/loopback_ingest.py), and the offer it receives keeps only
Chromium's 127.0.0.1 candidates.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rawwave.local_stack import free_port, wait_for_port
from tests.browser import CHROMIUM, chromium_args, strip_candidates
from tests.models import ARTIFACTS, REPO

from .conftest import Stack, clean_env

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium"),
]
SCREENSHOT = ARTIFACTS / "e2e-browser.png"


@pytest.fixture
def loopback_ingest(stack: Stack, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = clean_env(
        RAWWAVE_REDIS_URL=stack.redis_url,
        RAWWAVE_HOST="127.0.0.1",
        RAWWAVE_PORT=str(port),
        RAWWAVE_ICE_HOST_ADDRESSES="127.0.0.1",
        RAWWAVE_LOG_FORMAT="json",
    )
    with (tmp_path / "ingest.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.loopback_ingest"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        assert wait_for_port(port, timeout_s=30), (tmp_path / "ingest.log").read_text()
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=20)


async def test_page_shows_the_workers_final(loopback_ingest: str, speech_wav: Path) -> None:
    from playwright.async_api import async_playwright

    args = chromium_args(speech_wav)  # the WAV plays in a loop, pauses included
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = await browser.new_page(viewport={"width": 900, "height": 640})
            await page.route("**/whip*", strip_candidates)
            await page.goto(loopback_ingest)
            await page.get_by_test_id("start").click()
            started = time.monotonic()
            # the first sentence ends in 1.2 s of silence: end-pointing makes the worker write a final
            await page.wait_for_function(
                "[...document.querySelectorAll('[data-testid=transcript] .final')]"
                ".some((p) => p.textContent.trim().length > 0)",
                timeout=60_000,
            )
            print(f"\nfirst final on the page {time.monotonic() - started:.1f} s after start")
            # the mic loops the sentence; the weak model may give one pass an empty final, another words
            texts = await page.locator("[data-testid=transcript] .final").all_text_contents()
            assert any(t.strip() for t in texts), texts
            assert await page.get_by_test_id("status").text_content() == "live"
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(SCREENSHOT))
            if os.environ.get("RAWWAVE_UPDATE_SCREENSHOT"):  # the README's picture; CI never rewrites it
                shutil.copy(SCREENSHOT, REPO / "docs" / "screenshot.png")
            await page.get_by_test_id("stop").click()
            await page.wait_for_function(
                "document.querySelector('[data-testid=status]').textContent === 'done'", timeout=20_000
            )
        finally:
            await browser.close()
