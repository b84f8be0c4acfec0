"""ONNX Runtime sessions for one model directory: embedders, decoder, MTP drafter, and the tokenizer.

The model directory is the only contract (rawwave/model_dir.py): this module opens its graphs, checks
their actual inputs and outputs against runtime.json at load (a mismatch is one clear ModelDirError),
and offers numpy-in, numpy-out calls. The KV cache is an opaque `KvCache`: host numpy arrays on the
CPU; on CUDA, OrtValues that stay on the device between calls (IOBinding). Never imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from rawwave.errors import RawwaveError
from rawwave.logs import get_logger
from rawwave.model_dir import TOKENIZER_FILE, ModelDirError, RuntimeConfig, load_runtime_config
from rawwave.settings import Settings
from worker.decoding import AcceptanceCounts, Context, RoundCosts

log = get_logger(__name__)

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
PCM_SCALE = 1 / 32768  # s16 -> float in [-1, 1)


class DeviceError(RawwaveError):
    """The configured device is not available in this onnxruntime build."""


@dataclass(frozen=True)
class KvCache:
    """Per KV-owning layer, key then value, each (1, kv_heads, length, head_dim): numpy or OrtValue."""

    tensors: tuple[Any, ...]


def session_options(settings: Settings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.ort_intra_threads
    options.inter_op_num_threads = settings.ort_inter_threads
    options.graph_optimization_level = OPT_LEVELS[settings.ort_graph_optimization]
    options.log_severity_level = 3
    return options


def providers_for(device: str) -> list[str]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise DeviceError(
            "RAWWAVE_DEVICE=cuda but this onnxruntime has no CUDAExecutionProvider "
            f"(it has {', '.join(ort.get_available_providers())}): pip install 'rawwave[gpu]'"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class Graph:
    """One InferenceSession plus what its declared I/O says."""

    def __init__(self, path: Path, settings: Settings) -> None:
        self.name = path.name
        try:
            self.session = ort.InferenceSession(
                str(path), session_options(settings), providers=providers_for(settings.device)
            )
        except (RuntimeError, ort.capi.onnxruntime_pybind11_state.Fail) as e:  # type: ignore[attr-defined]
            raise ModelDirError(f"{path}: onnxruntime cannot load it: {e}") from e
        self.inputs = {i.name: i for i in self.session.get_inputs()}  # what a call must feed
        self.optional = {i.name for i in self.session.get_overridable_initializers()}  # may leave unfed
        self.outputs = {o.name: o for o in self.session.get_outputs()}
        self.output_names = list(self.outputs)

    def dtype(self, name: str) -> Any:
        return NUMPY_TYPES.get(self.inputs[name].type, np.float32)

    def takes(self, name: str) -> bool:
        return name in self.inputs or name in self.optional

    def run(self, feeds: dict[str, Any]) -> list[Any]:
        return self.session.run(self.output_names, {k: v for k, v in feeds.items() if self.takes(k)})


class Runtime:
    """The whole model: `extend` / `truncate` make it a decoding.Target; `drafter` is a decoding.Drafter."""

    def __init__(self, model_dir: Path, settings: Settings) -> None:
        self.model_dir = model_dir
        self.config = load_runtime_config(model_dir)
        self.device = settings.device
        self.tokenizer = _load_tokenizer(model_dir / TOKENIZER_FILE)
        self._rows: dict[int, np.ndarray] = {}  # token -> embedding row, filled as tokens are decoded
        graphs = self.config.graphs
        self.embed = Graph(model_dir / graphs.embed_tokens, settings)
        self.audio = Graph(model_dir / graphs.audio_embed, settings)
        self.decoder = Graph(model_dir / graphs.decoder, settings)
        self.kv_names = [
            f"past_key_values.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")
        ]
        self.present_names = [name.replace("past_key_values", "present") for name in self.kv_names]
        check_graphs(self.config, self.embed, self.audio, self.decoder)
        self.float_type = self.decoder.dtype("inputs_embeds")
        self.drafter = _load_drafter(self, settings) if graphs.drafter and self.config.drafter else None
        self.vision = _load_vision(self, settings) if graphs.vision_embed and self.config.vision else None
        log.info("model loaded", model_dir=str(model_dir), device=self.device,
                 drafter=self.drafter is not None, vision=self.vision is not None)  # fmt: skip

    @property
    def num_layers(self) -> int:
        return len(self.config.layers)

    # -- embedders -----------------------------------------------------------------------------

    def embed_tokens(self, token_ids: Sequence[int]) -> np.ndarray:
        if len(token_ids) == 1:  # a decode step: the row is remembered, one graph call saved
            return self._token_row(int(token_ids[0]))[None]  # (1, H)
        ids = np.asarray(token_ids, dtype=np.int64)[None]  # (1, T)
        return self.embed.run({"input_ids": ids})[0][0]  # (T, H)

    def _token_row(self, token: int) -> np.ndarray:
        row = self._rows.get(token)
        if row is None:
            row = self._rows[token] = self.embed.run({"input_ids": np.array([[token]], np.int64)})[0][0, 0]
        return row

    def embed_audio(self, pcm: np.ndarray) -> np.ndarray:
        """pcm int16 (N * frame_samples,) -> audio soft tokens (N, H)."""
        frames = pcm.astype(np.float32).reshape(1, -1, self.config.frame_samples) * PCM_SCALE  # (1, N, 640)
        return self.audio.run({"audio_frames": frames})[0][0]  # (N, H)

    def embed_image(self, patches: np.ndarray, patch_xy: np.ndarray) -> np.ndarray:
        """patches float32 (N, patch_dim) in [0, 1], patch_xy int64 (N, 2) -> image soft tokens (N, H)."""
        if self.vision is None:
            raise ModelDirError(f"model {self.model_dir.name} has no vision graph")
        feeds = {"pixel_patches": patches[None].astype(np.float32, copy=False), "patch_xy": patch_xy[None]}
        return self.vision.run(feeds)[0][0]  # (N, H)

    # -- decoder: a decoding.Target ------------------------------------------------------------

    def empty_cache(self) -> KvCache:
        shapes = [(1, layer.kv_heads, 0, layer.head_dim) for layer in self.config.layers for _ in range(2)]
        return KvCache(tuple(self._to_device(np.zeros(s, self.float_type)) for s in shapes))

    def start(self, token_ids: Sequence[int], image: np.ndarray | None = None) -> Context:
        """A context holding a prompt. `image` (N, H) soft tokens take the places of the prompt's N image
        placeholders, which attend each other both ways on sliding layers (one image group)."""
        embeds, groups = self.embed_tokens(token_ids), None  # (T, H)
        if image is not None:
            placeholders = np.asarray(token_ids) == self.config.tokens.image  # (T,)
            embeds = embeds.copy()
            embeds[placeholders] = image
            groups = np.where(placeholders, 0, -1).astype(np.int64)[None]  # (1, T)
        logits, hidden, cache = self.extend_embeds(self.empty_cache(), 0, embeds, 1, groups)
        return Context(cache, len(token_ids), logits[-1], hidden[-1])

    def extend(
        self, cache: KvCache, length: int, token_ids: Sequence[int], keep: int = 0
    ) -> tuple[np.ndarray, np.ndarray, KvCache]:
        return self.extend_embeds(cache, length, self.embed_tokens(token_ids), keep)

    def extend_embeds(
        self, cache: KvCache, length: int, embeds: np.ndarray, keep: int = 0, image_groups: Any = None
    ) -> tuple[np.ndarray, np.ndarray, KvCache]:
        """Append embeddings (T, H) at positions length..: logits (keep or T, V), hidden (T, H), cache.
        image_groups (1, T) int64: each new token's image, -1 elsewhere (fed if the decoder takes it)."""
        steps = embeds.shape[0]
        feeds = {
            "inputs_embeds": embeds[None].astype(self.float_type, copy=False),  # (1, T, H)
            "position_ids": np.arange(length, length + steps, dtype=np.int64)[None],  # (1, T)
            "attention_mask": np.ones((1, length + steps), np.int64),  # (1, P + T)
            "num_logits_to_keep": np.array(keep, np.int64),
        }
        if image_groups is not None:
            feeds["image_groups"] = image_groups
        logits, hidden, *present = self._run_decoder(feeds, cache)
        return logits[0], hidden[0], KvCache(tuple(present))

    def extend_batch(
        self, calls: Sequence[tuple[KvCache, int, np.ndarray, int]]
    ) -> list[tuple[np.ndarray, np.ndarray, KvCache]]:
        """`extend_embeds` of several independent (cache, length, embeds, keep) calls in one decoder call
        (host caches only). Pasts are left-padded to the longest and new tokens right-padded to the
        widest; the attention mask hides padded pasts, right padding is after every real token (causal),
        and per-row position ids keep each row's positions. Each result equals the call alone up to
        float rounding (summation order over a longer key axis)."""
        if len(calls) == 1:
            return [self.extend_embeds(*calls[0])]
        lengths = [length for _, length, _, _ in calls]
        widths = [embeds.shape[0] for _, _, embeds, _ in calls]
        past, width = max(lengths), max(widths)
        first_kept = min(w - (keep or w) for w, (*_, keep) in zip(widths, calls, strict=True))
        feeds = {
            "inputs_embeds": self._right_padded([embeds for _, _, embeds, _ in calls], width),  # (B, W, H)
            "position_ids": np.array(lengths, np.int64)[:, None] + np.arange(width),  # (B, W)
            "attention_mask": (np.arange(past + width) >= past - np.array(lengths)[:, None]).astype(
                np.int64
            ),  # (B, P + W): 0 on each row's left padding
            "num_logits_to_keep": np.array(width - first_kept if first_kept else 0, np.int64),
        }
        for i, name in enumerate(self.kv_names):
            feeds[name] = _left_padded([cache.tensors[i] for cache, *_ in calls], past)  # (B, kvh, P, hd)
        logits, hidden, *present = self.decoder.session.run(self.decoder.output_names, feeds)
        out = []
        for b, (length, steps, (*_, keep)) in enumerate(zip(lengths, widths, calls, strict=True)):
            rows = logits[b, steps - (keep or steps) - first_kept : steps - first_kept]  # (keep or T, V)
            kv = (np.ascontiguousarray(t[b : b + 1, :, past - length : past + steps]) for t in present)
            out.append((rows, hidden[b, :steps], KvCache(tuple(kv))))
        return out

    def _right_padded(self, embeds: Sequence[np.ndarray], width: int) -> np.ndarray:
        batch = np.zeros((len(embeds), width, embeds[0].shape[-1]), self.float_type)  # (B, W, H)
        for b, rows in enumerate(embeds):
            batch[b, : len(rows)] = rows
        return batch

    def truncate(self, cache: KvCache, length: int) -> KvCache:
        if self.device == "cpu":
            return KvCache(tuple(t[:, :, :length] for t in cache.tensors))
        host = [t.numpy()[:, :, :length] for t in cache.tensors]  # no device-side slice in the ORT API
        return KvCache(tuple(self._to_device(np.ascontiguousarray(t)) for t in host))

    def _run_decoder(self, feeds: dict[str, np.ndarray], cache: KvCache) -> list[Any]:
        if self.device == "cpu":
            return self.decoder.run(feeds | dict(zip(self.kv_names, cache.tensors, strict=True)))
        return run_bound(self.decoder, feeds, dict(zip(self.kv_names, cache.tensors, strict=True)),
                         device_outputs=set(self.present_names))  # fmt: skip

    def _to_device(self, array: np.ndarray) -> Any:
        return array if self.device == "cpu" else ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)

    # -- text ----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))


def _left_padded(pasts: Sequence[np.ndarray], length: int) -> np.ndarray:
    """Per-row (1, kvh, L_b, hd) pasts as one (B, kvh, length, hd), each row's positions at the right."""
    first = pasts[0]
    batch = np.zeros((len(pasts), first.shape[1], length, first.shape[3]), first.dtype)
    for b, past in enumerate(pasts):
        batch[b, :, length - past.shape[2] :] = past[0]
    return batch


def run_bound(
    graph: Graph, host: dict[str, np.ndarray], device: dict[str, Any], device_outputs: set[str]
) -> list[Any]:
    """One CUDA call through IOBinding: OrtValues stay on the device; the rest come back as numpy."""
    binding = graph.session.io_binding()
    for name, value in host.items():
        if graph.takes(name):
            binding.bind_cpu_input(name, value)
    for name, value in device.items():
        binding.bind_ortvalue_input(name, value)
    for name in graph.output_names:
        binding.bind_output(name, "cuda" if name in device_outputs else "cpu")
    graph.session.run_with_iobinding(binding)
    values = binding.get_outputs()
    return [
        v if name in device_outputs else v.numpy() for name, v in zip(graph.output_names, values, strict=True)
    ]


class Drafter:
    """The MTP assistant, reading the target's last sliding and last full layer KV. A whole round in one
    call of `drafter_steps` when the model directory has it (drafts of the first `count` steps are kept);
    else, and for short rounds (an adaptive probe), one step-graph call per drafted token. Inputs are
    matched to the graph's names by role (see `drafter_roles`)."""

    def __init__(self, runtime: Runtime, graph: Graph, steps: Graph | None = None) -> None:
        spec = runtime.config.drafter
        assert spec is not None
        self.runtime, self.graph, self.spec, self.steps = runtime, graph, spec, steps
        self.num_draft_tokens = spec.num_draft_tokens
        self.roles = drafter_roles(spec.inputs, spec.outputs)
        self.shared = [runtime.kv_names.index(f"past_key_values.{i}.{kind}")
                       for i in spec.shared_layers for kind in ("key", "value")]  # fmt: skip
        self.steps_kv = spec.steps.inputs[3:7] if spec.steps else []  # names as DraftStepsSpec orders them
        self.hidden_type = graph.dtype(self.roles.hidden)
        self.round_costs = RoundCosts(self.num_draft_tokens)  # measured by every session's AdaptiveDrafter
        self.acceptance_counts: dict[str, AcceptanceCounts] = {}  # per part of the output, all sessions
        self.calls = 0

    def propose(self, ctx: Context, token: int, count: int) -> list[int]:
        """Greedy drafts after `token` (at position ctx.length), starting from the target's hidden state."""
        return self._drafts(ctx, token, count, scored=False)[0]

    def propose_scored(self, ctx: Context, token: int, count: int) -> tuple[list[int], list[float]]:
        """`propose`, with the drafter's softmax probability of each draft."""
        return self._drafts(ctx, token, count, scored=True)

    def _drafts(self, ctx: Context, token: int, count: int, scored: bool) -> tuple[list[int], list[float]]:
        """Drafts, and their probabilities when `scored` (else none: a real Gemma's rows are 262k wide)."""
        if self.steps is not None and 2 * count > self.num_draft_tokens:  # one call beats count > k/2 steps
            drafts, logits = self._propose_round(ctx, token, scored)
            return drafts[:count], [top_probability(row) for row in logits[:count]]
        kv = {name: ctx.cache.tensors[i] for name, i in zip(self.roles.kv, self.shared, strict=True)}
        hidden = ctx.hidden[None, None].astype(self.hidden_type, copy=False)  # (1, 1, Hb)
        position = np.array([[ctx.length]], np.int64)  # (1, 1) fixed for the whole round, as the reference
        drafts: list[int] = []
        probabilities: list[float] = []
        for _ in range(count):
            embeds = self.runtime.embed_tokens([token])[None]  # (1, 1, Hb)
            logits, hidden = self._step(embeds, hidden, position, kv, ctx.length)
            row = logits.reshape(-1, logits.shape[-1])[-1]  # (V,)
            token = int(row.argmax())
            drafts.append(token)
            if scored:
                probabilities.append(top_probability(row))
        return drafts, probabilities

    def _propose_round(self, ctx: Context, token: int, with_logits: bool) -> tuple[list[int], np.ndarray]:
        """All num_draft_tokens drafts in one drafter_steps call, and with_logits their logits (k, V) (else
        (0, 0); a real Gemma's are 1 MB a draft: fetched only to be read)."""
        assert self.steps is not None
        kv = {name: ctx.cache.tensors[i] for name, i in zip(self.steps_kv, self.shared, strict=True)}
        host = {
            "token_ids": np.array([[token]], np.int64),  # (1, 1)
            "prev_hidden": ctx.hidden[None, None].astype(self.hidden_type, copy=False),  # (1, 1, Hb)
            "position_ids": np.array([[ctx.length]], np.int64),  # (1, 1)
        }
        self.calls += 1
        outputs = ["draft_ids", "draft_logits"] if with_logits else ["draft_ids"]
        if self.runtime.device == "cpu":
            got = dict(zip(outputs, self.steps.session.run(outputs, host | kv), strict=True))
        else:
            got = dict(zip(self.steps.output_names, run_bound(self.steps, host, kv, set()), strict=True))
        logits = np.asarray(got["draft_logits"][0]) if with_logits else np.zeros((0, 0))
        return [int(t) for t in got["draft_ids"][0]], logits

    def _step(
        self, embeds: np.ndarray, hidden: np.ndarray, position: np.ndarray, kv: dict[str, Any], length: int
    ):
        roles = self.roles
        host = {
            roles.embeds: embeds.astype(self.hidden_type, copy=False),
            roles.hidden: hidden,
            roles.position: position,
        }
        if roles.mask:
            host[roles.mask] = np.ones((1, length), np.int64)
        self.calls += 1
        if self.runtime.device == "cpu":
            out = dict(zip(self.graph.output_names, self.graph.run(host | kv), strict=True))
        else:
            out = dict(zip(self.graph.output_names, run_bound(self.graph, host, kv, set()), strict=True))
        return out[roles.logits], out[roles.next_hidden]


def top_probability(logits: np.ndarray) -> float:
    """The softmax probability of the argmax of one row of logits."""
    row = logits.astype(np.float64)
    return float(1.0 / np.exp(row - row.max()).sum())


VISION_INPUTS = ("pixel_patches", "patch_xy")
STEPS_INPUTS = ("token_ids", "prev_hidden", "position_ids")  # then the 4 shared KV tensors, as the spec lists


@dataclass(frozen=True)
class DrafterRoles:
    embeds: str  # the target's token embedding of the last token (1, 1, Hb)
    hidden: str  # the previous hidden state (1, 1, Hb)
    position: str  # position ids (1, 1)
    kv: list[str]  # shared KV in (sliding key, sliding value, full key, full value) order
    mask: str | None  # optional (1, S) key mask
    logits: str
    next_hidden: str


def drafter_roles(inputs: Sequence[str], outputs: Sequence[str]) -> DrafterRoles:
    """Match the drafter's declared I/O names to their roles, or say which one is missing."""

    def pick(names: Sequence[str], *words: str, optional: bool = False) -> str | None:
        found = [n for n in names if any(w in n.lower() for w in words)]
        if not found and not optional:
            raise ModelDirError(f"drafter graph: no input/output for {words[0]!r} among {list(names)}")
        return found[0] if found else None

    kv = [n for n in inputs if any(w in n.lower() for w in ("key", "value", "_k", "_v", "kv"))]
    mask = pick(inputs, "mask", optional=True)
    kv = [n for n in kv if n != mask]
    if len(kv) != 4:
        raise ModelDirError(f"drafter graph: expected 4 shared KV inputs, found {kv} among {list(inputs)}")
    embeds = pick([n for n in inputs if n not in kv], "embed")
    hidden = pick([n for n in inputs if n not in kv and n != embeds], "hidden")
    logits = pick(outputs, "logits")
    next_hidden = pick([n for n in outputs if n != logits], "hidden")
    position = pick(inputs, "position")
    return DrafterRoles(embeds, hidden, position, kv, mask, logits, next_hidden)  # type: ignore[arg-type]


def _load_drafter(runtime: Runtime, settings: Settings) -> Drafter | None:
    spec, graphs = runtime.config.drafter, runtime.config.graphs
    assert spec is not None and graphs.drafter is not None
    graph = Graph(runtime.model_dir / graphs.drafter, settings)
    steps = Graph(runtime.model_dir / graphs.drafter_steps, settings) if graphs.drafter_steps else None
    check_drafter(runtime.config, graph, steps)
    return Drafter(runtime, graph, steps)


def _load_vision(runtime: Runtime, settings: Settings) -> Graph:
    graphs = runtime.config.graphs
    assert graphs.vision_embed is not None
    graph = Graph(runtime.model_dir / graphs.vision_embed, settings)
    check_vision(runtime.config, graph)
    return graph


def _load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception
        raise ModelDirError(f"{path}: not a tokenizers tokenizer.json: {e}") from e


# -- load-time checks: runtime.json against the graphs' real I/O ----------------------------------


def check_graphs(config: RuntimeConfig, embed: Graph, audio: Graph, decoder: Graph) -> None:
    problems = [*_check_embedders(config, embed, audio), *_check_decoder(config, decoder)]
    if problems:
        raise ModelDirError("runtime.json does not match the graphs: " + "; ".join(problems))


def _check_embedders(config: RuntimeConfig, embed: Graph, audio: Graph) -> list[str]:
    problems = _expect_names(embed, ["input_ids"], [])
    problems += _expect_names(audio, ["audio_frames"], [])
    if not problems:
        problems += _expect_dim(audio, "audio_frames", -1, config.frame_samples, "frame_samples")
        problems += _expect_dim(
            embed, embed.output_names[0], -1, config.hidden_size, "hidden_size", output=True
        )
        problems += _expect_dim(
            audio, audio.output_names[0], -1, config.hidden_size, "hidden_size", output=True
        )
    return problems


def _check_decoder(config: RuntimeConfig, decoder: Graph) -> list[str]:
    n = len(config.layers)
    past = [f"past_key_values.{i}.{kind}" for i in range(n) for kind in ("key", "value")]
    present = [name.replace("past_key_values", "present") for name in past]
    problems = _expect_names(
        decoder, ["inputs_embeds", "position_ids", *past], ["logits", "last_hidden_state", *present]
    )
    extra = sorted(k for k in decoder.inputs if k.startswith("past_key_values.") and k not in past)
    if extra:
        problems.append(f"{decoder.name} has {len(extra) // 2 + n} KV layers, runtime.json lists {n}")
    if problems:
        return problems
    problems += _expect_dim(decoder, "inputs_embeds", -1, config.hidden_size, "hidden_size")
    problems += _expect_dim(decoder, "logits", -1, config.vocab_size, "vocab_size", output=True)
    for i, layer in enumerate(config.layers):
        for kind in ("key", "value"):
            name = f"past_key_values.{i}.{kind}"
            problems += _expect_dim(decoder, name, 1, layer.kv_heads, f"layers[{i}].kv_heads")
            problems += _expect_dim(decoder, name, 3, layer.head_dim, f"layers[{i}].head_dim")
    return problems


def check_drafter(config: RuntimeConfig, graph: Graph, steps: Graph | None = None) -> None:
    spec = config.drafter
    assert spec is not None
    problems = _expect_names(graph, spec.inputs, spec.outputs)
    problems += _check_drafter_steps(config, steps)
    unlisted = sorted(set(graph.inputs) - set(spec.inputs))
    if unlisted:
        problems.append(f"{graph.name} takes inputs runtime.json does not list: {unlisted}")
    bad = [i for i in spec.shared_layers if not 0 <= i < len(config.layers)]
    if bad:
        problems.append(
            f"drafter.shared_layers {bad} out of range (the decoder has {len(config.layers)} KV layers)"
        )
    if not problems:
        drafter_roles(spec.inputs, spec.outputs)
    if problems:
        raise ModelDirError("runtime.json does not match the drafter graph: " + "; ".join(problems))


def check_vision(config: RuntimeConfig, graph: Graph) -> None:
    spec, tokens = config.vision, config.tokens
    assert spec is not None
    problems = _expect_names(graph, spec.inputs, spec.outputs)
    if not problems and (spec.inputs, spec.outputs) != (list(VISION_INPUTS), ["image_embeds"]):
        problems.append(f"vision: {spec.inputs} -> {spec.outputs}, expected {VISION_INPUTS} -> image_embeds")
    if not problems:
        patch_dim = (spec.patch_size * spec.pooling_kernel_size) ** 2 * 3
        problems += _expect_dim(graph, "pixel_patches", -1, patch_dim, "vision.patch_size")
        problems += _expect_dim(graph, "image_embeds", -1, config.hidden_size, "hidden_size", output=True)
    if None in (tokens.boi, tokens.eoi, tokens.image):
        problems.append("tokens.boi, tokens.eoi and tokens.image must be set for a vision graph")
    if problems:
        raise ModelDirError("runtime.json does not match the vision graph: " + "; ".join(problems))


def _check_drafter_steps(config: RuntimeConfig, steps: Graph | None) -> list[str]:
    drafter = config.drafter
    spec = drafter.steps if drafter else None
    if (spec is None) != (steps is None):
        return ["graphs.drafter_steps and drafter.steps must be given together"]
    if drafter is None or spec is None or steps is None:
        return []
    problems = _expect_names(steps, spec.inputs, spec.outputs)
    if not problems and (spec.inputs[:3] != list(STEPS_INPUTS) or "draft_ids" not in spec.outputs):
        problems.append(f"drafter.steps: inputs {spec.inputs[:3]}, outputs {spec.outputs}, "
                        f"expected {list(STEPS_INPUTS)} and draft_ids")  # fmt: skip
    if not problems:
        k = drafter.num_draft_tokens
        problems += _expect_dim(steps, "draft_ids", -1, k, "drafter.num_draft_tokens", output=True)
    return problems


def _expect_names(graph: Graph, inputs: Sequence[str], outputs: Sequence[str]) -> list[str]:
    problems = []
    missing_in = [n for n in inputs if n not in graph.inputs and n not in graph.optional]
    missing_out = [n for n in outputs if n not in graph.outputs]
    if missing_in:
        problems.append(f"{graph.name} lacks inputs {missing_in} (it has {list(graph.inputs)})")
    if missing_out:
        problems.append(f"{graph.name} lacks outputs {missing_out} (it has {graph.output_names})")
    return problems


def _expect_dim(graph: Graph, name: str, axis: int, want: int, what: str, output: bool = False) -> list[str]:
    shape = (graph.outputs if output else graph.inputs)[name].shape
    got = shape[axis] if shape and -len(shape) <= axis < len(shape) else None
    if isinstance(got, int) and got != want:
        return [f"{graph.name} {name} dim {axis} is {got}, runtime.json {what} says {want}"]
    return []
