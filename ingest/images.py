"""An uploaded image, checked before its session is announced: within the contract's limits and of a
format the worker decodes. Only the header is parsed; the worker decodes the pixels when it serves the
session (and refuses a file that is corrupt past its header with a `bad_image` event)."""

import io

from PIL import Image

from rawwave.contract import IMAGE_FORMATS, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from rawwave.errors import RawwaveError


class BadImageError(RawwaveError):
    """The upload's image cannot be served; the message says why, for the person who sent it."""

    code = "bad_image"


def check_image(data: bytes) -> None:
    if not data:
        raise BadImageError("the image part is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise BadImageError(f"image is {len(data)} bytes, more than the {MAX_IMAGE_BYTES} accepted")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
    except Image.UnidentifiedImageError as e:
        raise BadImageError(f"not an image rawwave reads ({', '.join(IMAGE_FORMATS)})") from e
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise BadImageError(f"corrupt image: {e}") from e
    if width * height > MAX_IMAGE_PIXELS:
        raise BadImageError(f"image is {width}x{height}, more than the {MAX_IMAGE_PIXELS} pixels accepted")
