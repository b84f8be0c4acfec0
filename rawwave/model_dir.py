"""The model-directory contract: what the exporter writes and the worker checks at startup.

A model directory is self-describing: `runtime.json` (this module's `RuntimeConfig`) says which
graphs exist, their tensor names, the per-layer KV shapes, the special token ids, the prompt pieces
and the streaming numbers the model was trained for; `manifest.json` lists every file with its
sha256 and the verification results of the export. The worker never guesses a number.

Graph I/O (names follow optimum / onnxruntime-genai):
- embed_tokens:  input_ids int64 [B,T] -> inputs_embeds [B,T,H] (embedding scale included)
- audio_embed:   audio_frames float32 [B,N,frame_samples] -> audio_embeds [B,N,H] (stateless)
- vision_embed:  see `VisionSpec`
- decoder:       inputs_embeds [B,T,H], position_ids int64 [B,T], past_key_values.{i}.key/.value
                 [B,kv_heads_i,P,head_dim_i], attention_mask int64 [B,P+T] (optional), num_logits_to_keep
                 int64 [] -> logits [B,K,V], last_hidden_state [B,T,H], present.{i}.key/.value
- drafter:       see `DrafterSpec`; drafter_steps (optional): see `DraftStepsSpec`
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rawwave.errors import RawwaveError

RUNTIME_CONFIG_FILE = "runtime.json"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1


class ModelDirError(RawwaveError):
    """The model directory is missing, incomplete, or does not match what this rawwave expects."""


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LayerSpec(_Spec):
    type: Literal["sliding_attention", "full_attention"]
    kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    sliding_window: int | None = None  # set on sliding layers


class TokenIds(_Spec):
    bos: int
    eos: list[int]  # any of these ends generation
    pad: int
    boa: int  # begin of audio
    eoa: int  # end of audio
    audio: int  # audio soft-token placeholder
    boi: int | None = None
    eoi: int | None = None
    image: int | None = None


class PromptFormat(_Spec):
    """The chat-turn pieces around the audio, as text with special tokens (tokenizer.json encodes them)."""

    transcribe_prefix: str  # everything before the audio when only a transcript is wanted
    respond_prefix: str  # everything before the audio when a response is wanted too
    audio_suffix: str  # closes the audio and the user turn, opens the model turn
    transcript_end: str = "\n"  # ends the transcript; the response follows it
    turn_end: str  # ends the model turn


class StreamingSpec(_Spec):
    format: Literal["branch", "interleaved"] = "branch"
    chunk_frames: int = Field(8, ge=1)  # interleaved: audio frames per chunk, as the model was trained
    partial_interval_ms: int = Field(400, ge=40)
    endpoint_silence_ms: int = Field(800, ge=0)  # 0: only the client's end marker ends a turn
    max_audio_s: float = Field(30.0, gt=0)  # longest audio segment the model takes in one turn
    max_transcript_tokens: int = Field(128, ge=1)


class GraphFiles(_Spec):
    embed_tokens: str = "embed_tokens.onnx"
    audio_embed: str = "audio_embed.onnx"
    decoder: str = "decoder.onnx"
    vision_embed: str | None = None
    drafter: str | None = None
    drafter_steps: str | None = None  # optional: a whole draft round per call (see `DraftStepsSpec`)


class VisionSpec(_Spec):
    patch_size: int
    pooling_kernel_size: int
    max_soft_tokens: int
    inputs: list[str]
    outputs: list[str]


class DraftStepsSpec(_Spec):
    """The drafter unrolled for a whole round: token_ids int64 [B,1] (the target's next token),
    prev_hidden, position_ids and the shared KV as the step graph -> draft_ids int64 [B,num_draft_tokens]
    (greedy: embedding lookup and argmax inside the graph), draft_logits. Its drafts equal
    num_draft_tokens calls of the step graph."""

    inputs: list[str]
    outputs: list[str]


class DrafterSpec(_Spec):
    """The MTP assistant step: proposes one token per call from the target's state."""

    num_draft_tokens: int = Field(ge=1)  # how many tokens to draft before a verify call
    hidden_size: int
    shared_layers: list[int]  # target layers whose KV the drafter attends (last sliding, last full)
    inputs: list[str]
    outputs: list[str]
    steps: DraftStepsSpec | None = None  # set when graphs.drafter_steps is written


class RuntimeConfig(_Spec):
    format_version: int = FORMAT_VERSION
    model_type: str
    dtype: Literal["fp32", "fp16"] = "fp32"
    quant: Literal["int8", "int4"] | None = None
    hidden_size: int
    vocab_size: int
    sample_rate: int = 16000
    frame_samples: int  # raw samples per audio soft token (640 = 40 ms for Gemma 4)
    layers: list[LayerSpec]
    tokens: TokenIds
    prompt: PromptFormat
    streaming: StreamingSpec = StreamingSpec()
    graphs: GraphFiles = GraphFiles()
    vision: VisionSpec | None = None
    drafter: DrafterSpec | None = None

    @property
    def frame_ms(self) -> float:
        return 1000 * self.frame_samples / self.sample_rate


class ManifestFile(_Spec):
    sha256: str
    bytes: int


class Manifest(_Spec):
    files: dict[str, ManifestFile]
    opset: int
    versions: dict[str, str]
    source_checkpoint_sha256: str
    verification: dict[str, object] = {}


def load_runtime_config(model_dir: Path) -> RuntimeConfig:
    """Read and check a model directory's contract; every problem is one clear ModelDirError."""
    path = model_dir / RUNTIME_CONFIG_FILE
    if not path.is_file():
        raise ModelDirError(
            f"no model directory at {model_dir} ({RUNTIME_CONFIG_FILE} missing): run `rawwave export`"
        )
    try:
        config = RuntimeConfig.model_validate_json(path.read_text())
    except ValidationError as e:
        raise ModelDirError(f"{path} does not match this rawwave's model-directory format: {e}") from e
    if config.format_version != FORMAT_VERSION:
        raise ModelDirError(
            f"{path}: format_version {config.format_version}, this rawwave reads {FORMAT_VERSION}"
        )
    _check_files(model_dir, config)
    return config


def load_manifest(model_dir: Path) -> Manifest:
    path = model_dir / MANIFEST_FILE
    try:
        return Manifest.model_validate_json(path.read_text())
    except (OSError, ValidationError) as e:
        raise ModelDirError(f"{path} is missing or malformed: {e}") from e


def verify_manifest(model_dir: Path, manifest: Manifest) -> None:
    """Every listed file exists with its recorded size and sha256 (catches a half-copied directory)."""
    for name, entry in manifest.files.items():
        path = model_dir / name
        if not path.is_file() or path.stat().st_size != entry.bytes:
            raise ModelDirError(f"{path}: missing or not {entry.bytes} bytes as the manifest says")
        if file_sha256(path) != entry.sha256:
            raise ModelDirError(f"{path}: sha256 differs from the manifest (corrupt or replaced)")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_files(model_dir: Path, config: RuntimeConfig) -> None:
    wanted = [TOKENIZER_FILE, config.graphs.embed_tokens, config.graphs.audio_embed, config.graphs.decoder]
    graphs = config.graphs
    wanted += [name for name in (graphs.vision_embed, graphs.drafter, graphs.drafter_steps) if name]
    missing = [name for name in wanted if not (model_dir / name).is_file()]
    if missing:
        raise ModelDirError(f"model directory {model_dir} is incomplete: missing {', '.join(missing)}")
