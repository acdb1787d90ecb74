"""`kubeinfer bench`: runs on a config-only folder with dummy weights, prints one JSON line, and
answers bad flags with one clear line."""
import json
import shutil

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


def test_throughput_with_a_json_schema(config_only, tiny_model_dir, tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"t": {"type": "string", '
                      '"pattern": "^[a-z ]*$"}}, "required": ["t"]}')
    assert main(["bench", "throughput", str(config_only), "--load-format", "dummy",
                 "--num-prompts", "4", "--input-len", "20", "--output-len", "6",
                 "--max-model-len", "128", "--json-schema", str(schema),
                 "--tokenizer", str(tiny_model_dir("qwen3"))]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_requests"] == 4 and result["mask_fill_ms_per_step"] > 0
    assert result["mask_accept_ms_per_step"] > 0  # the output tokens reached their matchers
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "nope"}')
    with pytest.raises(SystemExit, match="not a valid JSON schema"):
        main(["bench", "throughput", str(config_only), "--load-format", "dummy",
              "--num-prompts", "1", "--input-len", "4", "--output-len", "2", "--max-model-len",
              "128", "--json-schema", str(bad), "--tokenizer", str(tiny_model_dir("qwen3"))])


@pytest.mark.parametrize("args, message", [
    (["--num-prompts", "0"], "--num-prompts must be at least 1, got 0"),
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
