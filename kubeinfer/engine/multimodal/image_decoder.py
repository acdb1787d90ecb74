"""Image bytes -> an RGB PIL image, with limits: known formats only, a pixel cap checked from the
header before any pixel is decoded (a decompression bomb never allocates), truncated or corrupt data
refused. Every failure is a RequestError naming the field.
"""
from __future__ import annotations

import io

from kubeinfer.engine.errors import RequestError

# Formats browsers and phones produce. Pillow would also open EPS (through Ghostscript) and many
# rarer formats; a request should not reach those parsers.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def decode_image(data: bytes, field: str, max_pixels: int):
    """Decode `data` to an RGB `PIL.Image.Image` (first frame of an animation)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise RequestError(f"{field}: the data is not an image in a supported format "
                           f"({', '.join(IMAGE_FORMATS)})", param=field) from None
    except Image.DecompressionBombError:
        raise _too_large(field, None, max_pixels) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise RequestError(f"{field}: the image could not be read ({e})", param=field) from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise RequestError(f"{field}: the image has no pixels ({width}x{height})", param=field)
    if width * height > max_pixels:
        raise _too_large(field, (width, height), max_pixels)
    try:
        img.seek(0)
        img.load()
        return img.convert("RGB") if img.mode != "RGB" else img
    except Image.DecompressionBombError:
        raise _too_large(field, (width, height), max_pixels) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise RequestError(f"{field}: the image data is truncated or corrupt ({e})",
                           param=field) from None


def _too_large(field: str, size: tuple[int, int] | None, max_pixels: int) -> RequestError:
    what = f"{size[0]}x{size[1]} pixels" if size else "too many pixels"
    return RequestError(f"{field}: the image has {what}, more than the limit of {max_pixels}; "
                        "scale it down before sending it", param=field)
