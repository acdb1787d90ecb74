#!/usr/bin/env python3
"""How xgrammar's accept scales over threads on this host, alone and beside a Python-busy thread.

    python3 benchmarks/bench_accept_scaling.py --tokenizer DIR [--rows 107]

CPU only. N matchers of benchmarks/schemas/lowercase_text.json inside the string each take a
random lowercase-word token per step through GrammarBatch.accept with 1..8 threads (chunks of
min_chunk_rows); then again while another thread runs pure Python (the engine thread's
scheduling and detokenizing), with the interpreter's default switch interval and 0.2 ms. Prints
one JSON line per setting: ms per step (median).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kubeinfer.engine.structured_output.grammar_batch import GrammarBatch  # noqa: E402
from kubeinfer.engine.structured_output.matcher import StructuredOutputMatcher  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--rows", type=int, default=107)
    p.add_argument("--steps", type=int, default=60)
    a = p.parse_args()
    import xgrammar as xgr
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=151936)
    schema = (Path(__file__).parent / "schemas" / "lowercase_text.json").read_text()
    compiled = xgr.GrammarCompiler(info).compile_json_schema(schema, any_whitespace=False)
    vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
    words = [i for i, t in enumerate(vocab)
             if t and all(c in "abcdefghijklmnopqrstuvwxyz " for c in t.replace("\u0120", " "))]
    prefix = tok.encode('{"text": "', add_special_tokens=False)
    rng = random.Random(0)
    stop = threading.Event()

    def busy():  # the engine thread's pure Python
        while not stop.is_set():
            sum(i * i for i in range(200))

    for busy_si in (None, 0.005, 0.0002):
        spinner = None
        if busy_si is not None:
            sys.setswitchinterval(busy_si)
            stop.clear()
            spinner = threading.Thread(target=busy, daemon=True)
            spinner.start()
        for threads in (1, 2, 4, 8, 12):
            batch = GrammarBatch(max_threads=threads)
            matchers = [StructuredOutputMatcher(compiled) for _ in range(a.rows)]
            for m in matchers:
                assert m.accept_tokens(prefix)
            times = []
            for _ in range(a.steps):
                tokens = [rng.choice(words) for _ in matchers]
                t0 = time.perf_counter()
                assert all(batch.accept(matchers, tokens))
                times.append(1e3 * (time.perf_counter() - t0))
            print(json.dumps({"rows": a.rows, "threads": threads,
                              "beside_busy_python": busy_si is not None,
                              "switch_interval": sys.getswitchinterval(),
                              "accept_ms": round(statistics.median(times), 3)}), flush=True)
        if spinner is not None:
            stop.set()
            spinner.join()


if __name__ == "__main__":
    main()
