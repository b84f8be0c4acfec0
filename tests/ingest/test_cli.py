"""`rawwave push`, `transcribe` and `consume` against a real Redis.

A small task stands in for the worker (it publishes events for each announced session); the
worker has its own tests, and the end-to-end test with a real worker lives elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ingest.consume import consume
from ingest.push import push_all
from ingest.transcribe import transcribe
from rawwave import cli
from rawwave.contract import (
    AudioEnd,
    DoneEvent,
    ErrorEvent,
    FinalEvent,
    PartialEvent,
    ResponseDeltaEvent,
    ResponseDoneEvent,
)
from rawwave.errors import RawwaveError
from rawwave.settings import Settings
from rawwave.streams import Streams

from .test_http_api import announced, read_all_audio


async def fake_worker(streams: Streams, fail: bool = False) -> None:
    """For each new session: wait for its end marker, then publish a transcript (or an error)."""
    positions: dict[int, str] = {0: "0"}
    answering: set[asyncio.Task[None]] = set()
    try:
        while True:
            for _, _, announce in await streams.follow_announcements(positions, block_ms=100):
                answering.add(asyncio.create_task(_answer(streams, announce.session, announce.respond, fail)))
    finally:
        for task in answering:
            task.cancel()


async def _answer(streams: Streams, session: str, respond: bool, fail: bool) -> None:
    await read_all_audio(streams, session)
    events = [PartialEvent(session=session, seq=1, t_ms=200, text="the", stable="", revision=0)]
    if fail:
        events.append(ErrorEvent(session=session, seq=2, t_ms=0, code="inference_failed", message="boom"))
    else:
        events.append(FinalEvent(session=session, seq=2, t_ms=2700, text="the quick brown fox"))
    if respond and not fail:
        events += [
            ResponseDeltaEvent(session=session, seq=3, t_ms=2700, text="Quick "),
            ResponseDeltaEvent(session=session, seq=4, t_ms=2700, text="fox."),
            ResponseDoneEvent(session=session, seq=5, t_ms=2700, text="Quick fox."),
        ]
    events.append(DoneEvent(session=session, seq=len(events) + 1, t_ms=2700))
    for event in events:
        await streams.publish(event)


@pytest.fixture
async def worker(streams: Streams) -> AsyncIterator[None]:
    task = asyncio.create_task(fake_worker(streams))
    yield
    task.cancel()


def _args(file: Path, **flags: object) -> argparse.Namespace:
    defaults = {"file": str(file), "respond": False, "json": False, "realtime": False, "timeout": 20.0}
    return argparse.Namespace(**(defaults | flags))


async def test_push_prints_each_session_and_writes_its_audio(
    settings: Settings, streams: Streams, audio_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await push_all(settings, [str(audio_dir / "s.mp3"), str(audio_dir / "s.flac")], respond=True) == 0
    sessions = capsys.readouterr().out.split()
    assert len(sessions) == 2 and [a.session for a in await announced(streams)] == sessions
    for session in sessions:
        entries = await read_all_audio(streams, session)
        assert isinstance(entries[-1], AudioEnd) and entries[-1].reason == "end"


async def test_push_prints_the_id_before_the_audio_is_all_pushed(
    settings: Settings, streams: Streams, speech_wav: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = asyncio.create_task(push_all(settings, [str(speech_wav)], realtime=True))
    await asyncio.sleep(0.8)
    session = capsys.readouterr().out.strip()
    assert session and not await _ended(streams, session)  # printed, audio still arriving (real time)
    await task
    assert await _ended(streams, session)


async def _ended(streams: Streams, session: str) -> bool:
    entries = await streams.read_audio(session, 0, count=10_000)
    return bool(entries) and isinstance(entries[-1], AudioEnd)


async def test_push_reports_bad_files_and_creates_no_session(
    settings: Settings, streams: Streams, tmp_path: Path, speech_wav: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    with pytest.raises(RawwaveError, match="1 of 2 files"):
        await push_all(settings, [str(bad), str(speech_wav)])
    captured = capsys.readouterr()
    assert "bad.wav: not a readable audio file" in captured.err
    assert [a.session for a in await announced(streams)] == captured.out.split()  # only the good one


def test_cli_one_line_error_and_exit_code(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty.wav").write_bytes(b"")
    assert cli.main(["push", str(tmp_path / "empty.wav")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rawwave: empty.wav: empty file")


async def test_transcribe_prints_the_transcript_and_response(
    settings: Settings, worker: None, speech_wav: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await transcribe(settings, _args(speech_wav, respond=True)) == 0
    assert capsys.readouterr().out == "the quick brown fox\nQuick fox.\n"


async def test_transcribe_json_prints_every_event(
    settings: Settings, worker: None, speech_wav: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await transcribe(settings, _args(speech_wav, json=True)) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["type"] for e in lines] == ["partial", "final", "done"]
    assert [e["seq"] for e in lines] == [1, 2, 3]


async def test_transcribe_fails_when_the_session_ends_in_error(
    settings: Settings, streams: Streams, speech_wav: Path
) -> None:
    task = asyncio.create_task(fake_worker(streams, fail=True))
    try:
        with pytest.raises(RawwaveError, match="ended in error: inference_failed: boom"):
            await transcribe(settings, _args(speech_wav))
    finally:
        task.cancel()


async def test_consume_named_sessions_resumes_and_never_repeats(
    settings: Settings, streams: Streams, worker: None, speech_wav: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await push_all(settings, [str(speech_wav), str(speech_wav)])
    sessions = capsys.readouterr().out.split()
    await asyncio.wait_for(consume(settings, sessions + sessions[:1]), 20)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for session in sessions:
        assert [e["seq"] for e in lines if e["session"] == session] == [1, 2, 3]
    await asyncio.wait_for(consume(settings, sessions[:1], after=1), 5)
    assert [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()] == [2, 3]


async def test_consume_all_follows_new_sessions(
    settings: Settings, streams: Streams, worker: None, speech_wav: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    follower = asyncio.create_task(consume(settings, [], follow_all=True))
    await asyncio.sleep(0.3)
    await push_all(settings, [str(speech_wav)])
    out = capsys.readouterr().out  # the pushed id, maybe already some events
    session = out.splitlines()[0]
    async with asyncio.timeout(15):
        while '"type":"done"' not in out:
            await asyncio.sleep(0.1)
            out += capsys.readouterr().out
    follower.cancel()
    lines = [json.loads(line) for line in out.splitlines()[1:]]
    assert {e["session"] for e in lines} == {session} and [e["seq"] for e in lines] == [1, 2, 3]
