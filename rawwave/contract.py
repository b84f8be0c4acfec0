"""The stream contract: every Redis key name, group name and message schema rawwave uses.

Ingest, worker and clients agree on exactly this module. It knows nothing of I/O: `rawwave.streams`
moves these messages through Redis. Keys of one session share the hash tag `{session}`, so a
session lives in one Redis Cluster slot; the announce stream may be split into partitions, each in
its own slot, that workers read round-robin.

Audio travels as raw s16le bytes in a stream field (never base64 or JSON). Entries of the audio
and event streams use explicit ids `0-<seq>`: Redis itself then refuses a duplicate or stale write,
which is what makes a retried push or a second owner's event harmless.
"""

from __future__ import annotations

import re
import uuid
import zlib
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

SCHEMA_VERSION = 1
SAMPLE_RATE = 16000  # Hz; all audio in the streams is 16 kHz mono
SAMPLE_WIDTH = 2  # bytes; signed 16-bit little-endian
MAX_CHUNK_BYTES = SAMPLE_RATE * SAMPLE_WIDTH * 2  # 64000 bytes = 2 s, the largest chunk we accept

WORKERS_GROUP = "rawwave-workers"
DEADLETTER_KEY = "rawwave:deadletter"
SESSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

SessionId = Annotated[str, Field(pattern=SESSION_ID_PATTERN.pattern)]


class ContractError(ValueError):
    """A stream entry that does not follow the contract (bad field, unknown version, bad value)."""


# -- keys ---------------------------------------------------------------------------------------


def announce_key(partition: int) -> str:
    return f"rawwave:announce:{{p{partition}}}"


def audio_key(session: str) -> str:
    return f"rawwave:{{{session}}}:audio"


def events_key(session: str) -> str:
    return f"rawwave:{{{session}}}:events"


def image_key(session: str) -> str:
    return f"rawwave:{{{session}}}:image"


# What an image under image_key may be: ingest refuses anything else at upload, the worker again at use.
MAX_IMAGE_BYTES = 32 << 20  # 32 MiB of encoded image
MAX_IMAGE_PIXELS = 40_000_000  # 40 megapixels (8000 x 5000), checked before the pixels are decoded
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # Pillow format names


def heartbeat_key(worker: str) -> str:
    return f"rawwave:worker:{worker}"


def session_keys(session: str) -> list[str]:
    return [audio_key(session), events_key(session), image_key(session)]


def partition_of(session: str, partitions: int) -> int:
    """A stable partition for a session, the same in every process (crc32, not Python's hash)."""
    return zlib.crc32(session.encode()) % partitions


def new_session_id() -> str:
    return uuid.uuid4().hex


def entry_id(seq: int) -> str:
    """Stream id of the seq-th entry of an audio or event stream: monotonic and duplicate-proof."""
    return f"0-{seq}"


def seq_of(stream_id: bytes | str) -> int:
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    return int(text.split("-", 1)[1])


# -- messages -----------------------------------------------------------------------------------


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SessionAnnounce(_Message):
    """A new session, read by exactly one worker through the workers' group."""

    session: SessionId
    source: Literal["webrtc", "file", "http"]
    respond: bool = False  # generate a response after the final transcript
    created_ms: int = Field(ge=0)
    has_image: bool = False  # an image waits under image_key(session)


class AudioChunk(_Message):
    seq: int = Field(ge=1)
    pcm: bytes = Field(max_length=MAX_CHUNK_BYTES)

    @model_validator(mode="after")
    def _whole_samples(self) -> AudioChunk:
        if len(self.pcm) % SAMPLE_WIDTH:
            raise ValueError(f"pcm has {len(self.pcm)} bytes, not a whole number of s16 samples")
        return self


EndReason = Literal["end", "client_stop", "track_ended", "ice_failed", "timeout", "shutdown", "error"]


class AudioEnd(_Message):
    """The last entry of an audio stream: no more audio will come, and why."""

    seq: int = Field(ge=1)
    reason: EndReason = "end"
    message: str = ""


AudioEntry = AudioChunk | AudioEnd


class _Event(_Message):
    v: int = SCHEMA_VERSION
    session: SessionId
    seq: int = Field(ge=1)  # per session, contiguous from 1
    t_ms: int = Field(ge=0)  # the audio time the event refers to


class PartialEvent(_Event):
    type: Literal["partial"] = "partial"
    text: str
    stable: str  # prefix of text that will not change again
    revision: int = Field(ge=0)

    @model_validator(mode="after")
    def _stable_is_prefix(self) -> PartialEvent:
        if not self.text.startswith(self.stable):
            raise ValueError("stable must be a prefix of text")
        return self


class FinalEvent(_Event):
    type: Literal["final"] = "final"
    text: str


class ResponseDeltaEvent(_Event):
    type: Literal["response.delta"] = "response.delta"
    text: str


class ResponseDoneEvent(_Event):
    type: Literal["response.done"] = "response.done"
    text: str


ErrorCode = Literal[
    "bad_audio",
    "bad_image",  # the session's image is corrupt, unsupported or too large
    "no_vision",  # the session has an image, the worker's model takes none
    "inference_failed",
    "too_long",
    "lost",
    "dead_letter",
    "shutdown",
    "internal",
]


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str


class DoneEvent(_Event):
    type: Literal["done"] = "done"


Event = Annotated[
    PartialEvent | FinalEvent | ResponseDeltaEvent | ResponseDoneEvent | ErrorEvent | DoneEvent,
    Field(discriminator="type"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
TERMINAL_EVENT_TYPES = frozenset({"done"})


M = TypeVar("M", bound=_Message)


class DeadLetter(_Message):
    session: SessionId
    reason: str
    deliveries: int = Field(ge=1)
    worker: str
    at_ms: int = Field(ge=0)


class Heartbeat(_Message):
    worker: str
    sessions: int = Field(ge=0)
    draining: bool = False
    at_ms: int = Field(ge=0)


# -- encoding to and from stream fields ---------------------------------------------------------

Fields = dict[bytes, bytes]


def encode_announce(message: SessionAnnounce) -> Fields:
    return _json_fields(message)


def decode_announce(fields: Fields) -> SessionAnnounce:
    return _from_json_fields(SessionAnnounce, fields)


def encode_audio(entry: AudioEntry) -> Fields:
    head = {b"v": str(SCHEMA_VERSION).encode(), b"seq": str(entry.seq).encode()}
    if isinstance(entry, AudioChunk):
        return head | {b"kind": b"chunk", b"pcm": entry.pcm}
    return head | {b"kind": b"end", b"reason": entry.reason.encode(), b"message": entry.message.encode()}


def decode_audio(fields: Fields) -> AudioEntry:
    _check_version(fields)
    try:
        kind = fields[b"kind"]
        seq = int(fields[b"seq"])
        if kind == b"chunk":
            return AudioChunk(seq=seq, pcm=fields[b"pcm"])
        if kind == b"end":
            return AudioEnd(seq=seq, reason=fields[b"reason"].decode(), message=fields[b"message"].decode())
    except (KeyError, ValueError, UnicodeDecodeError) as e:
        raise ContractError(f"malformed audio entry: {_short(e)}") from e
    raise ContractError(f"malformed audio entry: unknown kind {kind!r}")


def encode_event(event: Event) -> Fields:
    return {b"v": str(SCHEMA_VERSION).encode(), b"event": event.model_dump_json().encode()}


def decode_event(fields: Fields) -> Event:
    _check_version(fields)
    try:
        return EVENT_ADAPTER.validate_json(fields[b"event"])
    except (KeyError, ValidationError) as e:
        raise ContractError(f"malformed event entry: {_short(e)}") from e


def event_to_json(event: Event) -> str:
    """The event as clients see it (data channel, SSE, `rawwave consume`)."""
    return event.model_dump_json()


def event_from_json(text: str | bytes) -> Event:
    try:
        return EVENT_ADAPTER.validate_json(text)
    except ValidationError as e:
        raise ContractError(f"malformed event: {_short(e)}") from e


def encode_dead_letter(message: DeadLetter) -> Fields:
    return _json_fields(message)


def decode_dead_letter(fields: Fields) -> DeadLetter:
    return _from_json_fields(DeadLetter, fields)


def _json_fields(message: _Message) -> Fields:
    return {b"v": str(SCHEMA_VERSION).encode(), b"json": message.model_dump_json().encode()}


def _from_json_fields(model: type[M], fields: Fields) -> M:
    _check_version(fields)
    try:
        return model.model_validate_json(fields[b"json"])
    except (KeyError, ValidationError) as e:
        raise ContractError(f"malformed {model.__name__} entry: {_short(e)}") from e


def _check_version(fields: Fields) -> None:
    version = fields.get(b"v")
    if version != str(SCHEMA_VERSION).encode():
        raise ContractError(f"unsupported schema version {version!r} (this rawwave speaks {SCHEMA_VERSION})")


def _short(error: Exception) -> str:
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    if isinstance(error, KeyError):
        return f"missing field {error.args[0]!r}"
    return str(error)
