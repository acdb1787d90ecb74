"""`kubeinfer download`: files, then the completion marker; a failure leaves no marker; progress
lines and the termination message. The hub is tests/e2e/fake_hub.py (no network)."""
from __future__ import annotations

import json

import huggingface_hub
import pytest

from kubeinfer import download
from kubeinfer.cli import main
from tests.e2e import fake_hub


@pytest.fixture
def hub(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "Org" / "Tiny"
    (repo / "sub").mkdir(parents=True)
    (repo / "config.json").write_text('{"model_type": "llama"}')
    (repo / "model.safetensors").write_bytes(b"\0" * 1000)
    (repo / "sub" / "tokenizer.json").write_text("{}")
    monkeypatch.setenv(fake_hub.HUB_ENV, str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub.snapshot_download)
    monkeypatch.setattr(download, "PROGRESS_SECONDS", 0.0)
    monkeypatch.setenv("KUBEINFER_TERMINATION_LOG", str(tmp_path / "termination-log"))
    return tmp_path


def test_download_writes_files_then_the_marker(hub, capsys):
    folder = hub / "cache" / "models" / "Org--Tiny" / "main"
    assert main(["download", "hf://Org/Tiny", "--dir", str(folder)]) == 0
    assert (folder / "sub" / "tokenizer.json").is_file() and (folder / "config.json").is_file()
    marker = json.loads((folder / download.COMPLETE_MARKER).read_text())
    assert marker["files"] == 3 and marker["bytes"] == 1000 + len('{"model_type": "llama"}') + 2
    assert marker["uri"] == "hf://Org/Tiny" and marker["revision"] == "main"
    out = capsys.readouterr().out
    assert "progress: Fetching 3 files" in out and "3/3" in out
    said = (hub / "termination-log").read_text()
    assert said.startswith("downloaded Org/Tiny@main: 3 files")

    # done once: a second run does not download again
    def no_download(*a, **k):
        raise AssertionError("downloaded twice")
    huggingface_hub.snapshot_download = no_download
    assert main(["download", "hf://Org/Tiny", "--dir", str(folder)]) == 0
    assert "cached already" in (hub / "termination-log").read_text()


def test_a_failed_download_leaves_no_marker_and_says_why(hub, monkeypatch, capsys):
    folder = hub / "cache" / "x"

    def half_then_fail(repo_id, local_dir, **_):
        (folder / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", half_then_fail)
    assert main(["download", "hf://Org/Tiny", "--dir", str(folder)]) == 1
    assert not download.is_complete(folder) and (folder / "config.json").is_file()
    said = (hub / "termination-log").read_text()
    assert said.startswith("download failed:") and "No space left on device" in said
    assert "No space left on device" in capsys.readouterr().err


def test_unknown_repo_and_bad_uri(hub):
    folder = hub / "cache" / "y"
    assert main(["download", "hf://Org/Missing", "--dir", str(folder)]) == 1
    assert "RepositoryNotFoundError" in (hub / "termination-log").read_text()
    assert main(["download", "pvc://claim/path", "--dir", str(folder)]) == 2
    assert "hf://ORG/NAME" in (hub / "termination-log").read_text()
    assert not download.is_complete(folder)


def test_progress_lines_are_plain(capsys):
    lines = download._Lines()
    lines.write("\r\x1b[A\x1b[A")            # tqdm moving between stacked bars: nothing to log
    lines.write("\rFetching 7 files:  43%|####| 3/7\x1b[A")
    assert capsys.readouterr().out == "progress: Fetching 7 files:  43%|####| 3/7\n"
