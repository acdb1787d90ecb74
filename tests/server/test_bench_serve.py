"""`kubeinfer bench serve` against a real server: every request completes with exactly its tokens,
the report has vLLM's field names, and failures and bad flags are reported, not hidden."""
from __future__ import annotations

import json

import pytest

from kubeinfer.cli import main
from tests.fixtures.tiny_models import VOCAB_SIZE
from tests.server.conftest import MODEL_NAME


def bench(capsys, *args: str) -> tuple[int, dict]:
    rc = main(["bench", "serve", "--vocab-size", str(VOCAB_SIZE), "--input-len", "12",
               "--output-len", "5", *args])
    return rc, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_every_request_completes_with_its_tokens(server, capsys):
    rc, report = bench(capsys, "--base-url", server.base_url, "--model", MODEL_NAME,
                       "--num-prompts", "10", "--max-concurrency", "4", "--request-rate", "40")
    assert rc == 0 and report["completed"] == 10 and report["failed"] == 0
    assert report["total_output_tokens"] == 10 * 5 and report["total_input_tokens"] == 10 * 12
    for key in ("request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms",
                "p99_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "p99_e2el_ms"):
        assert report[key] > 0, key
    assert report["mean_ttft_ms"] < report["mean_e2el_ms"]


def test_a_wrong_model_name_fails_the_run_and_says_why(server, capsys):
    rc, report = bench(capsys, "--base-url", server.base_url, "--model", "no-such-model",
                       "--num-prompts", "2")
    assert rc == 1 and report["completed"] == 0 and report["failed"] == 2
    assert "HTTP 404" in report["first_error"] and "no-such-model" in report["first_error"]


@pytest.mark.parametrize("args, message", [
    (["--num-prompts", "0"], "--num-prompts must be at least 1, got 0"),
    (["--request-rate", "0"], "--request-rate must be positive (or inf), got 0.0"),
    (["--max-concurrency", "0"], "--max-concurrency must be at least 1, got 0"),
])
def test_bad_flags_get_one_clear_line(args, message):
    with pytest.raises(SystemExit) as e:
        main(["bench", "serve", "--model", "m", *args])
    assert str(e.value) == f"error: {message}"


def test_a_server_without_a_tokenizer_is_timed_through_token_ids(server_factory, capsys):
    bare = server_factory(skip_tokenizer_init=True)
    rc, report = bench(capsys, "--base-url", bare.base_url, "--model", MODEL_NAME,
                       "--num-prompts", "4", "--return-token-ids")
    assert rc == 0 and report["completed"] == 4 and report["total_output_tokens"] == 4 * 5
    assert 0 < report["mean_ttft_ms"] < report["mean_e2el_ms"] and report["mean_itl_ms"] > 0
