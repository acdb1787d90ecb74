"""`kubeinfer bench serve`: load a running OpenAI-compatible server, as vLLM's `bench serve` does.

Random-token prompts go to `/v1/completions` as token ids, streamed, with `ignore_eos` so every
request produces exactly --output-len tokens (vLLM, SGLang and kubeinfer all take it). Requests
arrive as a Poisson process at --request-rate (inf: all at once), at most --max-concurrency in
flight. One JSON line comes out with vLLM's field names (request_throughput, output_throughput,
mean/median/p99 of ttft, tpot, itl and e2el in ms), so results from our server and a vLLM server in
the same cluster compare directly.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between streamed chunks after the first
    latency: float = 0.0


def add_parser(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("serve", help="load a running server over HTTP; prints one JSON line")
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="the server, without /v1 (e.g. http://llama.default.svc:8000)")
    p.add_argument("--model", required=True, help="the served model name to send")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="prompt token ids are drawn from [100, vocab-size)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second (Poisson arrivals); inf sends them all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="seconds for one request")
    p.add_argument("--return-token-ids", action="store_true",
                   help="ask for token ids in every chunk (vLLM's return_token_ids): a server "
                        "started with --skip-tokenizer-init streams no text to time")
    p.set_defaults(func=run_serve)


def _check(args: argparse.Namespace) -> None:
    for name in ("num_prompts", "input_len", "output_len", "vocab_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1, "
                             f"got {getattr(args, name)}")
    if args.vocab_size <= 100:
        raise SystemExit(f"error: --vocab-size must be above 100, got {args.vocab_size}")
    if not 0 <= args.random_range_ratio < 1:
        raise SystemExit(f"error: --random-range-ratio must be in [0, 1), got {args.random_range_ratio}")
    if not args.request_rate > 0:
        raise SystemExit(f"error: --request-rate must be positive (or inf), got {args.request_rate}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise SystemExit(f"error: --max-concurrency must be at least 1, got {args.max_concurrency}")


def _lengths(rng: random.Random, n: int, length: int, ratio: float) -> list[int]:
    lo, hi = max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


async def _one(client, args: argparse.Namespace, prompt: list[int], max_tokens: int) -> RequestResult:
    body = {"model": args.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if args.return_token_ids:
        body["return_token_ids"] = True
    result = RequestResult(prompt_len=len(prompt))
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue  # the usage-only chunk at the end
                now = time.perf_counter()
                if not result.ttft:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = time.perf_counter() - start
    result.ok = result.ttft > 0
    if not result.ok:
        result.error = "the stream carried no tokens"
    return result


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "std": 0.0, "p99": 0.0}
    ordered = sorted(values)
    return {"mean": statistics.fmean(ordered) * 1e3, "median": statistics.median(ordered) * 1e3,
            "std": statistics.pstdev(ordered) * 1e3,
            "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3}


async def _run(args: argparse.Namespace) -> dict:
    import httpx

    rng = random.Random(args.seed)
    in_lens = _lengths(rng, args.num_prompts, args.input_len, args.random_range_ratio)
    out_lens = _lengths(rng, args.num_prompts, args.output_len, args.random_range_ratio)
    prompts = [[rng.randrange(100, args.vocab_size) for _ in range(n)] for n in in_lens]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = asyncio.Semaphore(args.max_concurrency or args.num_prompts)
    limits = httpx.Limits(max_connections=args.max_concurrency or args.num_prompts)

    async with httpx.AsyncClient(base_url=args.base_url.rstrip("/"), headers=headers,
                                 timeout=args.timeout, limits=limits) as client:
        async def limited(prompt: list[int], max_tokens: int) -> RequestResult:
            async with limit:
                return await _one(client, args, prompt, max_tokens)

        tasks = []
        start = time.perf_counter()
        for prompt, max_tokens in zip(prompts, out_lens):
            tasks.append(asyncio.create_task(limited(prompt, max_tokens)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start

    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_len for r in done)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    report = {"completed": len(done), "failed": len(results) - len(done),
              "duration_s": round(duration, 3), "total_input_tokens": in_tokens,
              "total_output_tokens": out_tokens,
              "request_throughput": round(len(done) / duration, 3),
              "output_throughput": round(out_tokens / duration, 1),
              "total_token_throughput": round((in_tokens + out_tokens) / duration, 1),
              "max_concurrency": args.max_concurrency, "request_rate": args.request_rate}
    for name, values in (("ttft", [r.ttft for r in done]), ("tpot", tpots),
                         ("itl", [t for r in done for t in r.itl]),
                         ("e2el", [r.latency for r in done])):
        for stat, v in _summary(values).items():
            report[f"{stat}_{name}_ms"] = round(v, 3)
    errors = [r.error for r in results if not r.ok]
    if errors:
        report["first_error"] = errors[0]
    return report


def run_serve(args: argparse.Namespace) -> int:
    _check(args)
    report = asyncio.run(_run(args))
    if report["request_rate"] == float("inf"):
        report["request_rate"] = "inf"
    print(json.dumps(report), flush=True)
    return 0 if report["failed"] == 0 else 1
