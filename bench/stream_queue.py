"""`queue`: the stream contract alone — chunks/s through announce + claim + append + read + finish.

For 1..64 concurrent sessions, producers append 200 ms chunks (6400 bytes) with `Streams.append_audio`
(XADD with an explicit id + EXPIRE), the owning consumer takes each session through the workers'
group (XREADGROUP), reads its audio (XREAD) and finishes it (XACK + EXPIRE). Beside it, on the same
server in the same run: `redis-benchmark` for a plain XADD of the same payload, so the ratio shows
what the contract costs over raw Redis.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.report import median, write_result
from rawwave.contract import AudioChunk, AudioEnd, SessionAnnounce, new_session_id
from rawwave.local_stack import free_port, redis_server_command, wait_for_port
from rawwave.settings import load_settings
from rawwave.streams import Claim, Streams

CHUNK_BYTES = 6400  # 200 ms of 16 kHz s16le
SESSION_COUNTS = (1, 2, 4, 8, 16, 32, 64)
REPEATS = 3


def main(quick: bool = False) -> int:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is needed"
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = subprocess.Popen(redis_server_command(binary, port, Path(tmp)), stdout=subprocess.DEVNULL)
        try:
            wait_for_port(port)
            chunks_total = 400 if quick else 4000
            counts = SESSION_COUNTS[:3] if quick else SESSION_COUNTS
            runs = {n: [asyncio.run(_measure(port, n, chunks_total)) for _ in range(REPEATS)] for n in counts}
            plain = _redis_benchmark_xadd(port, 2000 if quick else 50000)
        finally:
            server.terminate()
            server.wait()
    rows = {str(n): {"chunks_per_s": samples, "median": median(samples)} for n, samples in runs.items()}
    best = max(rows.values(), key=lambda row: row["median"])["median"]
    write_result(
        "queue",
        {
            "quick": quick,
            "settings": {"chunk_bytes": CHUNK_BYTES, "chunks_per_run": chunks_total, "repeats": REPEATS},
            "sessions": rows,
            "redis_benchmark_xadd_per_s": plain,
            "ratio_best_to_plain_xadd": best / plain,
            "headline": f"{best:,.0f} chunks/s through the full contract (best of 1..{counts[-1]} sessions) "
            f"= {best / plain:.2f}x plain XADD ({plain:,.0f}/s); "
            f"{best * 0.2:,.0f} s of audio per s",
        },
    )
    return 0


async def _measure(port: int, sessions: int, chunks_total: int) -> float:
    settings = load_settings(redis_url=f"redis://127.0.0.1:{port}/0")
    streams = Streams.connect(settings)
    await streams.redis.flushall()
    await streams.ensure_groups()
    per_session = max(1, chunks_total // sessions)
    pcm = bytes(CHUNK_BYTES)
    started = time.perf_counter()
    producers = [_produce(streams, pcm, per_session) for _ in range(sessions)]
    await asyncio.gather(_own_all(streams, sessions, per_session), *producers)
    elapsed = time.perf_counter() - started
    assert await streams.pending_count() == 0
    await streams.close()
    return sessions * per_session / elapsed


async def _produce(streams: Streams, pcm: bytes, chunks: int) -> None:
    session = new_session_id()
    await streams.announce(SessionAnnounce(session=session, source="file", created_ms=0))
    for seq in range(1, chunks + 1):
        await streams.append_audio(session, AudioChunk(seq=seq, pcm=pcm))
    await streams.append_audio(session, AudioEnd(seq=chunks + 1))


async def _own_all(streams: Streams, sessions: int, chunks: int) -> None:
    """One consumer, as a worker would be: claim every session, then read each to its end marker."""
    readers: list[asyncio.Task[None]] = []
    while len(readers) < sessions:
        for claim in await streams.claim_new("bench-worker", count=sessions, block_ms=50):
            readers.append(asyncio.create_task(_read_to_end(streams, claim, chunks)))
    await asyncio.gather(*readers)


async def _read_to_end(streams: Streams, claim: Claim, chunks: int) -> None:
    after, received = 0, 0
    while True:
        for entry in await streams.read_audio(claim.session, after, count=64, block_ms=1000):
            after = entry.seq
            if isinstance(entry, AudioEnd):
                assert received == chunks
                await streams.finish(claim)
                return
            received += 1


def _redis_benchmark_xadd(port: int, requests: int) -> float:
    payload = "x" * CHUNK_BYTES
    command = ["redis-benchmark", "-p", str(port), "-n", str(requests), "-c", "16", "-q"]
    out = subprocess.run(
        [*command, "XADD", "bench:plain", "*", "pcm", payload], capture_output=True, text=True
    )
    match = re.search(r"([\d.]+) requests per second", out.stdout + out.stderr)
    assert match, out.stdout + out.stderr
    return float(match.group(1))
