"""Whether a model and the machine can take a --pipeline-parallel-size, checked before any worker
process starts, with what to use instead."""
from __future__ import annotations

from typing import Any

from kubeinfer.engine.config import EngineConfig
from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.pipeline_stage import check_partition, layer_split


def check_pipeline_parallel(hf_config: Any, config: EngineConfig, device_type: str,
                            num_gpus: int) -> None:
    """Refuse a pipeline the model or the machine cannot run: a family without stage support,
    fewer layers than stages, a partition that does not add up, too few GPUs."""
    par = config.parallel
    pp, tp = par.pipeline_parallel_size, par.tensor_parallel_size
    if pp == 1:
        return
    from kubeinfer.engine.models.registry import pipeline_parallel_refusal

    refusal = pipeline_parallel_refusal(hf_config, config.model.model_impl)
    if refusal:
        raise ConfigError(refusal)
    num_layers = hf_config.num_hidden_layers
    check_partition(par.pp_layer_partition or layer_split(num_layers, pp), num_layers, pp)
    if device_type == "cuda" and num_gpus < tp * pp:
        raise ConfigError(f"--pipeline-parallel-size={pp} x --tensor-parallel-size={tp} needs "
                          f"{tp * pp} GPUs but {num_gpus} {'is' if num_gpus == 1 else 'are'} "
                          "visible; ask for more GPUs (nvidia.com/gpu) or lower the sizes")
