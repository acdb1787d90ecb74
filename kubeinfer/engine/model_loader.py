"""Model loading, the engine's one entry point: MODEL argument -> folder -> model, tokenizer, limits.

    path = resolve_model(model_config)                  # folder, .gguf (converted once) or hub id
    model, hf_config = load_model(model_config, device, path=path)
    tokenizer = load_tokenizer(path, model_config)      # unless --skip-tokenizer-init
    eos_ids = get_eos_token_ids(path, tokenizer, hf_config)
    max_model_len = get_max_model_len(hf_config, model_config.max_model_len)

Every error a user can cause is a ConfigError saying what was wrong and what to do. The work is split
by concern under kubeinfer/engine/loader/: resolve.py (local/GGUF/hub), gguf.py (conversion cache),
weights.py (checkpoint files, dummy weights), model.py (dtype, build, load), hf_config.py (tokenizer,
EOS ids, context length).
"""
from kubeinfer.engine.loader.gguf import cache_dir, convert_gguf
from kubeinfer.engine.loader.hf_config import (get_eos_token_ids, get_max_model_len, has_tokenizer,
                                               load_hf_config, load_tokenizer)
from kubeinfer.engine.loader.model import config_dtype, load_model, resolve_dtype
from kubeinfer.engine.loader.resolve import find_default_gguf, resolve_model, resolve_model_path
from kubeinfer.engine.loader.weights import init_dummy_weights, iterate_weights, weight_files

__all__ = ["cache_dir", "config_dtype", "convert_gguf", "find_default_gguf", "get_eos_token_ids",
           "get_max_model_len", "has_tokenizer", "init_dummy_weights", "iterate_weights",
           "load_hf_config", "load_model", "load_tokenizer", "resolve_dtype", "resolve_model",
           "resolve_model_path", "weight_files"]
