"""Engine configuration: frozen dataclasses validated on construction.

Errors raised here are `ConfigError`s whose message says what was wrong and what to do; the CLI prints
them without a stack trace.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from kubeinfer.engine.errors import ConfigError


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KI": 1024, "KIB": 1024, "M": 1000**2, "MB": 1000**2,
          "MI": 1024**2, "MIB": 1024**2, "G": 1000**3, "GB": 1000**3, "GI": 1024**3, "GIB": 1024**3,
          "T": 1000**4, "TB": 1000**4, "TI": 1024**4, "TIB": 1024**4}


def parse_bytes(text: str | int) -> int:
    """'4GiB' -> 4294967296, '512MB' -> 512000000, '1000' -> 1000."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(f"cannot read {text!r} as a size: write bytes or a number with a unit, "
                          "such as 4GiB, 512MiB or 2GB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


DTYPES = ("auto", "bfloat16", "float16", "float32", "half", "float", "bf16", "fp16", "fp32")
RUNNERS = ("auto", "generate", "pooling")
# vLLM's --model-impl; "vllm" is accepted as vLLM spells native
MODEL_IMPLS = ("auto", "native", "transformers", "vllm")
POOLING_TYPES = ("MEAN", "CLS", "LAST")
LOAD_FORMATS = ("auto", "safetensors", "pt", "gguf", "dummy")
# generation_config.json keys that become default sampling parameters, as vLLM reads them
GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to run and how to load it. `model` is a local folder, a .gguf file or a hub id."""

    model: str
    tokenizer: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    load_format: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    trust_remote_code: bool = False
    served_model_name: tuple[str, ...] = ()
    chat_template: str | None = None
    skip_tokenizer_init: bool = False
    generation_config: str = "auto"  # auto: sampling defaults from generation_config.json; vllm: none
    override_generation_config: tuple[tuple[str, float], ...] = ()
    # auto: pooling (embeddings) for encoder-only architectures, generate otherwise, as vLLM's --runner
    runner: str = "auto"
    # the pooling runner's pooler, over the model folder's: (("pooling_type", "MEAN"), ("normalize", True))
    pooler_config: tuple[tuple[str, object], ...] = ()
    # auto: a native class when there is one, else the transformers backend (as vLLM's --model-impl)
    model_impl: str = "auto"

    def __post_init__(self) -> None:
        if self.model_impl not in MODEL_IMPLS:
            raise ConfigError(f"--model-impl must be one of {', '.join(MODEL_IMPLS)}, got "
                              f"{self.model_impl!r}")
        pooler = dict(self.pooler_config)
        unknown = sorted(set(pooler) - {"pooling_type", "normalize"})
        if unknown:
            raise ConfigError(f"--pooler-config has unknown keys {unknown}; allowed: pooling_type "
                              "(MEAN, CLS or LAST), normalize (true or false)")
        if "pooling_type" in pooler and str(pooler["pooling_type"]).upper() not in POOLING_TYPES:
            raise ConfigError(f"--pooler-config pooling_type must be one of "
                              f"{', '.join(POOLING_TYPES)}, got {pooler['pooling_type']!r}")
        if "normalize" in pooler and not isinstance(pooler["normalize"], bool):
            raise ConfigError(f"--pooler-config normalize must be true or false, got "
                              f"{pooler['normalize']!r}")
        if self.runner not in RUNNERS:
            raise ConfigError(f"--runner must be one of {', '.join(RUNNERS)}, got {self.runner!r}")
        if self.generation_config not in ("auto", "vllm"):
            raise ConfigError(f"--generation-config must be auto or vllm, got {self.generation_config!r}")
        unknown = sorted({k for k, _ in self.override_generation_config} - set(GENERATION_KEYS))
        if unknown:
            raise ConfigError(f"--override-generation-config has unknown keys {unknown}; allowed: "
                              f"{', '.join(GENERATION_KEYS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is not supported; choose one of "
                              "auto, bfloat16, float16, float32")
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(f"--load-format {self.load_format!r} is not supported; choose one of "
                              f"{', '.join(LOAD_FORMATS)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"--max-model-len must be a positive integer, got {self.max_model_len}")

    @property
    def served_names(self) -> tuple[str, ...]:
        return self.served_model_name or (self.model,)


@dataclass(frozen=True)
class CacheConfig:
    """KV cache: block size, how much memory to use, prefix caching."""

    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # bytes; on CPU the default is DEFAULT_CPU_KV_BYTES
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None

    DEFAULT_CPU_KV_BYTES = 1 << 30

    def __post_init__(self) -> None:
        if self.block_size not in (1, 8, 16, 32, 64, 128):
            raise ConfigError(f"--block-size must be one of 1, 8, 16, 32, 64, 128, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("--gpu-memory-utilization must be in (0, 1], got "
                              f"{self.gpu_memory_utilization}; 0.9 leaves room for activations")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError(f"--kv-cache-memory must be positive, got {self.kv_cache_memory}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ConfigError("--num-gpu-blocks-override must be at least 1")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits: tokens per step and running requests."""

    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    enable_chunked_prefill: bool = True
    # launch step N+1 before reading step N's tokens, so host work overlaps the GPU (as vLLM's
    # --async-scheduling); EOS and stop conditions are then seen one step late. None: on for CUDA
    # (measured faster, docs/benchmarks.md), off for CPU, where nothing runs in parallel to overlap
    async_scheduling: bool | None = None
    # fcfs: arrival order; priority: lower `priority` first (then arrival), and the running request
    # with the highest value (the latest among equals) is the one preempted (vLLM's policies)
    scheduling_policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ConfigError(f"--scheduling-policy must be fcfs or priority, got "
                              f"{self.scheduling_policy!r}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"--max-num-seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError("--max-num-batched-tokens must be at least 1, got "
                              f"{self.max_num_batched_tokens}")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    def __post_init__(self) -> None:
        for flag, v in (("--tensor-parallel-size", self.tensor_parallel_size),
                        ("--pipeline-parallel-size", self.pipeline_parallel_size)):
            if v < 1:
                raise ConfigError(f"{flag} must be at least 1, got {v}")
        if self.pipeline_parallel_size != 1:
            raise ConfigError(
                f"--pipeline-parallel-size={self.pipeline_parallel_size} is not supported yet: "
                "kubeinfer splits a model over the GPUs of one node with --tensor-parallel-size. "
                "Use --pipeline-parallel-size=1 and set --tensor-parallel-size to the node's GPU count.")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "auto"  # auto | cuda | cpu
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"--device must be auto, cuda or cpu, got {self.device!r}")

    def resolve(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; "
                              "use --device cpu or run on a GPU node")
        return self.device


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
