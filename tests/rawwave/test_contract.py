import contextlib
import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rawwave import contract
from rawwave.contract import (
    AudioChunk,
    AudioEnd,
    ContractError,
    DoneEvent,
    ErrorEvent,
    FinalEvent,
    PartialEvent,
    ResponseDeltaEvent,
    ResponseDoneEvent,
    SessionAnnounce,
)

session_ids = st.from_regex(contract.SESSION_ID_PATTERN, fullmatch=True)
texts = st.text(max_size=200)
seqs = st.integers(min_value=1, max_value=2**40)
times = st.integers(min_value=0, max_value=2**40)


@st.composite
def partials(draw: st.DrawFn) -> PartialEvent:
    stable, tail = draw(texts), draw(texts)
    return PartialEvent(
        session=draw(session_ids), seq=draw(seqs), t_ms=draw(times), text=stable + tail, stable=stable,
        revision=draw(st.integers(0, 10**6)),
    )  # fmt: skip


def _simple(cls: type, **extra: st.SearchStrategy) -> st.SearchStrategy:
    return st.builds(cls, session=session_ids, seq=seqs, t_ms=times, **extra)


events = st.one_of(
    partials(),
    _simple(FinalEvent, text=texts),
    _simple(ResponseDeltaEvent, text=texts),
    _simple(ResponseDoneEvent, text=texts),
    _simple(ErrorEvent, code=st.sampled_from(["bad_audio", "inference_failed", "lost"]), message=texts),
    _simple(DoneEvent),
)
audio_entries = st.one_of(
    st.builds(AudioChunk, seq=seqs, pcm=st.binary(max_size=4000).map(lambda b: b[: len(b) // 2 * 2])),
    st.builds(AudioEnd, seq=seqs, reason=st.sampled_from(["end", "client_stop", "error"]), message=texts),
)


@given(events)
def test_event_round_trips_through_stream_fields(event: contract.Event) -> None:
    assert contract.decode_event(contract.encode_event(event)) == event
    assert contract.event_from_json(contract.event_to_json(event)) == event


@given(audio_entries)
def test_audio_round_trips_as_raw_bytes(entry: contract.AudioEntry) -> None:
    fields = contract.encode_audio(entry)
    if isinstance(entry, AudioChunk):
        assert fields[b"pcm"] is entry.pcm  # raw bytes, never re-encoded
    assert contract.decode_audio(fields) == entry


@given(session_ids, st.booleans(), times)
def test_announce_round_trips(session: str, respond: bool, created: int) -> None:
    message = SessionAnnounce(session=session, source="file", respond=respond, created_ms=created)
    assert contract.decode_announce(contract.encode_announce(message)) == message


@given(st.dictionaries(st.binary(max_size=8), st.binary(max_size=64), max_size=5))
def test_malformed_entries_give_a_typed_error(fields: dict[bytes, bytes]) -> None:
    for decode in (contract.decode_event, contract.decode_audio, contract.decode_announce):
        with contextlib.suppress(ContractError):
            decode(fields)


@pytest.mark.parametrize(
    "fields",
    [
        {b"v": b"2", b"event": b"{}"},
        {b"v": b"1"},
        {b"v": b"1", b"event": b"not json"},
        {
            b"v": b"1",
            b"event": b'{"type":"partial","session":"a","seq":1,"t_ms":0,"text":"ab","stable":"x",'
            b'"revision":0}',
        },
        {b"v": b"1", b"event": b'{"type":"final","session":"a b","seq":1,"t_ms":0,"text":""}'},
    ],
)
def test_bad_events_are_rejected_with_reason(fields: dict[bytes, bytes]) -> None:
    with pytest.raises(ContractError):
        contract.decode_event(fields)


def test_odd_pcm_is_rejected() -> None:
    with pytest.raises(ContractError, match="whole number"):
        contract.decode_audio({b"v": b"1", b"kind": b"chunk", b"seq": b"1", b"pcm": b"abc"})


def test_session_keys_share_one_cluster_slot() -> None:
    keys = contract.session_keys("abc123")
    assert all("{abc123}" in key for key in keys)


def test_partition_is_stable_across_processes() -> None:
    code = "from rawwave.contract import partition_of; print(partition_of('session-42', 7))"
    seen = {
        subprocess.run([sys.executable, "-c", code], env=os.environ | {"PYTHONHASHSEED": seed},
                       capture_output=True, text=True, check=True).stdout.strip()
        for seed in ("1", "2", "3")
    }  # fmt: skip
    assert seen == {str(contract.partition_of("session-42", 7))}
    assert {contract.partition_of(contract.new_session_id(), 4) for _ in range(200)} == {0, 1, 2, 3}
