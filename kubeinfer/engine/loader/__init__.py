"""Model loading, split by concern: resolve.py (MODEL argument -> local folder: a folder, a .gguf
converted once, or a hub id), gguf.py (the conversion cache), weights.py (checkpoint files, dummy
weights), model.py (dtype, build, load), hf_config.py (config, tokenizer, EOS ids, context length),
meta_init.py and hf_weights.py (the transformers backend). Callers import from the module that owns
the function; every error a user can cause is a ConfigError saying what to do."""
