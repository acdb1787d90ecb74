"""GGUF file -> cached safetensors folder in HF layout, converted once.

transformers reads GGUF (`load_gguf_checkpoint` dequantizes with the gguf package and undoes
llama.cpp's q/k row permutation for llama-arch models); we store the result as a normal HF folder so
every later start is a plain safetensors load. The weights are dequantized straight to the dtype the
engine runs in (float32 on CPU), never through a narrower one: a bf16 store would change most values
of a 4-bit file (134M of SmolLM2 Q4_1's 163M) and greedy output would drift from transformers' on the
same file. The cache key is the file's path, size, mtime and that dtype, and the folder appears by an
atomic rename, so a crash mid-conversion never leaves a half cache. Conversions into one cache take
turns (a lock on its gguf/ folder): a process that finds another converting the same file waits and
uses its folder rather than spending the same ~15 s of CPU beside it (several engines or test
workers starting on one machine with a cold cache).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from kubeinfer.engine.errors import ConfigError

logger = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def cache_dir() -> Path:
    """Where converted models live: $KUBEINFER_CACHE_DIR, else ~/.cache/kubeinfer."""
    return Path(os.environ.get("KUBEINFER_CACHE_DIR") or "~/.cache/kubeinfer").expanduser()


def gguf_cache_path(gguf_path: Path, root: Path | None = None,
                    dtype: torch.dtype = torch.float32) -> Path:
    """The folder a GGUF file converts into at `dtype`; a new file, the same path rewritten, or
    another dtype gets a new one."""
    real = Path(gguf_path).resolve()
    st = real.stat()
    name = _DTYPE_NAMES[dtype]
    key = hashlib.sha256(f"{real}|{st.st_size}|{st.st_mtime_ns}|{name}".encode()).hexdigest()[:16]
    return (root or cache_dir()) / "gguf" / f"{real.stem}-{name}-{key}"


def convert_gguf(gguf_path: Path, root: Path | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """The HF-layout folder for `gguf_path` dequantized to `dtype`, converting it on first use."""
    final = gguf_cache_path(gguf_path, root, dtype)
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _converting_into(final.parent):
        if (final / "config.json").is_file():
            return final  # the process we waited for converted it
        _convert_unlocked(gguf_path, final, dtype)
    return final


@contextlib.contextmanager
def _converting_into(folder: Path):
    """Hold the cache's lock (the folder itself is locked, so no lock file is left behind); wait,
    saying so, while another process holds it. A filesystem without flock converts unlocked (the
    atomic rename still keeps the cache whole)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another process is converting a GGUF file into %s; waiting for it", folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _convert_unlocked(gguf_path: Path, final: Path, dtype: torch.dtype) -> None:
    _remove_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        logger.info("converting %s to safetensors in %s (once; later starts reuse it)", gguf_path, final)
        write_hf_folder(Path(gguf_path).resolve(), tmp, dtype)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process converted it first; use theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale_temps(final: Path, max_age_s: float = 3600.0) -> None:
    """Drop temp folders that a killed conversion left; a younger one may be another live process's."""
    now = time.time()
    for tmp in final.parent.glob(f".{final.name}.*"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > max_age_s:
                shutil.rmtree(tmp, ignore_errors=True)


def write_hf_folder(gguf_path: Path, out: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write config.json, model.safetensors (at `dtype`), tokenizer files and generation_config.json
    to `out`."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        # A meta-device model costs no memory; transformers needs it to map GGUF names to HF names.
        with torch.device("meta"):
            hf_model = AutoModelForCausalLM.from_config(config)
        parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=hf_model,
                                      torch_dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ConfigError(f"cannot convert GGUF file {gguf_path}: {e}. kubeinfer reads GGUF through "
                          "transformers, which supports the common llama.cpp architectures; pass a "
                          "Hugging Face folder of the model instead.") from None
    tensors = parsed["tensors"]
    expected = set(hf_model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(tensors))
    if missing:
        raise ConfigError(f"GGUF file {gguf_path} lacks {len(missing)} tensors the "
                          f"{type(hf_model).__name__} needs (e.g. {', '.join(missing[:3])}); the file is "
                          "incomplete or of an unsupported layout. Pass a Hugging Face folder instead.")
    config.architectures = [type(hf_model).__name__]
    config.dtype = dtype
    config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    eos = config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    GenerationConfig(bos_token_id=config.bos_token_id, pad_token_id=getattr(config, "pad_token_id", None),
                     eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids or None
                     ).save_pretrained(out)
