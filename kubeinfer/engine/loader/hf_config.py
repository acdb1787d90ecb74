"""What the engine reads from a model folder besides weights: config, tokenizer, EOS ids, context limit."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.layers.rotary import scaled_max_position

# Config keys that bound the context, as vLLM reads them; the smallest one present wins.
_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                 "model_max_length", "max_sequence_length", "max_seq_length", "seq_len")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "spiece.model", "tekken.json")
_DEFAULT_MAX_LEN = 2048  # vLLM's fallback for configs that state no limit


def load_hf_config(path: Path, model_config: Any) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=model_config.trust_remote_code)
    except ValueError as e:
        raise ConfigError(f"cannot read {Path(path) / 'config.json'}: {e}. If the model needs custom "
                          "code, pass --trust-remote-code.") from None


def get_max_model_len(hf_config: Any, max_model_len: int | None = None) -> int:
    """The context length to serve: the model's own limit, or the user's --max-model-len below it."""
    limits = {k: getattr(hf_config, k) for k in _MAX_LEN_KEYS
              if isinstance(getattr(hf_config, k, None), int)}
    if limits:
        key = min(limits, key=limits.get)
        model_limit, source = scaled_max_position(hf_config, limits[key]), key
    else:
        model_limit, source = _DEFAULT_MAX_LEN, "no limit in config.json; default"
    if max_model_len is None:
        return model_limit
    if max_model_len > model_limit:
        raise ConfigError(f"--max-model-len ({max_model_len}) is larger than the model's maximum context "
                          f"length ({model_limit}, from {source} in config.json and its RoPE scaling). "
                          f"Pass --max-model-len {model_limit} or less.")
    return max_model_len


def has_tokenizer(path: Path) -> bool:
    return any((Path(path) / f).is_file() for f in _TOKENIZER_FILES)


def load_tokenizer(path: Path, model_config: Any) -> Any:
    """AutoTokenizer from --tokenizer when given, else from the model folder.

    Raises ConfigError when the folder holds no tokenizer (config-only benchmark folders).
    """
    from transformers import AutoTokenizer

    if model_config.tokenizer:
        from kubeinfer.engine.loader.resolve import resolve_model_path

        path = resolve_model_path(model_config.tokenizer, getattr(model_config, "revision", None))
    if not has_tokenizer(path):
        raise ConfigError(f"{path} holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)}). Pass "
                          "--tokenizer NAME_OR_PATH, or --skip-tokenizer-init for benchmarks that send "
                          "token ids only.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path),
                                                  trust_remote_code=model_config.trust_remote_code)
    except (ValueError, OSError) as e:
        raise ConfigError(f"cannot load the tokenizer in {path}: {e}. Pass --trust-remote-code if it "
                          "needs custom code, --tokenizer NAME_OR_PATH for another one, or "
                          "--skip-tokenizer-init for benchmarks that send token ids only.") from None
    if model_config.chat_template:
        tokenizer.chat_template = model_config.chat_template
    return tokenizer


def get_eos_token_ids(path: Path, tokenizer: Any = None, hf_config: Any = None) -> list[int]:
    """Token ids that end generation: generation_config.json's eos_token_id (an int or a list; the
    config's when that file is absent) together with the tokenizer's eos token, in that order."""
    gen_file = Path(path) / "generation_config.json"
    value = None
    if gen_file.is_file():
        with open(gen_file, encoding="utf-8") as f:
            value = json.load(f).get("eos_token_id")
    elif hf_config is not None:
        value = getattr(hf_config, "eos_token_id", None)
    ids = [value] if isinstance(value, int) else list(value or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))
