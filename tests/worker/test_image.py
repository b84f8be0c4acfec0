"""worker/image.py against the reference: transformers' Gemma 4 Unified image processor.

The processor module imports torchvision, which this environment cannot load (PyPI's torchvision is a
CUDA build whose ops do not load against the CPU torch), so the reference is checked two ways:
- live: the processor's own helpers (`get_aspect_ratio_preserving_size`, `convert_image_to_patches`,
  `patches_merge`), taken from its installed source, with its RGB conversion and the resize torchvision
  runs for a CPU uint8 image (`interpolate(..., "bicubic", antialias=True)` on the uint8 tensor);
- recorded: digests of the real `Gemma4UnifiedImageProcessor` output (transformers 5.24.0, torchvision
  0.28.0, torch 2.13.0 CPU) for the same pictures, which are built with integer arithmetic only so that
  they are bit-identical everywhere.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from rawwave.model_dir import VisionSpec
from worker import image as image_module
from worker.image import ImageError, ImagePatches, image_patches

torch = pytest.importorskip("torch")
REFERENCE_MODULE = "transformers.models.gemma4_unified.image_processing_gemma4_unified"
SPECS = {"gemma4": (16, 3), "tiny": (2, 3)}  # patch_size, pooling_kernel_size


# -- pictures ------------------------------------------------------------------------------------


def picture(height: int, width: int, channels: int = 3) -> np.ndarray:
    """Gradients, stripes and hashed noise, in integers only: (H, W, C) uint8."""
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    planes = []
    for c in range(channels):
        ramp = (x * (3 + c) + y * (5 - c)) % 256
        noise = ((x * 7919 + y * 104729 + c * 31) * 2654435761 % 2**32) >> 26  # 0..63
        planes.append(np.clip(ramp + noise - 32, 0, 255))
    return np.stack(planes, axis=-1).astype(np.uint8)


def encoded(pixels: np.ndarray, mode: str | None = None, fmt: str = "PNG", **options: Any) -> bytes:
    image = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels)
    if mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def palette_with_transparency(height: int, width: int) -> bytes:
    indices = (picture(height, width, 1)[..., 0] // 16).astype(np.uint8)  # 16 colours
    image = Image.fromarray(indices, "P")
    image.putpalette([v for i in range(16) for v in (i * 16, 255 - i * 16, (i * 53) % 256)])
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=5)
    return buffer.getvalue()


CASES = {
    "landscape_300x500": lambda: encoded(picture(300, 500)),
    "portrait_1000x700": lambda: encoded(picture(1000, 700)),
    "upscaled_20x30": lambda: encoded(picture(20, 30)),
    "tall_4000x90": lambda: encoded(picture(4000, 90)),
    "wide_37x2000": lambda: encoded(picture(37, 2000)),
    "unresized_672x960": lambda: encoded(picture(672, 960)),
    "rgba_257x411": lambda: encoded(picture(257, 411, 4)),
    "gray_333x333": lambda: encoded(picture(333, 333, 1)),
    "palette_transparent_60x90": lambda: palette_with_transparency(60, 90),
    "bmp_123x77": lambda: encoded(picture(123, 77), fmt="BMP"),
}

# sha256(pixel_values[:n] float32 + image_position_ids[:n] int64)[:16] of Gemma4UnifiedImageProcessor
RECORDED = {
    ("gemma4", "landscape_300x500"): "2e392987b0115a9b",
    ("gemma4", "portrait_1000x700"): "58e1fd9c5db57a89",
    ("gemma4", "upscaled_20x30"): "eeee559927e70fc7",
    ("gemma4", "tall_4000x90"): "5155a863831e1055",
    ("gemma4", "wide_37x2000"): "75448985b0a7a90e",
    ("gemma4", "unresized_672x960"): "2b00f85269d4c198",
    ("gemma4", "rgba_257x411"): "dc1f629c8f2e5b7c",
    ("gemma4", "gray_333x333"): "d5b7c22b1620b609",
    ("gemma4", "palette_transparent_60x90"): "c9d59c61756f9639",
    ("gemma4", "bmp_123x77"): "477ebb65d42f6131",
    ("tiny", "landscape_300x500"): "c947d0a254c37333",
    ("tiny", "portrait_1000x700"): "dcccf0c79b748e1e",
    ("tiny", "upscaled_20x30"): "0111f3f7e2968395",
    ("tiny", "tall_4000x90"): "2c822ec379957086",
    ("tiny", "wide_37x2000"): "f4adf183d458749c",
    ("tiny", "unresized_672x960"): "b290d88e997b0908",
    ("tiny", "rgba_257x411"): "e0e577620fa531e6",
    ("tiny", "gray_333x333"): "f2b2adadf7c1dd03",
    ("tiny", "palette_transparent_60x90"): "f292dd4cd9231387",
    ("tiny", "bmp_123x77"): "a59042d6331ae2b4",
}


def spec(name: str) -> VisionSpec:
    patch, pooling = SPECS[name]
    return VisionSpec(patch_size=patch, pooling_kernel_size=pooling, max_soft_tokens=280,
                      inputs=["pixel_patches", "patch_xy"], outputs=["image_embeds"])  # fmt: skip


def digest(patches: np.ndarray, xy: np.ndarray) -> str:
    data = patches.astype(np.float32).tobytes() + xy.astype("<i8").tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


# -- the live reference ----------------------------------------------------------------------------


def reference_helpers() -> dict[str, Any]:
    """The processor module's own pure-torch helpers, compiled from its installed source."""
    pytest.importorskip("transformers")
    found = importlib.util.find_spec(REFERENCE_MODULE)
    assert found is not None and found.origin is not None
    tree = ast.parse(Path(found.origin).read_text())
    names = {"get_aspect_ratio_preserving_size", "convert_image_to_patches", "patches_merge"}
    body: list[ast.stmt] = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert {n.name for n in body if isinstance(n, ast.FunctionDef)} == names
    namespace: dict[str, Any] = {"math": math, "torch": torch}
    exec(compile(ast.Module(body=body, type_ignores=[]), found.origin, "exec"), namespace)
    return namespace


def reference(data: bytes, patch: int, pooling: int, max_soft_tokens: int = 280) -> ImagePatches:
    """Gemma4UnifiedImageProcessor._preprocess for one image, step for step."""
    from transformers.image_transforms import convert_to_rgb

    ref = reference_helpers()
    rgb = convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True)  # the processor's PIL path
    image = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
    max_patches = max_soft_tokens * pooling**2
    height, width = ref["get_aspect_ratio_preserving_size"](
        image.shape[1], image.shape[2], patch, max_patches, pooling
    )
    if (height, width) != tuple(image.shape[1:]):  # torchvision's resize of a CPU uint8 image:
        image = torch.nn.functional.interpolate(
            image[None], size=[height, width], mode="bicubic", align_corners=False, antialias=True
        )[0]
    image = image * (1 / 255)  # rescale; do_normalize is off
    teacher = ref["convert_image_to_patches"](image, patch)
    grid = torch.meshgrid(torch.arange(width // patch), torch.arange(height // patch), indexing="xy")
    positions = torch.stack(grid, dim=-1).reshape(teacher.shape[0], 2)
    merged, xy = ref["patches_merge"](teacher[None], positions[None], teacher.shape[0] // pooling**2)
    return ImagePatches(merged[0].numpy(), xy[0].numpy())


# -- tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_patches_equal_the_reference_bit_for_bit(spec_name: str, case: str) -> None:
    data = CASES[case]()
    ours = image_patches(data, spec(spec_name))
    theirs = reference(data, *SPECS[spec_name])
    assert ours.patches.dtype == np.float32 and ours.xy.dtype == np.int64
    assert ours.patches.shape == theirs.patches.shape and 0 < len(ours) <= 280
    assert np.array_equal(ours.xy, theirs.xy)
    assert np.array_equal(ours.patches, theirs.patches)
    assert digest(ours.patches, ours.xy) == RECORDED[spec_name, case]


def test_the_soft_token_count_follows_the_aspect_ratio() -> None:
    sizes = {case: len(image_patches(CASES[case](), spec("gemma4"))) for case in CASES}
    assert sizes["unresized_672x960"] == 280  # 14 x 20 merged 48-px patches, no resize
    assert sizes["landscape_300x500"] == 12 * 21 and sizes["tall_4000x90"] == 111 * 2


def test_corrupt_image_is_refused() -> None:
    png = CASES["landscape_300x500"]()
    with pytest.raises(ImageError, match="corrupt image") as error:
        image_patches(png[: len(png) // 2], spec("gemma4"))
    assert error.value.code == "bad_image"


@pytest.mark.parametrize("data", [b"hello, not a picture", encoded(picture(8, 8), fmt="TIFF")])
def test_unknown_or_unsupported_format_is_refused(data: bytes) -> None:
    with pytest.raises(ImageError, match="not an image this worker reads"):
        image_patches(data, spec("gemma4"))


def test_size_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    png = CASES["landscape_300x500"]()
    monkeypatch.setattr(image_module, "MAX_IMAGE_PIXELS", 300 * 500 - 1)
    with pytest.raises(ImageError, match="500x300, more than the 149999 pixels"):
        image_patches(png, spec("gemma4"))
    monkeypatch.setattr(image_module, "MAX_IMAGE_BYTES", len(png) - 1)
    with pytest.raises(ImageError, match=f"{len(png)} bytes, more than"):
        image_patches(png, spec("gemma4"))
