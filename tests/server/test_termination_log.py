"""termination_log: `kubeinfer serve`'s fatal start-up error goes where Kubernetes reads a container's
termination message, marked so the operator knows the engine wrote it."""
from __future__ import annotations

import argparse

from kubeinfer.engine.server import serve
from kubeinfer.engine.server.termination_log import MARKER, MAX_BYTES, PATH_ENV, write_termination_message


def test_written_where_the_environment_says(tmp_path, monkeypatch):
    path = tmp_path / "termination-log"
    monkeypatch.setenv(PATH_ENV, str(path))
    assert write_termination_message("could not load model 'x': Repository not found\n")
    assert path.read_text() == f"{MARKER}\ncould not load model 'x': Repository not found\n"


def test_cut_to_what_the_kubelet_keeps(tmp_path, monkeypatch):
    monkeypatch.setenv(PATH_ENV, str(tmp_path / "t"))
    assert write_termination_message("x" * 10_000)
    data = (tmp_path / "t").read_bytes()
    assert len(data) == MAX_BYTES and data.startswith(MARKER.encode()) and data.endswith(b"...\n")


def test_never_raises(tmp_path, monkeypatch):
    monkeypatch.setenv(PATH_ENV, str(tmp_path / "no-such-dir" / "t"))
    assert write_termination_message("boom") is False
    monkeypatch.delenv(PATH_ENV)
    # outside a container there is no /dev/termination-log: nothing is written anywhere
    import os
    assert write_termination_message("boom") is os.path.exists("/dev/termination-log")


def test_serve_writes_its_start_up_error(tmp_path, monkeypatch):
    path = tmp_path / "termination-log"
    monkeypatch.setenv(PATH_ENV, str(path))
    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "no-such-org/no-such-model", "--host", "127.0.0.1", "--port", "0",
                              "--device", "cpu"])
    assert serve.run_serve(args) == 1
    first, rest = path.read_text().split("\n", 1)
    assert first == MARKER and "no-such-org/no-such-model" in rest
