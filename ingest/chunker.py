"""PCM bytes to numbered stream chunks of `chunk_ms`, then the end marker. Pure: no I/O.

Seq numbers start at 1 and run through the end marker, so the audio stream's entry ids are
`0-1 .. 0-N` and a retried append of any of them is a no-op in Redis.
"""

from __future__ import annotations

from rawwave.contract import SAMPLE_RATE, SAMPLE_WIDTH, AudioChunk, AudioEnd, AudioEntry, EndReason


class Chunker:
    """Feed PCM of any length; get whole chunks back; `finish` flushes the tail and ends."""

    def __init__(self, chunk_samples: int) -> None:
        self.chunk_bytes = chunk_samples * SAMPLE_WIDTH  # 6400 bytes for 200 ms at 16 kHz
        self._pending = bytearray()
        self._next_seq = 1
        self.samples = 0  # samples emitted in chunks so far
        self.ended = False

    def feed(self, pcm: bytes) -> list[AudioChunk]:
        if self.ended:
            raise RuntimeError("chunker already finished")
        self._pending += pcm
        chunks = []
        while len(self._pending) >= self.chunk_bytes:
            chunks.append(self._chunk(bytes(self._pending[: self.chunk_bytes])))
            del self._pending[: self.chunk_bytes]
        return chunks

    def finish(self, reason: EndReason = "end", message: str = "") -> list[AudioEntry]:
        """The partial tail (whole samples only) and the end marker; idempotent once ended."""
        if self.ended:
            return []
        whole = len(self._pending) - len(self._pending) % SAMPLE_WIDTH
        entries: list[AudioEntry] = [self._chunk(bytes(self._pending[:whole]))] if whole else []
        self._pending.clear()
        entries.append(AudioEnd(seq=self._take_seq(), reason=reason, message=message[:500]))
        self.ended = True
        return entries

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE

    @property
    def total_samples(self) -> int:
        """Samples fed so far, chunked or still buffered."""
        return self.samples + len(self._pending) // SAMPLE_WIDTH

    def _chunk(self, pcm: bytes) -> AudioChunk:
        self.samples += len(pcm) // SAMPLE_WIDTH
        return AudioChunk(seq=self._take_seq(), pcm=pcm)

    def _take_seq(self) -> int:
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        return seq
