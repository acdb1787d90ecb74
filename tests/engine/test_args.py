"""EngineArgs: one description of every engine setting, so the flags, `LLM(**kwargs)` and the
config dataclasses agree on names, defaults, choices and errors."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from kubeinfer.cli import build_parser
from kubeinfer.engine.args import ENGINE_FIELDS, EngineArgs
from kubeinfer.engine.async_engine import AsyncLLM
from kubeinfer.engine.config import (BLOCK_SIZES, DEFAULT_MODEL, CacheConfig, DeviceConfig,
                                     EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig)
from kubeinfer.engine.errors import ConfigError, RequestError
from kubeinfer.engine.llm import LLM
from kubeinfer.engine.protocol import Engine

CONFIG_CLASSES = (ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig, DeviceConfig)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def cli_config(*argv: str) -> EngineConfig:
    return EngineArgs.from_cli_args(parse(*argv)).create_engine_config()


def serve_actions() -> dict[str, argparse.Action]:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    return {a.dest: a for a in serve._actions}


def test_every_config_field_has_a_flag_named_after_it_with_its_default_and_help():
    actions = serve_actions()
    names = [f.name for cls in CONFIG_CLASSES for f in dataclasses.fields(cls)]
    assert sorted(names) == sorted(ENGINE_FIELDS)
    for cls in CONFIG_CLASSES:
        for f in dataclasses.fields(cls):
            if f.name == "model":  # positional MODEL and --model
                assert actions["model"].option_strings == []
                assert actions["model_flag"].option_strings == ["--model"]
                continue
            action = actions[f.name]
            assert action.option_strings[0] == "--" + f.name.replace("_", "-")
            assert action.default == f.default, f.name
            assert f.metadata["help"] and f.metadata["help"] in action.help
            if f.metadata["choices"]:
                assert tuple(action.choices) == f.metadata["choices"]


def test_defaults_agree_between_the_dataclasses_the_flags_and_the_keywords():
    assert cli_config() == EngineConfig() == EngineArgs().create_engine_config()
    assert EngineConfig().model.model == DEFAULT_MODEL == EngineArgs(model=None).model


def test_aliases_and_negative_forms_are_kept():
    assert "-tp" in serve_actions()["tensor_parallel_size"].option_strings
    assert "-pp" in serve_actions()["pipeline_parallel_size"].option_strings
    for flag, field_name in (("--no-enable-prefix-caching", "enable_prefix_caching"),
                             ("--no-async-scheduling", "async_scheduling"),
                             ("--no-enable-chunked-prefill", "enable_chunked_prefill")):
        assert getattr(parse(flag), field_name) is False


@pytest.fixture
def template_file(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    return path


@pytest.mark.parametrize("kwargs, argv", [
    ({"model": "m", "block_size": 1}, ["m", "--block-size", "1"]),
    ({"model": "m", "tensor_parallel_size": 2, "max_num_seqs": 3}, ["--model", "m", "-tp", "2",
                                                                     "--max-num-seqs", "3"]),
    ({"enable_prefix_caching": False, "async_scheduling": False, "enable_chunked_prefill": False},
     ["--no-enable-prefix-caching", "--no-async-scheduling", "--no-enable-chunked-prefill"]),
    ({"async_scheduling": True, "enforce_eager": True, "trust_remote_code": True},
     ["--async-scheduling", "--enforce-eager", "--trust-remote-code"]),
    ({"kv_cache_memory": "4GiB", "gpu_memory_utilization": 0.5},
     ["--kv-cache-memory", "4GiB", "--gpu-memory-utilization", "0.5"]),
    ({"served_model_name": "a"}, ["--served-model-name", "a"]),
    ({"served_model_name": ["a", "b"]}, ["--served-model-name", "a", "b"]),
    ({"override_generation_config": {"top_p": 0.9, "temperature": 0.2}},
     ["--override-generation-config", '{"temperature": 0.2, "top_p": 0.9}']),
    ({"pooler_config": {"pooling_type": "MEAN", "normalize": True}, "runner": "pooling"},
     ["--pooler-config", '{"normalize": true, "pooling_type": "MEAN"}', "--runner", "pooling"]),
    ({"dtype": "bf16", "load_format": "dummy", "max_model_len": 64, "seed": 7, "device": "cpu"},
     ["--dtype", "bf16", "--load-format", "dummy", "--max-model-len", "64", "--seed", "7",
      "--device", "cpu"]),
    ({"scheduling_policy": "priority", "num_gpu_blocks_override": 9, "generation_config": "vllm"},
     ["--scheduling-policy", "priority", "--num-gpu-blocks-override", "9",
      "--generation-config", "vllm"]),
])
def test_keywords_and_flags_build_equal_configs(kwargs, argv):
    from_kwargs = EngineArgs(**kwargs).create_engine_config()
    assert from_kwargs == cli_config(*argv)
    assert from_kwargs != EngineConfig()  # the case sets something


def test_chat_template_file_is_read_by_both(template_file):
    config = cli_config("--chat-template", str(template_file))
    assert config.model.chat_template == template_file.read_text()
    assert EngineArgs(chat_template=str(template_file)).create_engine_config() == config


def test_llm_builds_the_config_the_cli_builds(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    llm = LLM(path, device="cpu", block_size=1, max_model_len=64, max_num_seqs=4,
              async_scheduling=False, enable_prefix_caching=False)
    assert llm.engine.config == cli_config(path, "--device", "cpu", "--block-size", "1",
                                           "--max-model-len", "64", "--max-num-seqs", "4",
                                           "--no-async-scheduling", "--no-enable-prefix-caching")
    assert llm.engine.config.cache.block_size == 1


# ---- errors a user can cause -------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, phrases", [
    ({"blok_size": 16}, ["unknown engine argument 'blok_size'", "did you mean block_size"]),
    ({"max_num_seq": 4, "zzz": 1}, ["unknown engine arguments", "'max_num_seq' (did you mean "
                                    "max_num_seqs", "'zzz'"]),
    ({"block_size": 3}, ["--block-size must be one of 1, 8, 16, 32, 64, 128, got 3"]),
    ({"block_size": "16"}, ["block_size='16' is not valid: expected an integer, e.g. block_size=16"]),
    ({"max_num_seqs": True}, ["max_num_seqs=True is not valid: expected an integer"]),
    ({"enforce_eager": "yes"}, ["enforce_eager='yes' is not valid: expected True or False"]),
    ({"max_model_len": 1.5}, ["max_model_len=1.5 is not valid: expected an integer or None"]),
    ({"kv_cache_memory": "lots"}, ["cannot read 'lots' as a size", "4GiB"]),
    ({"override_generation_config": {"temperature": "hot"}},
     ["--override-generation-config values must be numbers", "temperature='hot'"]),
    ({"override_generation_config": {"temprature": 0.5}}, ["unknown keys ['temprature']"]),
    ({"pooler_config": "MEAN"}, ["expected a mapping", "'MEAN'"]),
    ({"gpu_memory_utilization": 1.5}, ["--gpu-memory-utilization must be in (0, 1], got 1.5"]),
])
def test_bad_keywords_are_clear_config_errors_before_any_model_loads(kwargs, phrases):
    with pytest.raises(ConfigError) as e:
        LLM("no-such-model-is-loaded", **kwargs)
    for phrase in phrases:
        assert phrase in str(e.value)


@pytest.mark.parametrize("argv, phrases", [
    (["--block-size", "3"], ["--block-size", "invalid choice: 3",
                             ", ".join(map(str, BLOCK_SIZES))]),
    (["--max-model-len", "0"], ["--max-model-len", "expected an integer of at least 1, got 0"]),
    (["--max-num-seqs", "many"], ["--max-num-seqs", "expected an integer, got 'many'"]),
    (["--kv-cache-memory", "lots"], ["--kv-cache-memory", "cannot read 'lots' as a size"]),
    (["--gpu-memory-utilization", "0"], ["expected a number in (0, 1], got 0.0"]),
    (["--override-generation-config", '{"temperature": "hot"}'], ["JSON object of numbers"]),
    (["--pooler-config", "[1]"], ["expected a JSON object", '"pooling_type": "MEAN"']),
    (["--dtype", "int3"], ["--dtype", "invalid choice: 'int3'"]),
    (["-tp", "two"], ["-tp", "invalid int value: 'two'"]),
])
def test_bad_flags_are_usage_errors(argv, phrases, capsys):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for phrase in phrases:
        assert phrase in err, err


def test_block_size_choices_are_one_list():
    assert tuple(serve_actions()["block_size"].choices) == BLOCK_SIZES
    for size in BLOCK_SIZES:  # every size the flag offers, the config takes, and the reverse
        assert cli_config("--block-size", str(size)) == EngineArgs(block_size=size).create_engine_config()


def test_model_given_twice_differently_is_refused():
    with pytest.raises(ConfigError, match="given twice .*'a' as MODEL and 'b' with --model"):
        EngineArgs.from_cli_args(parse("a", "--model", "b"))
    assert cli_config("a", "--model", "a").model.model == "a"


# ---- the engine protocol -----------------------------------------------------------------------
def test_both_engines_implement_the_engine_protocol(tiny_model_dir, tiny_bert_dir):
    gen = LLM(str(tiny_model_dir("llama")), device="cpu", max_model_len=64,
              num_gpu_blocks_override=10)
    emb = LLM(str(tiny_bert_dir), device="cpu")
    assert isinstance(gen.engine, Engine) and isinstance(emb.engine, Engine)
    assert (gen.runner_type, emb.runner_type) == ("generate", "pooling")
    assert gen.engine.kv_cache_usage() == (10, 10)  # nothing running: every block is free
    assert emb.engine.kv_cache_usage() == (0, 0)
    front = AsyncLLM(gen.engine)
    assert (front.kv_cache_free_blocks(), front.kv_cache_num_blocks()) == (10, 10)
    assert AsyncLLM(emb.engine).kv_cache_num_blocks() == 0
    with pytest.raises(RequestError, match="priority=2 is not supported for embedding models"):
        emb.engine.validate_priority(2)
    with pytest.raises(RequestError, match="not an embedding model"):
        front.prepare_embedding_input("hi", None)
