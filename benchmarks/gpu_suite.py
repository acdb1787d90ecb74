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


def steps(a: argparse.Namespace) -> dict[str, tuple[list[str], int]]:
    py = sys.executable
    llama = os.path.join(a.models, "llama-3.1-8b-shape")
    qwen = os.path.join(a.models, "qwen3-0.6b-shape")
    gemma2 = os.path.join(a.models, "gemma-2-9b-shape")
    phi3 = os.path.join(a.models, "phi-3-mini-shape")
    moe = os.path.join(a.models, "qwen3-30b-a3b-shape")
    bench = [py, "-m", "kubeinfer.bench"]
    return {
        "ceilings": ([py, "-c", CEILINGS], 60),
        "tests": ([py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                   "tests/engine/test_gpu_engine.py", "-k", "not pipeline_parallel"], 200),
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
        "tests_tp": ([py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                      "tests/engine/test_gpu_engine.py", "-k", "tensor_parallel"], 150),
        "tests_pp": ([py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                      "tests/engine/test_gpu_engine.py", "-k", "pipeline_parallel"], 150),
        "llama_tp2": (bench + ["throughput", "--model", llama, "--load-format", "dummy",
                               "--num-prompts", "256", "--input-len", "512", "--output-len", "256",
                               "--max-model-len", "1024", "--tensor-parallel-size", "2"], 120),
        # two pipeline stages of 16 layers, one batch in flight, eager (no CUDA graphs with PP)
        "llama_pp2": (bench + ["throughput", "--model", llama, "--load-format", "dummy",
                               "--num-prompts", "256", "--input-len", "512", "--output-len", "256",
                               "--max-model-len", "1024", "--pipeline-parallel-size", "2"], 180),
        "latency_tp2": (bench + ["latency", "--model", llama, "--load-format", "dummy",
                                 "--batch-size", "1", "--input-len", "512", "--output-len", "256",
                                 "--num-iters", "3", "--num-iters-warmup", "1", "--max-model-len",
                                 "1024", "--max-num-seqs", "8", "--tensor-parallel-size", "2"], 100),
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
        # lowercase words, so a random-weight model rarely closes it and lengths stay comparable),
        # beside "qwen_json_free", the same run unconstrained; prints the mask's fill time per step
        "qwen_json": (bench + ["throughput", "--model", qwen, "--load-format", "dummy",
                               "--num-prompts", "256", "--input-len", "562", "--output-len", "562",
                               "--random-range-ratio", "0.822", "--max-model-len", "2048",
                               "--json-schema", "benchmarks/schemas/lowercase_text.json"], 400),
        "qwen_json_free": (bench + ["throughput", "--model", qwen, "--load-format", "dummy",
                                    "--num-prompts", "256", "--input-len", "562", "--output-len",
                                    "562", "--random-range-ratio", "0.822", "--max-model-len",
                                    "2048"], 400),
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
