"""The whole GPU run in one call: ceilings, GPU tests, kernel benchmark, engine vs HF peer.

    python3 benchmarks/gpu_suite.py --steps ceilings,tests,kernels,llama,latency,qwen --peer PEER.py \
        --models MODELS_DIR --out OUT_DIR

Each step runs as a subprocess with its own time limit; every JSON line a step prints is collected.
The last thing printed is a short table; the full log and a JSON file go to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CEILINGS = r"""
import json, torch, triton
x = torch.randn(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda"); y = torch.empty_like(x)
ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda"); b = torch.randn_like(a)
ms2 = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
print(json.dumps(dict(step="ceilings", gpu=torch.cuda.get_device_name(),
      copy_TBps=round(2 * x.numel() * 2 / ms / 1e9, 3), bf16_TFLOPs=round(2 * 8192**3 / ms2 / 1e9, 1),
      torch=torch.__version__, triton=triton.__version__)))
"""


# The online benchmark: `kubeinfer serve` on the dummy Llama shape, loaded by `kubeinfer bench serve`.
# Needs fastapi and uvicorn on the device (carry wheels: the device tool's README says how).
SERVE = r"""
import subprocess, sys, time, urllib.request
model, prompts, in_len, out_len, vocab, max_len = sys.argv[1:7]
port = "8011"
srv = subprocess.Popen([sys.executable, "-m", "kubeinfer.cli", "serve", model, "--load-format",
                        "dummy", "--skip-tokenizer-init", "--port", port, "--max-model-len", max_len,
                        "--served-model-name", "llama", "--disable-log-requests"])
try:
    while srv.poll() is None:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health").status == 200:
                break
        except OSError:
            time.sleep(0.5)
    if srv.poll() is not None:
        sys.exit(f"the server exited with code {srv.returncode} before it was healthy")
    for rate in ("8", "inf"):
        subprocess.run([sys.executable, "-m", "kubeinfer.cli", "bench", "serve", "--base-url",
                        f"http://127.0.0.1:{port}", "--model", "llama", "--num-prompts", prompts,
                        "--input-len", in_len, "--output-len", out_len, "--request-rate", rate,
                        "--vocab-size", vocab, "--return-token-ids"], check=False)
finally:
    srv.terminate()
    srv.wait(60)
"""


# A step that needs an architecture the engine may not have yet: a clear line and exit 1 before
# the command runs (argv: architecture, command...).
NEEDS_ARCH = r"""
import os, sys
from kubeinfer.engine.models.registry import supported_architectures
arch, cmd = sys.argv[1], sys.argv[2:]
if arch not in supported_architectures():
    sys.exit(f"this step needs {arch} in kubeinfer's model registry (models/registry.py), which "
             "this tree does not have yet; merge the branch that adds it and run the step again")
os.execv(cmd[0], cmd)
"""

# A VLM's time to first token (one request, one image, idle engine) beside its compute floor:
# `kubeinfer bench latency --image-size`, then roofline_model.vlm_ttft_floor for the prompt it
# measured, at the data-sheet peaks of the GPU it ran on (argv: step name, image size, bench args).
VLM_TTFT = r"""
import json, subprocess, sys
sys.path.insert(0, "benchmarks")
from roofline_model import gpu_peaks, vlm_ttft_floor
name, image_size, model, bench = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
p = subprocess.run([sys.executable, "-m", "kubeinfer.bench", "latency", model, "--image-size",
                    str(image_size), *bench], capture_output=True, text=True)
sys.stderr.write(p.stderr[-4000:])
rows = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
if p.returncode != 0 or not rows:
    sys.exit(f"kubeinfer bench latency failed (rc {p.returncode})")
row = rows[-1]
try:
    peaks = gpu_peaks(row["device"])
except ValueError as e:
    print(json.dumps(row))
    sys.exit(f"no floor: {e}")
floor = vlm_ttft_floor(model, image_size, round(row["mean_prompt_len"]), *peaks)
ttft = row["time_to_first_token_ms"]
print(json.dumps(dict(step=name, ttft_ms=ttft, floor_ms=floor["floor_ms"],
                      ttft_over_floor=round(ttft / floor["floor_ms"], 2), bench=row, floor=floor)))
print(f"TTFT {ttft} ms vs floor {floor['floor_ms']} ms (compute {floor['compute_ms']} ms + "
      f"weight read {floor['weight_read_ms']} ms)")
"""


def vlm_steps(a: argparse.Namespace) -> dict[str, tuple[list[str], int]]:
    """The vision-language rows: 256 chat requests with one image each (LLaVA 1.5: 336 x 336,
    576 image tokens; Qwen2.5-VL: 448 x 448, 256 image tokens), 64 words of text, 128 output
    tokens, EOS ignored, random weights. Ours: all 256 submitted at once, output tok/s = output
    tokens / wall time from the first add to the last token. The HF peer: the same 256 requests
    (same ids and pixel values, seed 0) in static batches of 64 `generate` calls, bf16, sdpa,
    output tok/s = output tokens / the summed batch times (about a minute on an H100 for these
    shapes; 7-8B in bf16 plus the KV cache of 64 x 770 tokens fits one 80 GB GPU). Both process
    the images before the clock starts. Then the TTFT of one request with one image at idle
    against roofline_model.py's floor."""
    py = sys.executable
    bench = [py, "-m", "kubeinfer.bench"]
    rows: dict[str, tuple[list[str], int]] = {}
    for name, folder, size, arch in (
            ("llava", "llava-1.5-7b-shape", 336, "LlavaForConditionalGeneration"),
            ("qwen_vl", "qwen2.5-vl-7b-shape", 448, "Qwen2_5_VLForConditionalGeneration")):
        model = os.path.join(a.models, folder)
        load = ["--load-format", "dummy", "--max-model-len", "1024"]
        work = ["--image-size", str(size), "--input-len", "64", "--output-len", "128"]
        guard = [py, "-c", NEEDS_ARCH, arch]
        rows[name] = (guard + bench + ["throughput", model, *load, *work, "--num-prompts", "256",
                                       "--seed", "0"], 300)
        rows[f"{name}_peer"] = (guard + [py, a.peer, "--model", model, "--mode", "static",
                                         "--prompts", "256", "--static-batch", "64", *work], 300)
        # where its time goes: host phases, GPU busy over prefill steps and decode steps
        rows[f"prof_{name}"] = (guard + [py, "benchmarks/profile_bench_phases.py", "--host-ops", "--window",
                                         "3:13,90:110", "--", model, *load, *work,
                                         "--num-prompts", "256", "--seed", "0"], 300)
        rows[f"{name}_ttft"] = (guard + [py, "-c", VLM_TTFT, f"{name}_ttft", str(size), model,
                                         *load, "--input-len", "64", "--output-len", "8",
                                         "--batch-size", "1", "--num-iters", "5",
                                         "--num-iters-warmup", "2", "--max-num-seqs", "8"], 200)
    return rows


def steps(a: argparse.Namespace) -> dict[str, tuple[list[str], int]]:
    py = sys.executable
    llama = os.path.join(a.models, "llama-3.1-8b-shape")
    llama70b = os.path.join(a.models, "llama-3.1-70b-shape")
    qwen = os.path.join(a.models, "qwen3-0.6b-shape")
    gemma2 = os.path.join(a.models, "gemma-2-9b-shape")
    phi3 = os.path.join(a.models, "phi-3-mini-shape")
    moe = os.path.join(a.models, "qwen3-30b-a3b-shape")
    bench = [py, "-m", "kubeinfer.bench"]
    ttft = ["--model", llama, "--load-format", "dummy", "--input-len", "512", "--max-model-len",
            "1024", "--max-num-seqs", "8"]
    return {
        "ceilings": ([py, "-c", CEILINGS], 60),
        "tests": ([py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                   "tests/engine/test_gpu_engine.py", "tests/engine/multimodal/test_qwen2_vl_gpu.py",
                   "-k", "not pipeline_parallel"], 420),
        # the GPU-only kernel tests (every Triton kernel against its torch reference at real
        # sizes). Running all of tests/kernels compiled on an H100 (fifth session) hit failures
        # in tests written for the CPU interpreter and ran past 400 s: see docs/benchmarks.md.
        "kernel_tests": ([py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                          "tests/kernels"], 300),
        "kernels": ([py, "benchmarks/bench_kernels.py"], 300),
        "llama": (bench + ["throughput", "--model", llama, "--load-format", "dummy",
                           "--num-prompts", "256", "--input-len", "512", "--output-len", "256",
                           "--max-model-len", "1024"], 220),
        "llama_sync": (bench + ["throughput", "--model", llama, "--load-format", "dummy",
                                "--num-prompts", "256", "--input-len", "512", "--output-len", "256",
                                "--max-model-len", "1024", "--no-async-scheduling"], 220),
        "latency_sync": (bench + ["latency", "--model", llama, "--load-format", "dummy",
                                  "--batch-size", "1", "--input-len", "512", "--output-len", "256",
                                  "--num-iters", "3", "--num-iters-warmup", "1",
                                  "--max-model-len", "1024", "--max-num-seqs", "8",
                                  "--no-async-scheduling"], 120),
        # the TP engine's greedy ids (custom all-reduce on) and the custom all-reduce against NCCL
        "tests_tp": ([py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                      "tests/engine/test_gpu_engine.py", "tests/engine/test_custom_all_reduce.py",
                      "-k", "tensor_parallel"], 300),
        "tests_pp": ([py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                      "tests/engine/test_gpu_engine.py", "-k", "pipeline_parallel"], 150),
        "llama_tp2": (bench + ["throughput", "--model", llama, "--load-format", "dummy",
                               "--num-prompts", "256", "--input-len", "512", "--output-len", "256",
                               "--max-model-len", "1024", "--tensor-parallel-size", "2"], 120),
        # two pipeline stages of 16 layers, two steps in flight (each with half of the running
        # requests: its JSON line says peak_steps_in_flight 2), CUDA graphs per stage; compare
        # with "llama" (one GPU) from the same call
        "llama_pp2": (bench + ["throughput", "--model", llama, "--load-format", "dummy",
                               "--num-prompts", "256", "--input-len", "512", "--output-len", "256",
                               "--max-model-len", "1024", "--pipeline-parallel-size", "2"], 220),
        # Llama 3.1 70B (141 GB in bf16) on two GPUs, dummy weights created per rank on its GPU:
        # tensor parallel, then two pipeline stages of 40 layers; roofline:
        # roofline_model.py benchmarks/models/llama-3.1-70b-shape --tp 2 (or --pp 2) --tbps --tflops
        "llama70b_tp2": (bench + ["throughput", "--model", llama70b, "--load-format", "dummy",
                                  "--num-prompts", "256", "--input-len", "512", "--output-len",
                                  "256", "--max-model-len", "1024", "--tensor-parallel-size", "2",
                                  "--gpu-memory-utilization", "0.95"], 420),
        "llama70b_pp2": (bench + ["throughput", "--model", llama70b, "--load-format", "dummy",
                                  "--num-prompts", "256", "--input-len", "512", "--output-len",
                                  "256", "--max-model-len", "1024", "--pipeline-parallel-size", "2",
                                  "--gpu-memory-utilization", "0.95"], 420),
        "latency_tp2": (bench + ["latency", "--model", llama, "--load-format", "dummy",
                                 "--batch-size", "1", "--input-len", "512", "--output-len", "256",
                                 "--num-iters", "3", "--num-iters-warmup", "1", "--max-model-len",
                                 "1024", "--max-num-seqs", "8", "--tensor-parallel-size", "2"], 100),
        "latency_tp2_nccl": (bench + ["latency", "--model", llama, "--load-format", "dummy",
                                      "--batch-size", "1", "--input-len", "512", "--output-len",
                                      "256", "--num-iters", "3", "--num-iters-warmup", "1",
                                      "--max-model-len", "1024", "--max-num-seqs", "8",
                                      "--tensor-parallel-size", "2", "--disable-custom-all-reduce"],
                             100),
        # NCCL vs the custom kernels at every message size, in graphs and eager (thresholds)
        "allreduce_tp2": ([py, "benchmarks/bench_all_reduce.py", "--world-size", "2"], 150),
        # where TTFT goes (benchmarks/profile_ttft.py): host phases, prefill GPU time, kernels by
        # kind, at TP 1, TP 2 and TP 2 on NCCL only
        "ttft_profile": ([py, "benchmarks/profile_ttft.py", *ttft], 150),
        "ttft_tp2_profile": ([py, "benchmarks/profile_ttft.py", *ttft, "-tp", "2"], 150),
        "ttft_tp2_nccl_profile": ([py, "benchmarks/profile_ttft.py", *ttft, "-tp", "2",
                                   "--disable-custom-all-reduce"], 150),
        "llama_serve": ([py, "-c", SERVE, llama, "256", "512", "256", "128256", "1024"], 300),
        "llama_peer": ([py, a.peer, "--model", llama, "--mode", "static", "--prompts", "256",
                        "--input-len", "512", "--output-len", "256"], 150),
        "latency": (bench + ["latency", "--model", llama, "--load-format", "dummy",
                             "--batch-size", "1", "--input-len", "512", "--output-len", "256",
                             "--num-iters", "3", "--num-iters-warmup", "1", "--max-model-len", "1024",
                             "--max-num-seqs", "8"], 120),
        "qwen": (bench + ["throughput", "--model", qwen, "--load-format", "dummy",
                          "--num-prompts", "256", "--input-len", "562", "--output-len", "562",
                          "--random-range-ratio", "0.822", "--max-model-len", "2048"], 400),
        # Structured outputs: the same 256 requests, every one under a JSON schema (a string of
        # lowercase words; a random-weight model still closes it early in about a quarter of the
        # tokens), then its unconstrained twin (the same requests held to the lengths they got
        # under the schema); "qwen_json_free" is the run unconstrained at its own lengths.
        # Prints the mask's fill and accept time per step.
        "qwen_json": (bench + ["throughput", "--model", qwen, "--load-format", "dummy",
                               "--num-prompts", "256", "--input-len", "562", "--output-len", "562",
                               "--random-range-ratio", "0.822", "--max-model-len", "2048",
                               "--json-schema", "benchmarks/schemas/lowercase_text.json",
                               "--unconstrained-twin"], 400),
        "qwen_json_free": (bench + ["throughput", "--model", qwen, "--load-format", "dummy",
                                    "--num-prompts", "256", "--input-len", "562", "--output-len",
                                    "562", "--random-range-ratio", "0.822", "--max-model-len",
                                    "2048"], 400),
        # "qwen_json" / "qwen_json_free" with the tokenizer loaded in both (the same run but for
        # the schema: a JSON run detokenizes, so the unconstrained one must too)
        "qwen_json_free_detok": (bench + ["throughput", "--model", qwen, "--load-format", "dummy",
                                          "--num-prompts", "256", "--input-len", "562",
                                          "--output-len", "562", "--random-range-ratio", "0.822",
                                          "--max-model-len", "2048", "--detokenize"], 400),
        # where the host's time goes in those runs (profile_bench_phases.py), the grammar masks
        # on the engine's thread or on their own
        **{name: ([py, "benchmarks/profile_bench_phases.py", *flags, "--window", "200:230", "--",
                   qwen, "--load-format", "dummy", "--num-prompts", "256", "--input-len", "562",
                   "--output-len", "562", "--random-range-ratio", "0.822", "--max-model-len",
                   "2048", *run], 400)
           for name, flags, run in (
               ("prof_json_free", [], ["--detokenize"]),
               # the matchers in the worker process (the default), on the engine's mask thread,
               # and inline on the engine thread; each with its unconstrained twin
               ("prof_json", [], ["--json-schema", "benchmarks/schemas/lowercase_text.json",
                                  "--unconstrained-twin"]),
               ("prof_json_thread", ["--grammar-worker", "off", "--mask-thread", "on"],
                ["--json-schema", "benchmarks/schemas/lowercase_text.json"]),
               ("prof_json_w2", ["--worker-threads", "2"],
                ["--json-schema", "benchmarks/schemas/lowercase_text.json"]),
               ("prof_json_w8", ["--worker-threads", "8"],
                ["--json-schema", "benchmarks/schemas/lowercase_text.json"]),
               ("prof_json_inline", ["--grammar-worker", "off", "--mask-thread", "off"],
                ["--json-schema", "benchmarks/schemas/lowercase_text.json"]))},
        # the all-decode attention kernel's tile settings on the VLM and Llama decode shapes
        "sweep_decode_attention": ([py, "benchmarks/sweep_decode_attention.py"], 400),
        # the host half of "qwen_json" alone (CPU): 256 matchers' accept and fill per step, one by
        # one and through xgrammar's batch calls
        "grammar_mask": ([py, "benchmarks/bench_grammar_mask.py", "--steps", "48"], 300),
        # Native Gemma 2 / Phi-3 next to "llama" (same prompts): their roofline fraction is the
        # number to compare with Llama's.
        "tests_native": ([py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                          "tests/engine/test_native_models.py"], 200),
        "tests_models": ([py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                          "tests/engine/test_native_models.py", "tests/engine/test_moe_models.py",
                          "tests/engine/test_alibi_models.py"], 300),
        # Gemma 3 / PaliGemma 2 images: the attention kernel's bidirectional-span path, vs HF
        "tests_vlm": ([py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                       "tests/engine/multimodal/test_bidirectional_vlms.py"], 200),
        "gemma2": (bench + ["throughput", "--model", gemma2, "--load-format", "dummy",
                            "--num-prompts", "256", "--input-len", "512", "--output-len", "256",
                            "--max-model-len", "1024"], 300),
        "phi3": (bench + ["throughput", "--model", phi3, "--load-format", "dummy",
                          "--num-prompts", "256", "--input-len", "512", "--output-len", "256",
                          "--max-model-len", "1024"], 220),
        # Qwen3-30B-A3B (MoE, 128 experts, top-8): the fused-MoE path at the workload; the HF
        # peer in static batches of 64 (its experts run one after another in Python)
        "moe": (bench + ["throughput", "--model", moe, "--load-format", "dummy",
                         "--num-prompts", "256", "--input-len", "512", "--output-len", "256",
                         "--max-model-len", "1024"], 400),
        "moe_peer": ([py, a.peer, "--model", moe, "--mode", "static", "--prompts", "64",
                      "--input-len", "512", "--output-len", "256"], 400),
        # the transformers backend on the Llama shape, beside "llama" (native)
        "llama_tf": (bench + ["throughput", "--model", llama, "--load-format", "dummy",
                              "--num-prompts", "256", "--input-len", "512", "--output-len", "256",
                              "--max-model-len", "1024", "--model-impl", "transformers"], 300),
        "qwen_peer": ([py, a.peer, "--model", qwen, "--mode", "static", "--prompts", "64",
                       "--input-len", "562", "--output-len", "562"], 300),
        **vlm_steps(a),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default="ceilings,tests,kernels,llama,llama_peer,latency,qwen,qwen_peer")
    ap.add_argument("--peer", default="benchmarks/hf_peer.py")
    ap.add_argument("--models", default="benchmarks/models")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    table = steps(a)
    results, log = [], open(os.path.join(a.out, "gpu_suite.log"), "w")
    for name in a.steps.split(","):
        cmd, limit = table[name]
        t = time.time()
        try:
            p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
            rc, text = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, text = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        dt = time.time() - t
        log.write(f"===== {name} rc={rc} {dt:.0f}s\n{text}\n")
        log.flush()
        rows = [json.loads(l) for l in text.splitlines() if l.startswith("{") and l.endswith("}")]
        results.append(dict(step=name, rc=rc, seconds=round(dt), json=rows,
                            tail=text.strip().splitlines()[-3:] if rc != 0 else []))
        print(f"[{name}] rc={rc} {dt:.0f}s", flush=True)
        for r in rows:
            print("   ", json.dumps(r), flush=True)
        if rc != 0:
            print("   tail:", *text.strip().splitlines()[-15:], sep="\n      ", flush=True)
    with open(os.path.join(a.out, "gpu_suite.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
