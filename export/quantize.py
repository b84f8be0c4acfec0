"""Weight quantization of a finished ONNX graph: int8 dynamic (per-channel MatMul weights, activations
quantized at run time) or int4 weight-only (MatMulNBits, blocks of 32 along K, asymmetric).

Only MatMul weights are quantized: the norms (and every other small tensor) stay in the graph's float
type, and the exporter never hands this module the audio projection (audio_embed.onnx stays fp32, so the
raw-waveform path keeps its precision). export/model.py never knows any of this.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from rawwave.errors import RawwaveError

INT4_BLOCK = 32
EXTERNAL_DATA_BYTES = 2 * 1024**3  # protobuf's limit: bigger models keep weights in a side file


class QuantizeError(RawwaveError):
    """The quantizer could not process a graph (e.g. int8 dynamic quantization of an fp16 graph)."""


def quantize(source: Path, target: Path, quant: str, dtype: str) -> None:
    """Write a quantized copy of the graph at source to target (same I/O)."""
    if quant == "int8":
        if dtype != "fp32":
            raise QuantizeError(
                "int8 dynamic quantization needs an fp32 export (use --dtype fp32 or --quant int4)"
            )
        _int8(source, target)
    elif quant == "int4":
        _int4(source, target)
    else:
        raise QuantizeError(f"unknown quantization {quant!r} (int8 or int4)")


def _int8(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        source,
        target,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        use_external_data_format=_is_large(source),
        # attention's activation-activation MatMuls stay float; ORT's fused ops (export/fuse.py) have no
        # ONNX shape inference, so untyped values default to float
        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def _int4(source: Path, target: Path) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quiet = logging.getLogger("onnxruntime.quantization")
    quiet.setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(
        onnx.load(source), bits=4, block_size=INT4_BLOCK, is_symmetric=False, op_types_to_quantize=("MatMul",)
    )
    quantizer.process()
    save(quantizer.model.model, target)


def save(model: onnx.ModelProto, path: Path) -> None:
    """Save, with weights in `<name>.data` next to it when the model is over protobuf's 2 GB."""
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    large = weights > EXTERNAL_DATA_BYTES - (64 << 20)  # leave room for the graph itself
    onnx.save(
        model, path, save_as_external_data=large, all_tensors_to_one_file=True, location=path.name + ".data"
    )


def _is_large(path: Path) -> bool:
    side = path.with_name(path.name + ".data")
    return path.stat().st_size + (side.stat().st_size if side.exists() else 0) > EXTERNAL_DATA_BYTES
