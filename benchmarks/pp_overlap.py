"""Do pipeline stages overlap? A CPU harness: 2 stages on gloo, each stage's forward made to cost
a known T ms, steady-state time per step with 1 and with 2 steps in flight, and a timeline per rank.

    python3 benchmarks/pp_overlap.py --stage-ms 30 --num-reqs 16 --output-len 48

With perfect overlap two stages finish a step every T ms (2 in flight); with 1 in flight a step
crosses both stages, 2T. Whatever is above that is host work on the critical path; the timeline
(`--timeline FILE`, JSON lines: rank, event, start, end on the system-wide monotonic clock) says
where each rank waited: `launch` (a stage's share of a step, with `compute` and `recv` inside),
`send`, `read` (rank 0 waiting for a step's results), `schedule`, `process` (outputs), `result` (the
sampling rank reading a step's results to hand them back).

The stage cost is a sleep added after each stage's real forward (a tiny Llama: hidden 64, 2
layers): it holds no core, so the numbers stand on a shared 2-core machine. The patches are made
when this module is imported, and spawned workers import the main module again (multiprocessing's
spawn), so every rank runs them; the timeline directory and T travel in the environment.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kubeinfer.engine import model_runner, parallel_state, pipeline_step  # noqa: E402

_DIR_ENV, _MS_ENV = "PP_OVERLAP_TIMELINE_DIR", "PP_OVERLAP_STAGE_MS"
_events: list = []


def _record(name: str, start: float) -> None:
    _events.append((parallel_state.global_rank(), name, start, time.monotonic()))
    if len(_events) >= 64:
        flush()


def flush() -> None:
    out = os.environ.get(_DIR_ENV)
    if out and _events:
        with open(Path(out) / f"{os.getpid()}.jsonl", "a") as f:
            for rank, name, start, end in _events:
                f.write(json.dumps({"rank": rank, "event": name, "start": start,
                                    "end": end}) + "\n")
    _events.clear()


def _timed(name: str, fn, after=None):
    def wrapper(*args, **kwargs):
        start = time.monotonic()
        try:
            result = fn(*args, **kwargs)
            if after is not None:
                after()
            return result
        finally:
            _record(name, start)
    return wrapper


def _patch_ranks() -> None:
    """Every rank: the stage's forward costs T ms more; launches, sends, receives are recorded."""
    global _patched
    if _MS_ENV not in os.environ or _patched:
        return
    _patched = True
    stage_s = float(os.environ[_MS_ENV]) / 1e3
    real_send, real_recv, launch = (pipeline_step.pp_send_next, pipeline_step.pp_recv_prev,
                                    pipeline_step._launch)

    def compute() -> None:
        start = time.monotonic()
        time.sleep(stage_s)
        _record("compute", start)

    def send(tensors):
        compute()  # this stage's cost, before its hidden states go on to the next stage
        start = time.monotonic()
        real_send(tensors)
        _record("send", start)

    def costly_launch(runner, step, inputs):
        start = time.monotonic()
        launch(runner, step, inputs)
        if pipeline_step.is_last_stage():
            compute()  # the last stage sends nothing: its cost ends the launch
        _record("launch", start)

    pipeline_step.pp_send_next = send
    pipeline_step.pp_recv_prev = _timed("recv", real_recv)
    pipeline_step._launch = costly_launch
    # the sampling rank reading a step's results (to push them, or when asked)
    model_runner.ModelRunner.get_output = _timed("result", model_runner.ModelRunner.get_output)


_patched = False
_patch_ranks()


def _tiny_llama(out: Path) -> Path:
    import torch
    import transformers

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=512, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    return out


def _run(model: Path, args, depth: int, timeline_dir: Path) -> dict:
    from kubeinfer import LLM, SamplingParams

    os.environ[_DIR_ENV] = str(timeline_dir)
    llm = LLM(str(model), pipeline_parallel_size=2, dtype="float32", device="cpu",
              skip_tokenizer_init=True, max_model_len=256, max_num_batched_tokens=512,
              num_gpu_blocks_override=256, max_num_seqs=args.num_reqs)
    engine = llm.engine
    engine._max_in_flight = depth
    # the same micro-batch (half the requests) either way; with 1 in flight the scheduler would
    # otherwise take a half of those left, and the running half again each step
    half = -(-args.num_reqs // 2)
    engine.scheduler.in_flight.step_limit = lambda num_unfinished, max_num_seqs: half
    engine.scheduler.schedule = _timed("schedule", engine.scheduler.schedule)
    engine.executor.get_output = _timed("read", engine.executor.get_output)
    engine._process = _timed("process", engine._process)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        for i in range(args.num_reqs):
            engine.add_request(str(i), [(7 * i + j) % 500 + 1 for j in range(args.input_len)],
                               params)
        start = time.monotonic()
        while engine.has_unfinished_requests():
            engine.step()
        wall = time.monotonic() - start
        peak = engine.peak_steps_in_flight
    finally:
        flush()
        engine.shutdown()
    reads = sorted(e[3] for e in _load(timeline_dir) if e[1] == "read" and e[0] == 0)
    steady = reads[len(reads) // 5: len(reads) - len(reads) // 5]  # no ramp-up, no drain
    per_step = (steady[-1] - steady[0]) / (len(steady) - 1)
    return {"steps_in_flight": depth, "peak_steps_in_flight": peak, "steps": len(reads),
            "step_ms": round(per_step * 1e3, 2), "wall_s": round(wall, 3)}


def _load(timeline_dir: Path) -> list:
    events = []
    for f in timeline_dir.glob("*.jsonl"):
        for line in f.read_text().splitlines():
            e = json.loads(line)
            events.append((e["rank"], e["event"], e["start"], e["end"]))
    return events


def _summary(events: list) -> dict:
    """Total seconds per (rank, event)."""
    totals: dict = {}
    for rank, name, start, end in events:
        totals[f"rank{rank}.{name}"] = round(totals.get(f"rank{rank}.{name}", 0.0) + end - start, 3)
    return dict(sorted(totals.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage-ms", type=float, default=30.0, help="each stage's cost per step (T)")
    ap.add_argument("--num-reqs", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--timeline", default=None, help="write every rank's events here (JSON lines)")
    args = ap.parse_args()
    os.environ[_MS_ENV] = str(args.stage_ms)
    # one torch thread a rank: the stage cost is the sleep, not two processes fighting for cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _patch_ranks()
    with tempfile.TemporaryDirectory() as tmp:
        model = _tiny_llama(Path(tmp) / "model")
        results = []
        for depth in (1, 2):
            timeline_dir = Path(tmp) / f"timeline{depth}"
            timeline_dir.mkdir()
            result = _run(model, args, depth, timeline_dir)
            result["ideal_step_ms"] = args.stage_ms * (3 - depth)
            events = _load(timeline_dir)
            result["totals_s"] = _summary(events)
            results.append(result)
            if args.timeline:
                with open(args.timeline, "a") as f:
                    for rank, name, start, end in sorted(events, key=lambda e: e[2]):
                        f.write(json.dumps({"in_flight": depth, "rank": rank, "event": name,
                                            "start": start, "end": end}) + "\n")
        for r in results:
            print(json.dumps(r))
        print(json.dumps({"overlap_speedup": round(results[0]["step_ms"] / results[1]["step_ms"],
                                                   3)}))


if __name__ == "__main__":
    main()
