"""An HTTP client of a running `rawwave ingest`: upload a clip, follow its events over SSE (resuming
with Last-Event-ID when the stream breaks), and keep the books of what it got."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from rawwave.contract import Event, event_from_json
from tests.faults.books import CLIPS
from tests.models import wav_bytes


@dataclass
class Upload:
    clip: int
    status: int = 0  # of the accepted (or last) POST
    retry_after: str | None = None
    session: str = ""
    events: list[Event] = field(default_factory=list)
    attempts: int = 0
    sse_reconnects: int = 0
    done_at: float | None = None


async def upload(url: str, clip: int, retries: int = 0, follow_s: float = 60.0) -> Upload:
    """POST the clip; on 503 honour Retry-After up to `retries` times; follow the events if accepted."""
    result = Upload(clip)
    body = wav_bytes(np.frombuffer(CLIPS[clip], np.int16))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)) as http:
        while result.attempts <= retries:
            result.attempts += 1
            try:
                async with http.post(f"{url}/v1/sessions", data=body) as r:
                    result.status, result.retry_after = r.status, r.headers.get("Retry-After")
                    if r.status == 201:
                        result.session = (await r.json())["session"]
                        break
            except aiohttp.ClientError:
                result.status = -1  # connection refused or reset: the server is gone
            await asyncio.sleep(float(result.retry_after or 0.5) if result.attempts <= retries else 0)
        if result.session:
            await _follow(http, url, result, time.monotonic() + follow_s)
    return result


async def _follow(http: aiohttp.ClientSession, url: str, result: Upload, deadline: float) -> None:
    while time.monotonic() < deadline:
        last = result.events[-1].seq if result.events else 0
        headers = {"Last-Event-ID": str(last)} if last else {}
        try:
            async with http.get(f"{url}/v1/sessions/{result.session}/events", headers=headers) as r:
                async for line in r.content:
                    if line.startswith(b"data: "):
                        event = event_from_json(line[6:].strip())
                        result.events.append(event)
                        if event.type == "done":
                            result.done_at = time.monotonic()
                            return
        except (TimeoutError, aiohttp.ClientError):
            pass
        result.sse_reconnects += 1
        await asyncio.sleep(0.3)
