"""MediaFetcher: an image URL -> its bytes, under the server's rules.

- `data:image/...;base64,...` always (see data_url.py).
- `http(s)://host/...` only when the host is allowed (`--allowed-media-domains`; None: any host),
  with a total time limit, a byte cap (checked on Content-Length and while reading) and every
  redirect checked against the same allow-list (else a redirect would reach a host that is not).
- `file://...` only under `--allowed-local-media-path`, after symlinks are resolved.

Blocking: call it from a worker thread (preprocessor.py does), never from the engine loop. Every
failure is a RequestError naming the field. A fetch ends within about twice the time limit (the
socket timeout bounds each read, the deadline is checked between reads); name resolution is the
system resolver's and not bounded here.
"""
from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

from kubeinfer.engine.errors import RequestError
from kubeinfer.engine.multimodal.config import MultiModalConfig
from kubeinfer.engine.multimodal.data_url import decode_data_url

_CHUNK = 64 * 1024


class MediaFetcher:
    def __init__(self, config: MultiModalConfig):
        self.config = config

    def fetch(self, url: str, field: str) -> bytes:
        """The bytes behind `url` (see the module docstring for what is allowed)."""
        if not isinstance(url, str) or not url:
            raise RequestError(f"{field}: the image URL must be a non-empty string", param=field)
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return decode_data_url(url, field, self.config.max_image_bytes)
        if scheme in ("http", "https"):
            return self._fetch_http(url, field)
        if scheme == "file":
            return self._read_file(url, field)
        raise RequestError(f"{field}: unsupported image URL scheme {scheme or url[:16]!r}; send a "
                           "data:image/...;base64 URL or an https URL", param=field)

    # ---- remote ----
    def check_host(self, url: str, field: str) -> None:
        """RequestError unless `url` is http(s) to an allowed host."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme.lower() not in ("http", "https") or not host:
            raise RequestError(f"{field}: {url[:200]!r} is not an http(s) URL with a host",
                               param=field)
        allowed = self.config.allowed_media_domains
        if allowed is not None and host not in allowed:
            what = (f"only images from {', '.join(allowed)}" if allowed
                    else "only data URLs (data:image/...;base64,...)")
            raise RequestError(f"{field}: this server does not fetch images from {host!r}; it takes "
                               f"{what} (--allowed-media-domains)", param=field)

    def _fetch_http(self, url: str, field: str) -> bytes:
        self.check_host(url, field)
        cap = self.config.max_image_bytes
        deadline = time.monotonic() + self.config.fetch_timeout_s
        opener = urllib.request.build_opener(_CheckedRedirects(self, field))
        request = urllib.request.Request(url, headers={"User-Agent": "kubeinfer"})
        try:
            with opener.open(request, timeout=self.config.fetch_timeout_s) as resp:
                length = resp.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > cap:
                    raise _too_big(field, cap)
                chunks, size = [], 0
                while True:
                    if time.monotonic() > deadline:
                        raise _timed_out(field, url, self.config.fetch_timeout_s)
                    chunk = resp.read1(_CHUNK)  # one recv, so a server that drips bytes
                    # still meets the deadline check
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > cap:
                        raise _too_big(field, cap)
                    chunks.append(chunk)
                return b"".join(chunks)
        except RequestError:
            raise
        except urllib.error.HTTPError as e:
            raise RequestError(f"{field}: fetching {url[:200]} returned HTTP {e.code}; check that "
                               "the image URL is right and public", param=field) from None
        except TimeoutError:
            raise _timed_out(field, url, self.config.fetch_timeout_s) from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise RequestError(f"{field}: could not fetch {url[:200]} ({reason}); check that the "
                               "host is reachable from the server, or send the image as a data URL",
                               param=field) from None

    # ---- local ----
    def _read_file(self, url: str, field: str) -> bytes:
        root = self.config.allowed_local_media_path
        if root is None:
            raise RequestError(f"{field}: this server does not read local files; send the image as a "
                               "data URL (or start it with --allowed-local-media-path)", param=field)
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise RequestError(f"{field}: a file URL names no host: file:///path/to/image.png",
                               param=field)
        try:
            path = Path(unquote(parts.path)).resolve()
        except (OSError, RuntimeError, ValueError):
            path = None
        if path is None or not path.is_relative_to(root):
            raise RequestError(f"{field}: {unquote(parts.path)[:200]!r} is outside the folder this "
                               f"server may read images from ({root})", param=field)
        if not path.is_file():
            raise RequestError(f"{field}: {path} is not a file", param=field)
        if path.stat().st_size > self.config.max_image_bytes:
            raise _too_big(field, self.config.max_image_bytes)
        return path.read_bytes()


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a host the allow-list admits."""

    def __init__(self, fetcher: MediaFetcher, field: str):
        self.fetcher, self.field = fetcher, field

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.fetcher.check_host(newurl, self.field)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _too_big(field: str, cap: int) -> RequestError:
    return RequestError(f"{field}: the image is larger than {cap} bytes; send a smaller image",
                        param=field)


def _timed_out(field: str, url: str, timeout: float) -> RequestError:
    return RequestError(f"{field}: fetching {url[:200]} took longer than {timeout:g} s; send the "
                        "image as a data URL or from a faster host", param=field)
