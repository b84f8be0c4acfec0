"""Headless Debian Chromium for the page tests: a fake microphone playing a WAV, ICE kept on loopback."""

from __future__ import annotations

from pathlib import Path

CHROMIUM = "/usr/bin/chromium"


def chromium_args(wav: Path) -> list[str]:
    """Flags for a headless run whose microphone plays `wav` (in a loop) and whose ICE stays on 127.0.0.1."""
    return [
        "--headless",
        "--no-sandbox",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--allow-loopback-in-peer-connection",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]


def loopback_candidates_only(sdp: str) -> str:
    lines = sdp.split("\r\n")
    kept = [line for line in lines if not line.startswith("a=candidate:") or line.split()[4] == "127.0.0.1"]
    assert any(line.startswith("a=candidate:") for line in kept), "Chromium offered no 127.0.0.1 candidate"
    return "\r\n".join(kept)


async def strip_candidates(route) -> None:  # type: ignore[no-untyped-def]
    """Playwright route for the WHIP POST: the offer keeps only its 127.0.0.1 candidates."""
    request = route.request
    if request.method == "POST" and request.post_data:
        await route.continue_(post_data=loopback_candidates_only(request.post_data))
    else:
        await route.continue_()
