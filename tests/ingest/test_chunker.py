"""The chunker: fixed-size chunks numbered from 1, a whole-sample tail, one end marker."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ingest.chunker import Chunker
from rawwave.contract import AudioChunk, AudioEnd


def test_chunks_are_chunk_ms_long_and_numbered_from_one() -> None:
    chunker = Chunker(chunk_samples=3200)  # 200 ms
    chunks = chunker.feed(b"\x01\x00" * 8000)  # 500 ms
    assert [c.seq for c in chunks] == [1, 2]
    assert all(len(c.pcm) == 6400 for c in chunks)
    tail = chunker.finish("client_stop", "bye")
    assert isinstance(tail[0], AudioChunk) and tail[0].seq == 3 and len(tail[0].pcm) == 3200
    assert tail[1] == AudioEnd(seq=4, reason="client_stop", message="bye")
    assert chunker.finish() == []  # exactly one end marker


def test_end_without_tail() -> None:
    chunker = Chunker(chunk_samples=160)
    assert len(chunker.feed(b"\x00" * 320)) == 1
    assert chunker.finish() == [AudioEnd(seq=2)]


@given(st.lists(st.binary(max_size=3000), max_size=20), st.sampled_from([160, 320, 3200]))
def test_any_feeding_preserves_the_audio(pieces: list[bytes], chunk_samples: int) -> None:
    chunker = Chunker(chunk_samples)
    entries = [c for piece in pieces for c in chunker.feed(piece)] + chunker.finish()
    data = b"".join(pieces)
    pcm = b"".join(e.pcm for e in entries if isinstance(e, AudioChunk))
    assert pcm == data[: len(data) // 2 * 2]
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    assert isinstance(entries[-1], AudioEnd)
