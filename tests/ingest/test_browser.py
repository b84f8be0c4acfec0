"""The page in headless Chromium: click start, the fake mic's audio reaches Redis, events show up.

Loopback only: the offer reaching the server keeps only Chromium's 127.0.0.1 candidates, and the
server's ICE sockets ignore datagrams from any other source, so no packet is ever addressed to
one of this machine's other addresses.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aioice.ice
import pytest

from rawwave.contract import FinalEvent, PartialEvent, ResponseDeltaEvent
from rawwave.streams import Streams
from tests.browser import CHROMIUM, chromium_args, strip_candidates

from .conftest import REPO_ROOT, Server
from .test_http_api import announced
from .test_webrtc import audio_seconds, wait_until

ARTIFACTS = REPO_ROOT / "tests" / "artifacts"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")


@pytest.fixture
def loopback_only_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    original = aioice.ice.StunProtocol.datagram_received

    def datagram_received(self, data, addr):  # type: ignore[no-untyped-def]
        if addr[0] == "127.0.0.1":
            original(self, data, addr)

    monkeypatch.setattr(aioice.ice.StunProtocol, "datagram_received", datagram_received)


async def test_page_streams_the_mic_and_shows_events(
    server: Server, streams: Streams, speech_wav: Path, loopback_only_ice: None
) -> None:
    from playwright.async_api import async_playwright

    args = chromium_args(speech_wav)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = await browser.new_page(viewport={"width": 900, "height": 640})
            await page.route("**/whip*", strip_candidates)
            await page.goto(server.url)
            await page.get_by_test_id("start").click()
            await wait_until(lambda: _one_session(streams), timeout=15)
            [announce] = await announced(streams)
            session = announce.session
            await wait_until(lambda: _has_audio(streams, session), timeout=15)
            await _publish_conversation(streams, session)
            transcript = page.get_by_test_id("transcript")
            await page.wait_for_function(
                "document.querySelector('[data-testid=transcript]').textContent.includes('the quick brown')",
                timeout=10_000,
            )
            assert "the quick brown fox" in await transcript.text_content()
            assert await page.get_by_test_id("status").text_content() == "live"
            await page.wait_for_function(
                "document.querySelector('[data-testid=response]').textContent.includes('lazy dog')",
                timeout=5000,
            )
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            # text published by a stand-in, not a model: docs/screenshot.png comes from tests/e2e instead
            await page.screenshot(path=str(ARTIFACTS / "browser.png"))
            await page.get_by_test_id("stop").click()
            await wait_until(lambda: _ended(streams, session), timeout=10)
        finally:
            await browser.close()


async def _one_session(streams: Streams) -> bool:
    return len(await announced(streams)) == 1


async def _has_audio(streams: Streams, session: str) -> bool:
    return await audio_seconds(streams, session) >= 0.6


async def _ended(streams: Streams, session: str) -> bool:
    entries = await streams.read_audio(session, 0, count=10_000)
    return bool(entries) and entries[-1].__class__.__name__ == "AudioEnd"


async def _publish_conversation(streams: Streams, session: str) -> None:
    """What a worker would send: partials settling into a final, then a streamed response."""
    events = [
        PartialEvent(session=session, seq=1, t_ms=400, text="the quick", stable="the", revision=0),
        FinalEvent(session=session, seq=2, t_ms=2700, text="the quick brown fox jumps over the lazy dog"),
        PartialEvent(
            session=session, seq=3, t_ms=3100, text="and then it ran", stable="and then", revision=0
        ),
        ResponseDeltaEvent(session=session, seq=4, t_ms=2700, text="A classic pangram: "),
        ResponseDeltaEvent(session=session, seq=5, t_ms=2700, text="every letter, one lazy dog."),
    ]
    for event in events:
        await streams.publish(event)
        await asyncio.sleep(0.05)
