"""Checkpoint tensors as (HF name, tensor) pairs, and dummy weights for speed runs."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from kubeinfer.engine.errors import ConfigError


def weight_files(folder: Path, load_format: str = "auto") -> tuple[list[Path], str]:
    """The checkpoint files to read and their format, 'safetensors' or 'pt'.

    An index file, when present, names the shards, which keeps stray files (Mistral's extra
    consolidated.safetensors) out. load_format 'auto' prefers safetensors over pytorch_model*.bin.
    """
    if load_format in ("auto", "safetensors", "gguf"):
        files = _indexed_or_glob(folder, "model.safetensors.index.json", "*.safetensors")
        if len(files) > 1:
            files = [f for f in files if not f.name.startswith("consolidated")] or files
        if files:
            return files, "safetensors"
    if load_format in ("auto", "pt"):
        files = _indexed_or_glob(folder, "pytorch_model.bin.index.json", "pytorch_model*.bin")
        if files:
            return files, "pt"
    wanted = {"safetensors": "*.safetensors", "pt": "pytorch_model*.bin"}.get(
        load_format, "*.safetensors or pytorch_model*.bin")
    raise ConfigError(f"no weights in {folder}: found no {wanted} files. Point MODEL at a folder with the "
                      "checkpoint, pick the matching --load-format, or use --load-format dummy for random "
                      "weights (benchmarks).")


def _indexed_or_glob(folder: Path, index_name: str, pattern: str) -> list[Path]:
    index = folder / index_name
    if not index.is_file():
        return sorted(folder.glob(pattern))
    with open(index, encoding="utf-8") as f:
        names = sorted(set(json.load(f)["weight_map"].values()))
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise ConfigError(f"{index} names shards that are missing: {', '.join(missing)}. The download is "
                          "incomplete; download the model again.")
    return [folder / n for n in names]


def iterate_weights(folder: Path, load_format: str = "auto") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, on CPU, one shard at a time (with a progress bar)."""
    files, fmt = weight_files(Path(folder), load_format)
    for path in tqdm(files, desc=f"Loading {fmt} checkpoint shards", unit="shard"):
        if fmt == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
            del state


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights of the configured shapes, as vLLM's --load-format dummy: normal(0, 0.02) for
    matrices, 1 for norm weights, 0 for biases; the same seed gives the same weights on a device."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if param.dim() > 1:
            gen = generators.get(param.device)
            if gen is None:
                gen = generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            param.normal_(0.0, 0.02, generator=gen)
        elif "norm" in name.rsplit(".", 2)[-2].lower():  # RMSNorm's `norm`, BERT's `LayerNorm`
            param.fill_(1.0)
        else:
            param.zero_()
