"""Whether a model and the machine can take a --tensor-parallel-size, checked before any worker
process starts, with what to use instead."""
from __future__ import annotations

from typing import Any

from kubeinfer.engine.errors import ConfigError


def _intermediate_size(hf_config: Any) -> int:
    """The MLP width under each family's name for it: intermediate_size (Llama, NeoX),
    ffn_hidden_size (Falcon), n_inner (GPT-2, GPTBigCode), expansion_ratio x d_model (MPT);
    4 x hidden where the config leaves it implicit (Bloom, GPT-2's default)."""
    for key in ("intermediate_size", "ffn_hidden_size", "n_inner"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int):
            return value
    return int(getattr(hf_config, "expansion_ratio", 4) * hf_config.hidden_size)


def check_tensor_parallel(hf_config: Any, tp: int, device_type: str, num_gpus: int) -> None:
    """Refuse a --tensor-parallel-size the model or the machine cannot take, before any process
    starts, with what to do instead."""
    if tp == 1:
        return
    if device_type == "cuda" and num_gpus < tp:
        raise ConfigError(f"--tensor-parallel-size={tp} needs {tp} GPUs but {num_gpus} "
                          f"{'is' if num_gpus == 1 else 'are'} visible; ask for {tp} GPUs "
                          "(nvidia.com/gpu) or lower --tensor-parallel-size")
    from kubeinfer.engine.models.registry import tensor_parallel_refusal

    refusal = tensor_parallel_refusal(hf_config)
    if refusal:
        raise ConfigError(refusal)
    # a vision-language config nests the decoder's, which is what the ranks split (the vision
    # tower is replicated)
    hf_config = hf_config.get_text_config()
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    # MLP widths split over the ranks: the dense MLP's (each family's name for it) and, in
    # mixture-of-experts models, each expert's and the shared expert's.
    mlp = [("intermediate_size", _intermediate_size(hf_config))]
    mlp += [(n, getattr(hf_config, n)) for n in ("moe_intermediate_size",
                                                 "shared_expert_intermediate_size")
            if getattr(hf_config, n, None)]
    checks = [("num_attention_heads", heads, heads % tp == 0),
              ("num_key_value_heads", kv_heads, kv_heads % tp == 0 or tp % kv_heads == 0),
              *[(name, size, size % tp == 0) for name, size in mlp]]
    for name, value, ok in checks:
        if not ok:
            fits = [d for d in range(1, 9) if heads % d == 0 and all(s % d == 0 for _, s in mlp)
                    and (kv_heads % d == 0 or d % kv_heads == 0)]
            raise ConfigError(f"--tensor-parallel-size={tp} does not divide the model's {name} "
                              f"({value}); use one of {fits}")
