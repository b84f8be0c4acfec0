"""A session's image, bytes in, model patches out: decode, RGB, resize, rescale, patchify (numpy + Pillow).

Follows the Gemma 4 Unified image processor of transformers (`Gemma4UnifiedImageProcessor`) step for
step, so the vision graph sees what the reference model saw: transparency composited onto white, an
aspect-preserving bicubic resize (antialiased, as torchvision resizes uint8 images on the CPU) to the
largest size whose sides are multiples of patch_size * pooling_kernel_size and that holds at most
max_soft_tokens merged patches, pixels / 255, then one merged patch per soft token in row-major order
with its (x, y). Padding to max_soft_tokens is left out: the vision graph embeds each patch on its own,
and only real patches become soft tokens. Knows nothing of Redis or of the model's graphs.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from rawwave.contract import IMAGE_FORMATS, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, ErrorCode
from rawwave.errors import RawwaveError
from rawwave.model_dir import VisionSpec

FORMATS = IMAGE_FORMATS  # what Pillow may decode; anything else is refused
CUBIC_A = -0.5  # Keys' bicubic kernel, as Pillow and torch's antialiased resize use
WEIGHT_BITS = 15  # resize weights are int16 fixed point, as torch's uint8 kernel computes them


class ImageError(RawwaveError):
    """A session's image that cannot be used (corrupt, unsupported, too large); `code` is its error code."""

    def __init__(self, message: str, code: ErrorCode = "bad_image") -> None:
        super().__init__(message)
        self.code: ErrorCode = code


@dataclass(frozen=True)
class ImagePatches:
    """What the vision graph takes for one image: one row per soft token."""

    patches: np.ndarray  # (N, side * side * 3) float32 in [0, 1], each merged patch as (row, col, rgb)
    xy: np.ndarray  # (N, 2) int64 (x, y) of each merged patch on the patch grid

    def __len__(self) -> int:
        return len(self.patches)


def image_patches(data: bytes, spec: VisionSpec) -> ImagePatches:
    """The whole stage: encoded image bytes -> the merged patches of the resized image."""
    pixels = decode_rgb(data)  # (H, W, 3) uint8
    side = spec.patch_size * spec.pooling_kernel_size  # pixels per merged patch side (48 for Gemma 4)
    max_patches = spec.max_soft_tokens * spec.pooling_kernel_size**2  # patch_size patches, before merging
    height, width = target_size(*pixels.shape[:2], spec.patch_size, max_patches, spec.pooling_kernel_size)
    return patchify(resize_bicubic(pixels, height, width), side)


# -- decode ----------------------------------------------------------------------------------------


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 RGB; transparency composited onto white (the reference's
    convert_to_rgb). Refuses oversized, corrupt and unsupported images with an ImageError."""
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"image is {len(data)} bytes, more than the {MAX_IMAGE_BYTES} accepted")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            _check_pixels(image.width, image.height)
            image.load()
            return np.asarray(_to_rgb(image))
    except Image.UnidentifiedImageError as e:
        raise ImageError(f"not an image this worker reads ({', '.join(FORMATS)})") from e
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise ImageError(f"corrupt image: {e}") from e


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"image is {width}x{height}, more than the {MAX_IMAGE_PIXELS} pixels accepted")
    if width < 1 or height < 1:
        raise ImageError(f"image is {width}x{height}")


def _to_rgb(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# -- resize ----------------------------------------------------------------------------------------


def target_size(
    height: int, width: int, patch_size: int, max_patches: int, pooling_kernel_size: int
) -> tuple[int, int]:
    """The reference's aspect-preserving size: the largest with sides multiples of patch_size *
    pooling_kernel_size and at most max_patches patches; a side that rounds to 0 gets one merged patch."""
    target_px = max_patches * patch_size**2
    factor = math.sqrt(target_px / (height * width))
    side = pooling_kernel_size * patch_size
    target_h = math.floor(factor * height / side) * side
    target_w = math.floor(factor * width / side) * side
    max_side = (max_patches // pooling_kernel_size**2) * side
    if target_h == 0 and target_w == 0:
        raise ImageError(f"image of {height}x{width} pixels resizes to nothing")
    if target_h == 0:
        target_h, target_w = side, min(width // height * side, max_side)
    elif target_w == 0:
        target_h, target_w = min(height // width * side, max_side), side
    if target_h * target_w > target_px:
        raise ImageError(f"image of {height}x{width} pixels does not fit {max_patches} patches")
    return target_h, target_w


def resize_bicubic(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8: torch's antialiased bicubic resize of uint8 images
    (what torchvision's resize runs on the CPU), width first, then height, each rounded back to uint8."""
    if pixels.shape[:2] == (height, width):
        return pixels
    horizontal = _resize_axis(pixels, width, axis=1)  # (H, width, 3)
    return _resize_axis(horizontal, height, axis=0)  # (height, width, 3)


def _resize_axis(pixels: np.ndarray, size: int, axis: int) -> np.ndarray:
    if pixels.shape[axis] == size:
        return pixels
    first, weights, bits = resize_taps(pixels.shape[axis], size)  # (size,), (size, taps), int
    shape = [1, 1, 1]
    shape[axis] = size
    acc = np.full([*pixels.shape[:axis], size, *pixels.shape[axis + 1 :]], 1 << (bits - 1), np.int32)
    last = pixels.shape[axis] - 1
    for tap in range(weights.shape[1]):  # a tap beyond a pixel's span has weight 0
        rows = np.take(pixels, np.minimum(first + tap, last), axis=axis).astype(np.int32)
        acc += rows * weights[:, tap].reshape(shape)
    return np.clip(acc >> bits, 0, 255).astype(np.uint8)


def resize_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per output pixel: the first input pixel, the int16 weights of its taps, and their fixed-point bits.
    The filter widens with the scale when shrinking (antialias); float weights are normalized per pixel,
    then scaled by the largest power of two that keeps the largest weight under 2^15 (torch's rule)."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = math.ceil(support) * 2 + 1
    center = scale * (np.arange(out_size) + 0.5)  # (out,)
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # truncation, as C++'s cast
    count = np.clip(np.minimum((center + support + 0.5).astype(np.int64), in_size) - first, 0, taps)
    offsets = np.arange(taps)  # (taps,)
    weights = _cubic((offsets + first[:, None] - center[:, None] + 0.5) * inv_scale)  # (out, taps)
    weights = np.where(offsets < count[:, None], weights, 0.0)
    total = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, total, out=np.zeros_like(weights), where=total != 0)
    bits = _weight_bits(float(weights.max()))
    scaled = weights * (1 << bits)
    fixed = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)  # round half away
    return first, fixed, bits


def _cubic(x: np.ndarray) -> np.ndarray:
    x, a = np.abs(x), CUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1  # |x| < 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 <= |x| < 2
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _weight_bits(largest: float) -> int:
    bits = 0
    while bits < 22 and int(0.5 + largest * (1 << (bits + 1))) < (1 << WEIGHT_BITS):
        bits += 1
    return bits


# -- patches ---------------------------------------------------------------------------------------


def patchify(pixels: np.ndarray, side: int) -> ImagePatches:
    """(H, W, 3) uint8 with H, W multiples of side -> merged patches, row-major over the patch grid,
    each flattened as (row, col, rgb), rescaled to [0, 1] (float32, as the reference's `x * (1/255)`)."""
    rows, cols = pixels.shape[0] // side, pixels.shape[1] // side
    blocks = pixels.reshape(rows, side, cols, side, 3).transpose(0, 2, 1, 3, 4)  # (rows, cols, side, side, 3)
    patches = blocks.reshape(rows * cols, side * side * 3).astype(np.float32) * np.float32(1 / 255)
    x, y = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")  # (rows, cols) each
    xy = np.stack([x, y], axis=-1).reshape(rows * cols, 2).astype(np.int64)  # (N, 2)
    return ImagePatches(patches, xy)
