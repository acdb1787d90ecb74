"""Data URLs (RFC 2397) as chat requests carry images: `data:image/png;base64,....`.

Only base64 image data is taken; anything else is a RequestError that names the field.
"""
from __future__ import annotations

import base64
import binascii

from kubeinfer.engine.errors import RequestError


def decode_data_url(url: str, field: str, max_bytes: int) -> bytes:
    """The bytes of a base64 `data:image/...` URL. The encoded length is checked before decoding, so
    an oversized payload is refused without allocating it."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise RequestError(f"{field}: a data URL needs a comma between its header and its data, as "
                           "in data:image/png;base64,iVBOR...", param=field)
    params = header[len("data:"):].split(";")
    mime = params[0].strip().lower()
    if not mime.startswith("image/"):
        raise RequestError(f"{field}: the data URL's media type is {mime or 'missing'!r}, not an "
                           "image; send data:image/png;base64,... (or jpeg, webp, gif)", param=field)
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise RequestError(f"{field}: the data URL is not base64-encoded; send "
                           f"data:{mime};base64,<base64 data>", param=field)
    payload = "".join(payload.split())  # line breaks inside base64 are common and harmless
    if len(payload) * 3 // 4 > max_bytes:
        raise RequestError(f"{field}: the image is larger than {max_bytes} bytes; send a smaller "
                           "image", param=field)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{field}: the data URL's base64 data is corrupt (characters outside the "
                           "base64 alphabet or a wrong length); encode the image again",
                           param=field) from None
