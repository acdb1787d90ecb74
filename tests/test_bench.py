"""`kubeinfer bench`: runs on a config-only folder with dummy weights, prints one JSON line, and
answers bad flags with one clear line."""
import json
import shutil
from pathlib import Path

import pytest

from kubeinfer.cli import main


@pytest.fixture(scope="module")
def config_only(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("config-only")
    shutil.copy(tiny_model_dir("qwen3") / "config.json", out / "config.json")
    return out


def test_throughput_on_config_only_folder(config_only, capsys):
    # the model as the positional MODEL, as `kubeinfer serve MODEL` takes it
    assert main(["bench", "throughput", str(config_only), "--load-format", "dummy",
                 "--num-prompts", "6", "--input-len", "20", "--output-len", "5",
                 "--random-range-ratio", "0.5", "--max-model-len", "128"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_requests"] == 6 and result["device"] == "cpu"
    assert result["output_tokens"] >= 6 * 2 and result["output_tokens_per_second"] > 0


def test_latency_on_config_only_folder(config_only, capsys):
    assert main(["bench", "latency", "--model", str(config_only), "--load-format", "dummy",
                 "--batch-size", "2", "--input-len", "16", "--output-len", "4", "--num-iters", "1",
                 "--num-iters-warmup", "0", "--max-model-len", "128"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["time_per_output_token_ms"] > 0 and result["batch_size"] == 2
    assert "custom_all_reduce" not in result  # reported with tensor parallelism only


def test_tensor_parallel_runs_report_whether_the_custom_all_reduce_ran():
    from types import SimpleNamespace

    from kubeinfer.bench import _parallel
    from kubeinfer.engine.config import EngineConfig, ParallelConfig

    engine = SimpleNamespace(config=EngineConfig(parallel=ParallelConfig(tensor_parallel_size=2)))
    # no tensor group in this process: NCCL (or gloo) does every all-reduce
    assert _parallel(engine) == {"tensor_parallel_size": 2, "custom_all_reduce": False}


def test_throughput_with_a_json_schema(config_only, tiny_model_dir, tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"t": {"type": "string", '
                      '"pattern": "^[a-z ]*$"}}, "required": ["t"]}')
    assert main(["bench", "throughput", str(config_only), "--load-format", "dummy",
                 "--num-prompts", "4", "--input-len", "20", "--output-len", "6",
                 "--max-model-len", "128", "--json-schema", str(schema),
                 "--tokenizer", str(tiny_model_dir("qwen3")), "--unconstrained-twin"]) == 0
    result, twin = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()[-2:]]
    # the twin: the same requests without the schema, each held to its constrained length
    assert twin["twin_of"] == str(schema) and "mask_fill_ms_per_step" not in twin
    assert twin["output_tokens"] == result["output_tokens"] and twin["detokenize"]
    assert twin["constrained_vs_twin"] > 0
    assert result["num_requests"] == 4 and result["mask_fill_ms_per_step"] > 0
    assert result["mask_accept_ms_per_step"] > 0  # the output tokens reached their matchers
    assert result["mask_wait_ms_per_step"] >= 0  # the engine thread's wait for the mask thread
    # every reply its grammar ended parses and validates (the others ran out of tokens)
    assert result["json_replies"] == 4 and result["json_valid"] == result["json_stopped"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "nope"}')
    with pytest.raises(SystemExit, match="not a valid JSON schema"):
        main(["bench", "throughput", str(config_only), "--load-format", "dummy",
              "--num-prompts", "1", "--input-len", "4", "--output-len", "2", "--max-model-len",
              "128", "--json-schema", str(bad), "--tokenizer", str(tiny_model_dir("qwen3"))])


@pytest.mark.parametrize("args, message", [
    (["--num-prompts", "0"], "--num-prompts must be at least 1, got 0"),
    (["--unconstrained-twin"], "--unconstrained-twin compares with a --json-schema run"),
    (["--random-range-ratio", "1.5"], "--random-range-ratio must be in [0, 1), got 1.5"),
    ([], None),
])
def test_bad_flags_get_one_clear_line(config_only, args, message):
    base = ["bench", "throughput", "--load-format", "dummy"]
    if message is None:
        message, args = "kubeinfer bench throughput needs a model: a folder with config.json", []
    else:
        base += ["--model", str(config_only)]
    with pytest.raises(SystemExit) as e:
        main(base + args)
    assert message in str(e.value)


@pytest.mark.parametrize("command", ["throughput", "latency"])
def test_help_describes_the_model_argument_that_exists(command, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"kubeinfer bench {command} MODEL" in out and "MODEL_FLAG" not in out
    assert "--model MODEL         same as the positional MODEL" in out


def test_positional_and_flag_name_the_same_model(config_only):
    from kubeinfer.cli import build_parser
    from kubeinfer.engine.args import EngineArgs

    parser = build_parser()
    configs = [EngineArgs.from_cli_args(parser.parse_args(["bench", "latency", *argv]))
               .create_engine_config() for argv in ([str(config_only)], ["--model", str(config_only)])]
    assert configs[0] == configs[1] and configs[0].model.model == str(config_only)


def test_a_bad_engine_setting_is_one_clear_line(config_only):
    with pytest.raises(SystemExit) as e:
        main(["bench", "latency", str(config_only), "--model", "elsewhere"])
    assert str(e.value).startswith("error: the model is given twice")


# ---- the image workload (--image-size) on a scaled-down copy of benchmarks/models/llava-1.5-7b-shape
REPO = Path(__file__).resolve().parents[1]
LLAVA_SHAPE = REPO / "benchmarks" / "models" / "llava-1.5-7b-shape"


@pytest.fixture(scope="module")
def tiny_llava_shape(tmp_path_factory):
    """The LLaVA 1.5 7B shape's config.json with tiny hidden sizes (2 layers of 64 on both sides),
    everything else kept: 336-pixel images, patch 14 (576 image tokens), the vocabulary and the
    image token id. Config only, as the shape folder: the bench writes the processor."""
    config = json.loads((LLAVA_SHAPE / "config.json").read_text())
    config["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, head_dim=16)
    config["vision_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, projection_dim=64)
    out = tmp_path_factory.mktemp("llava-tiny-shape")
    (out / "config.json").write_text(json.dumps(config))
    return out


def _image_tokens(config_dir) -> int:
    vision = json.loads((Path(config_dir) / "config.json").read_text())["vision_config"]
    return (vision["image_size"] // vision["patch_size"]) ** 2


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def llava_workload(tiny_llava_shape):
    from kubeinfer.bench_images import ImageWorkload

    with ImageWorkload(tiny_llava_shape, 336, seed=3) as workload:
        yield workload


def test_image_workload_builds_chat_prompts_through_the_processor(llava_workload, tiny_llava_shape):
    config = json.loads((tiny_llava_shape / "config.json").read_text())
    a, b, a_again = (llava_workload.inputs([n], first_index=i)[0]
                     for n, i in ((7, 0), (12, 1), (7, 0)))
    image_id, n_image = config["image_token_index"], _image_tokens(tiny_llava_shape)
    for inp, text_len in ((a, 7), (b, 12)):
        (feature,) = inp.features
        ids = inp.prompt_token_ids
        assert ids.count(image_id) == n_image == feature.placeholder.length
        assert ids[feature.placeholder.offset:feature.placeholder.end] == [image_id] * n_image
        # the template's two words, the image, exactly text_len random words
        assert len(ids) == 2 + n_image + text_len
        assert tuple(feature.encoder_inputs["pixel_values"].shape) == (1, 3, 336, 336)
    assert a.features[0].image_hash != b.features[0].image_hash  # distinct images per request
    assert a.prompt_token_ids[-8:-1] != b.prompt_token_ids[-13:-6]  # the first 7 words differ
    assert a.prompt_token_ids == a_again.prompt_token_ids  # deterministic
    assert a.features[0].image_hash == a_again.features[0].image_hash


def test_shared_image_gives_every_request_the_same_image(tiny_llava_shape):
    from kubeinfer.bench_images import ImageWorkload

    with ImageWorkload(tiny_llava_shape, 56, shared_image=True) as workload:
        x, y = workload.inputs([4, 4])
    assert x.features[0].image_hash == y.features[0].image_hash
    assert x.prompt_token_ids != y.prompt_token_ids  # the text still differs


def test_image_throughput_on_a_scaled_down_llava_shape(tiny_llava_shape, capsys):
    assert main(["bench", "throughput", str(tiny_llava_shape), "--load-format", "dummy",
                 "--num-prompts", "2", "--input-len", "8", "--output-len", "3",
                 "--max-model-len", "1024", "--image-size", "336"]) == 0
    result = _last_json(capsys)
    assert result["num_requests"] == 2 and result["output_tokens"] == 6
    assert result["image_size"] == 336 and result["shared_image"] is False
    assert result["mean_prompt_len"] == 2 + _image_tokens(tiny_llava_shape) + 8
    assert result["total_num_tokens"] == 6 + 2 * result["mean_prompt_len"]
    assert result["output_tokens_per_second"] > 0


def test_image_latency_reports_ttft(tiny_llava_shape, capsys):
    assert main(["bench", "latency", str(tiny_llava_shape), "--load-format", "dummy",
                 "--batch-size", "1", "--input-len", "4", "--output-len", "2", "--num-iters", "2",
                 "--num-iters-warmup", "0", "--max-model-len", "1024", "--image-size", "336",
                 "--shared-image"]) == 0
    result = _last_json(capsys)
    assert result["time_to_first_token_ms"] > 0 and result["preprocess_ms_per_request"] > 0
    assert result["mean_prompt_len"] == 2 + _image_tokens(tiny_llava_shape) + 4


@pytest.mark.parametrize("argv, message", [
    (["--image-size", "5"], "--image-size must be between 28 and 4096 pixels, got 5"),
    (["--shared-image"], "--shared-image needs --image-size"),
])
def test_bad_image_flags_get_one_clear_line(tiny_llava_shape, argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["bench", "latency", str(tiny_llava_shape), "--load-format", "dummy",
              "--max-model-len", "1024", "--num-iters", "1", "--num-iters-warmup", "0", *argv])


def test_image_size_on_a_text_only_model_says_so(config_only):
    with pytest.raises(SystemExit, match="--image-size needs a vision-language model; .* is a "
                                         "text-only model"):
        main(["bench", "throughput", str(config_only), "--load-format", "dummy",
              "--image-size", "336"])


def test_image_size_and_json_schema_are_refused_together(tiny_llava_shape, tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "string"}')
    with pytest.raises(SystemExit, match="--json-schema and --image-size cannot be combined"):
        main(["bench", "throughput", str(tiny_llava_shape), "--load-format", "dummy",
              "--image-size", "336", "--json-schema", str(schema)])


def test_a_config_only_family_without_a_synthetic_processor_is_refused(tmp_path):
    from kubeinfer.bench_processor import write_synthetic_processor

    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "idefics3", "vision_config": {}, "text_config": {"vocab_size": 100}}))
    with pytest.raises(ValueError, match="can write one only for llava, qwen2_vl, qwen2_5_vl "
                                         r"\(this is 'idefics3'\): copy the model's tokenizer"):
        write_synthetic_processor(tmp_path, tmp_path / "out")


def test_the_qwen2_5_vl_shape_gets_its_vision_tokens(tmp_path):
    """The synthetic Qwen2.5-VL tokenizer: the config's special ids, words are their ids."""
    from kubeinfer.bench_processor import build_tokenizer, text_token_ids

    config = json.loads((REPO / "benchmarks/models/qwen2.5-vl-7b-shape/config.json").read_text())
    tok = build_tokenizer(config)
    ids = tok("<|vision_start|><|image_pad|><|vision_end|>w17 w151000",
              add_special_tokens=False)["input_ids"]
    assert ids == [config["vision_start_token_id"], config["image_token_id"],
                   config["vision_end_token_id"], 17, 151000]
    low, high = text_token_ids(config)
    assert high == config["bos_token_id"] and 0 < low < 100


# ---- benchmarks/: the HF peer on the same image workload, and the TTFT floor
@pytest.fixture
def benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))


def test_hf_peer_runs_the_image_workload_on_the_tiny_shape(tiny_llava_shape, benchmarks_on_path):
    import argparse

    import torch
    from hf_peer_vlm import run_static

    a = argparse.Namespace(model=str(tiny_llava_shape), image_size=336, prompts=3, input_len=5,
                           output_len=3, static_batch=2, mode="static", var=False)
    result = run_static(a, "cpu", torch.float32)
    assert result["out_tokens"] == 3 * 3 and result["output_tok_s"] > 0
    # the engine's bench builds the same prompts (see test_image_throughput_...)
    assert result["mean_prompt_len"] == 2 + _image_tokens(tiny_llava_shape) + 5


def test_hf_peer_pads_a_batch_on_the_left(llava_workload, benchmarks_on_path):
    import torch
    from hf_peer_vlm import batch_inputs

    short, long = llava_workload.inputs([3, 6], first_index=40)
    kw = batch_inputs([short, long], "cpu", torch.bfloat16, "llava", 32000)
    assert kw["input_ids"].shape == (2, len(long.prompt_token_ids))
    assert kw["attention_mask"][0].tolist() == [0] * 3 + [1] * len(short.prompt_token_ids)
    assert kw["input_ids"][0, 3:].tolist() == short.prompt_token_ids
    assert kw["pixel_values"].shape == (2, 3, 336, 336) and kw["pixel_values"].dtype == torch.bfloat16


def test_llava_ttft_floor_counts_the_vision_tower_projector_and_prefill(benchmarks_on_path):
    from roofline_model import gpu_peaks, vlm_ttft_floor

    cfg = json.loads((LLAVA_SHAPE / "config.json").read_text())
    v, t = cfg["vision_config"], cfg["text_config"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    tokens, hv, layers = patches + 1, v["hidden_size"], v["num_hidden_layers"] - 1  # feature -2
    vision = (2 * 3 * v["patch_size"] ** 2 * hv * patches
              + layers * (2 * (4 * hv * hv + 2 * hv * v["intermediate_size"]) * tokens
                          + 4 * tokens * tokens * hv))
    h, L = t["hidden_size"], 700
    projector = 2 * (hv * h + h * h) * patches
    per_layer = 4 * h * h + 3 * h * t["intermediate_size"]
    prefill = (t["num_hidden_layers"] * (2 * per_layer * L + 4 * h * L * L / 2)
               + 2 * h * t["vocab_size"])
    weights = 2 * (3 * v["patch_size"] ** 2 * hv + layers * (4 * hv * hv + 2 * hv * v["intermediate_size"])
                   + hv * h + h * h + t["num_hidden_layers"] * per_layer + h * t["vocab_size"])
    tflops, tbps = gpu_peaks("NVIDIA H100 80GB HBM3")
    floor = vlm_ttft_floor(str(LLAVA_SHAPE), 336, L, tflops, tbps)
    assert floor["image_tokens"] == patches
    assert floor["vision_gflop"] == round(vision / 1e9, 1)
    assert floor["projector_gflop"] == round(projector / 1e9, 1)
    assert floor["prefill_gflop"] == round(prefill / 1e9, 1)
    compute_ms = (vision + projector + prefill) / (tflops * 1e12) * 1e3
    weight_ms = weights / (tbps * 1e12) * 1e3
    assert floor["floor_ms"] == pytest.approx(compute_ms + weight_ms, abs=2e-3)
    assert floor["overlap_floor_ms"] == pytest.approx(max(compute_ms, weight_ms), abs=2e-3)


def test_llava_throughput_floor_is_n_prefills_then_decode_steps_bound_by_kv_reads(
        benchmarks_on_path):
    from roofline_model import vlm_throughput_floor, vlm_ttft_floor

    cfg = json.loads((LLAVA_SHAPE / "config.json").read_text())["text_config"]
    n, L, out, tflops, tbps = 256, 642, 128, 660.0, 3.0
    one = vlm_ttft_floor(str(LLAVA_SHAPE), 336, L, tflops, tbps)
    floor = vlm_throughput_floor(str(LLAVA_SHAPE), 336, L, n, out, tflops, tbps)
    prefill = n * (one["vision_gflop"] + one["projector_gflop"] + one["prefill_gflop"]) * 1e9
    assert floor["prefill_s"] == pytest.approx(prefill / (tflops * 1e12), abs=2e-3)
    # LLaVA's decoder has no grouped KV heads: half a MiB per token, and at 256 requests of
    # ~700 tokens the KV reads (not the weights, not the FLOPs) bound every decode step
    kv_bytes = 2 * cfg["num_hidden_layers"] * cfg["hidden_size"] * 2
    assert floor["kv_mib_per_token"] == kv_bytes / 2**20 == 0.5
    kv_s = sum(n * (L + i) * kv_bytes for i in range(out)) / (tbps * 1e12)
    assert kv_s < floor["decode_s"] < kv_s * 1.2
    assert abs(floor["out_tok_s"] - n * out / (floor["prefill_s"] + floor["decode_s"])) < 2


def test_qwen2_5_vl_floor_uses_merged_tokens_and_windows(benchmarks_on_path):
    from roofline_model import vlm_ttft_floor

    path = str(REPO / "benchmarks/models/qwen2.5-vl-7b-shape")
    small, large = (vlm_ttft_floor(path, size, 300, 989.4, 3.35) for size in (448, 896))
    assert small["image_tokens"] == (448 // 28) ** 2 and large["image_tokens"] == 4 * small["image_tokens"]
    # windowed layers attend 64 patches: 4x the patches costs less than 4x^2 in attention,
    # more than 4x in all (the full-attention layers grow quadratically)
    assert 4 * small["vision_gflop"] < large["vision_gflop"] < 16 * small["vision_gflop"]


def test_unknown_gpu_has_no_peaks(benchmarks_on_path):
    from roofline_model import gpu_peaks

    assert gpu_peaks("NVIDIA H200") == (989.4, 4.8)
    with pytest.raises(ValueError, match="no data-sheet peaks for 'cpu'.*pass --tflops and --tbps"):
        gpu_peaks("cpu")


def test_gpu_suite_vlm_steps_wait_for_their_architecture(benchmarks_on_path):
    import argparse
    import subprocess
    import sys

    import gpu_suite

    table = gpu_suite.steps(argparse.Namespace(models="benchmarks/models", peer="benchmarks/hf_peer.py"))
    for family in ("llava", "qwen_vl"):
        for suffix in ("", "_peer", "_ttft"):
            cmd, limit = table[family + suffix]
            assert cmd[2] == gpu_suite.NEEDS_ARCH and limit <= 300
    guard = [sys.executable, "-c", gpu_suite.NEEDS_ARCH]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    missing = subprocess.run(guard + ["NoSuchVLForConditionalGeneration", sys.executable, "-c",
                                      "print('ran')"], capture_output=True, text=True, env=env)
    assert missing.returncode == 1 and "ran" not in missing.stdout
    assert "needs NoSuchVLForConditionalGeneration in kubeinfer's model registry" in missing.stderr
    present = subprocess.run(guard + ["LlavaForConditionalGeneration", sys.executable, "-c",
                                      "print('ran')"], capture_output=True, text=True, env=env)
    assert present.returncode == 0 and present.stdout.strip() == "ran"


def test_json_check_counts_replies_that_validate():
    from types import SimpleNamespace as O

    from kubeinfer.bench import _json_check

    schema = {"type": "object", "properties": {"t": {"type": "string"}}, "required": ["t"]}
    finals = {0: O(finish_reason="stop", new_text='{"t": "a b"}'),
              1: O(finish_reason="stop", new_text='{"u": 1}'),  # parses, does not validate
              2: O(finish_reason="stop", new_text='{"t": '),  # does not parse
              3: O(finish_reason="length", new_text='{"t": "ab')}
    assert _json_check(schema, finals) == {"json_replies": 4, "json_stopped": 3, "json_valid": 1}
