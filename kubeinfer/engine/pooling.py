"""How an embedding model turns hidden states into one vector per input: the pooler.

The pooling method and whether to L2-normalize come, as vLLM reads them, from the model folder's
sentence-transformers files: `modules.json` lists Transformer -> Pooling [-> Normalize] and the
Pooling module's `config.json` says which mode (`pooling_mode_mean_tokens`, `_cls_token`,
`_lasttoken`). A folder without them gets the model's default, as vLLM's: the [CLS] token for an
encoder (BertModel, XLMRobertaModel), the last token for a decoder (gte-Qwen2, e5-mistral), both
normalized. `--pooler-config` overrides either.

A sequence classifier pools inside its own head (as HF's); `class_probabilities` turns its logits
into what /classify returns.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kubeinfer.engine.config import POOLING_TYPES
from kubeinfer.engine.errors import ConfigError
# sentence-transformers Pooling config key -> our pooling type
_ST_MODES = {"pooling_mode_mean_tokens": "MEAN", "pooling_mode_cls_token": "CLS",
             "pooling_mode_lasttoken": "LAST"}
_ST_UNSUPPORTED = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                   "pooling_mode_weightedmean_tokens")
_ST_MODULE = "sentence_transformers.models."


@dataclass(frozen=True)
class PoolerConfig:
    pooling_type: str = "CLS"
    normalize: bool = True
    source: str = "default"  # where it came from, for the log line

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ConfigError(f"pooling type {self.pooling_type!r} is not supported; choose one of "
                              f"{', '.join(POOLING_TYPES)}")


def load_pooler_config(path: Path, overrides: dict | None = None,
                       default_pooling_type: str = "CLS") -> PoolerConfig:
    """The model folder's pooler (sentence-transformers config, else `default_pooling_type` +
    normalize), with `overrides` ({"pooling_type": ..., "normalize": ...}, from --pooler-config)
    on top."""
    overrides = overrides or {}
    config = (_from_sentence_transformers(Path(path), "pooling_type" in overrides)
              or PoolerConfig(pooling_type=default_pooling_type))
    if overrides:
        config = PoolerConfig(pooling_type=str(overrides.get("pooling_type",
                                                             config.pooling_type)).upper(),
                              normalize=bool(overrides.get("normalize", config.normalize)),
                              source=f"{config.source} + --pooler-config")
    return config


def _from_sentence_transformers(path: Path, type_given: bool = False) -> PoolerConfig | None:
    """The pooler sentence-transformers files describe, None without them. `type_given`: the
    user chose the pooling type, so a mode we do not run is no error."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text())
        kinds = {m["type"].removeprefix(_ST_MODULE): m.get("path", "") for m in modules}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"cannot read {modules_file}: {e}") from None
    extra = sorted(set(kinds) - {"Transformer", "Pooling", "Normalize"})
    if extra:
        raise ConfigError(f"{modules_file} lists sentence-transformers modules kubeinfer does not "
                          f"run ({', '.join(extra)}); only Transformer -> Pooling -> Normalize is "
                          "supported")
    if "Pooling" not in kinds:
        return None
    pooling_file = path / kinds["Pooling"] / "config.json"
    try:
        pooling = json.loads(pooling_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read the pooling config {pooling_file}: {e}") from None
    unsupported = [k.removeprefix("pooling_mode_") for k in _ST_UNSUPPORTED if pooling.get(k)]
    modes = [v for k, v in _ST_MODES.items() if pooling.get(k)]
    if type_given:
        modes = modes[:1] or ["CLS"]  # replaced by the user's choice
    elif unsupported or len(modes) != 1:
        raise ConfigError(f"{pooling_file} asks for pooling {unsupported + modes or 'none'}; "
                          "kubeinfer supports exactly one of mean, cls and lasttoken. Pass "
                          "--pooler-config '{\"pooling_type\": \"MEAN\"}' to choose one.")
    return PoolerConfig(pooling_type=modes[0], normalize="Normalize" in kinds,
                        source="sentence-transformers config")


def pool(hidden: torch.Tensor, mask: torch.Tensor, config: PoolerConfig) -> torch.Tensor:
    """hidden [B, L, H] of right-padded rows, mask [B, L] (True: a real token) -> float32 [B, H]."""
    hidden = hidden.float()
    if config.pooling_type == "MEAN":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        out = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    elif config.pooling_type == "CLS":
        out = hidden[:, 0]
    else:  # LAST: the last real token of each row
        last = mask.sum(1) - 1
        out = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return F.normalize(out, p=2, dim=-1) if config.normalize else out


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Classifier logits [B, num_labels] -> float32 probabilities: softmax over the labels, or, for
    a single-logit head (a reward model, a cross-encoder score), its sigmoid, as vLLM does."""
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[-1] == 1 else torch.softmax(logits, dim=-1)
