"""MultiModalConfig: the limits of the multimodal input path, and the parsing of their flags.

Flag names are vLLM's: `--limit-mm-per-prompt '{"image": N}'`, `--allowed-media-domains a.com b.org`
(absent: any host, as vLLM; given with no value: data URLs only, what a pod should run with, as
examples/vlm.yaml does, since a server that fetches any URL it is given is an SSRF hole inside a
cluster) and `--allowed-local-media-path DIR` (file:// URLs, only under DIR). The remaining limits
(fetch timeout, byte and pixel caps) have kubeinfer's defaults and may be set here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubeinfer.engine.errors import ConfigError

MODALITIES = ("image",)
DEFAULT_IMAGES_PER_PROMPT = 8  # vLLM allows 999 by default; each image costs hundreds of tokens
DEFAULT_FETCH_TIMEOUT_S = 10.0
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
# 25 megapixels covers phone photos (12-24 MP) and 4K frames; a decoded RGB image of this size is
# 75 MB before the processor turns it into floats, so larger ones are refused before decoding.
DEFAULT_MAX_IMAGE_PIXELS = 25_000_000


def parse_limit_mm_per_prompt(value: str | dict[str, Any] | None) -> dict[str, int]:
    """`--limit-mm-per-prompt` (vLLM's JSON form, '{"image": 4}') or a dict -> {modality: count}.
    Modalities not named keep the default; an unknown modality or a negative count is a ConfigError."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--limit-mm-per-prompt {value!r} is not JSON ({e.msg}); write it as "
                              "vLLM does, e.g. '{\"image\": 4}'") from None
    if not isinstance(value, dict):
        raise ConfigError("--limit-mm-per-prompt must be a JSON object such as '{\"image\": 4}'")
    out: dict[str, int] = {}
    for name, count in value.items():
        if name not in MODALITIES:
            raise ConfigError(f"--limit-mm-per-prompt names modality {name!r}; kubeinfer accepts "
                              f"{', '.join(MODALITIES)}")
        if isinstance(count, dict):  # vLLM also accepts {"image": {"count": 2, ...}}
            count = count.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError(f"--limit-mm-per-prompt: the {name} count must be an integer >= 0, "
                              f"not {count!r}")
        out[name] = count
    return out


@dataclass(frozen=True)
class MultiModalConfig:
    """Limits of the media path. `allowed_media_domains` None means any host (vLLM's default); an
    empty tuple means data URLs only. Hosts match exactly, case-insensitively (as vLLM)."""

    limit_per_prompt: dict[str, int] = field(default_factory=dict)
    allowed_media_domains: tuple[str, ...] | None = None
    allowed_local_media_path: str | None = None
    fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    num_workers: int = 2  # preprocessing threads; image decoding never runs on the engine loop

    def __post_init__(self):
        object.__setattr__(self, "limit_per_prompt", parse_limit_mm_per_prompt(self.limit_per_prompt))
        if self.allowed_media_domains is not None:
            domains = (self.allowed_media_domains,) if isinstance(self.allowed_media_domains, str) \
                else self.allowed_media_domains
            object.__setattr__(self, "allowed_media_domains",
                               tuple(d.strip().lower() for d in domains if d.strip()))
        if self.allowed_local_media_path is not None:
            path = Path(self.allowed_local_media_path).expanduser()
            if not path.is_dir():
                raise ConfigError(f"--allowed-local-media-path {self.allowed_local_media_path} is not "
                                  "an existing folder; pass the folder whose images requests may read")
            object.__setattr__(self, "allowed_local_media_path", str(path.resolve()))
        for name in ("fetch_timeout_s", "max_image_bytes", "max_image_pixels", "num_workers"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"multimodal {name} must be > 0, not {getattr(self, name)!r}")

    @classmethod
    def from_model_config(cls, model_config: Any) -> MultiModalConfig:
        """The limits of the engine's ModelConfig (its --limit-mm-per-prompt,
        --allowed-media-domains and --allowed-local-media-path)."""
        return cls(limit_per_prompt=dict(getattr(model_config, "limit_mm_per_prompt", ()) or ()),
                   allowed_media_domains=getattr(model_config, "allowed_media_domains", None),
                   allowed_local_media_path=getattr(model_config, "allowed_local_media_path", None))

    def limit(self, modality: str) -> int:
        return self.limit_per_prompt.get(modality, DEFAULT_IMAGES_PER_PROMPT)
