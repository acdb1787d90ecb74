"""`kubeinfer render -f` and the `operator` argument parsing."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import yaml

from kubeinfer.operator import cli
from kubeinfer.operator import spec as spec_module
from tests.operator.helpers import EXAMPLES, ROOT


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kubeinfer")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def render(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.run_render(parse(["render", *argv]))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("example,kinds", [
    ("inferenceservice.yaml", ["Deployment", "Service", "PodDisruptionBudget"]),
    ("cpu.yaml", ["Deployment", "Service", "PodDisruptionBudget"]),
    ("embeddings.yaml", ["Deployment", "Service", "PodDisruptionBudget"]),
    ("multi-gpu.yaml", ["Deployment", "Service", "PodDisruptionBudget"]),
    ("model-cache.yaml", ["PersistentVolumeClaim", "Job", "Deployment", "Service", "PodDisruptionBudget"]),
])
def test_render_examples(example, kinds, capsys):
    rc, out, err = render(["-f", str(EXAMPLES / example)], capsys)
    assert rc == 0, err
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == kinds
    assert out.startswith("# kubeinfer render:")


MULTI_NODE = """\
apiVersion: kubeinfer.io/v1alpha1
kind: InferenceService
metadata: {name: big}
spec:
  model: {uri: "hf://org/big"}
  parallelism: {tensor: 8, pipeline: 2}
"""


def test_render_pipeline_parallelism_as_statefulsets_by_default(tmp_path, capsys):
    (tmp_path / "mn.yaml").write_text(MULTI_NODE)
    rc, out, _ = render(["-f", str(tmp_path / "mn.yaml")], capsys)
    docs = list(yaml.safe_load_all(out))
    assert rc == 0 and [d["kind"] for d in docs[:2]] == ["Secret", "StatefulSet"]   # applies as is
    assert docs[0]["metadata"]["name"] == "big-node-secret" and len(docs[0]["stringData"]["node-secret"]) >= 32


def test_render_refuses_pipeline_parallelism_when_switched_off(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(spec_module, "PIPELINE_SUPPORTED", False)
    (tmp_path / "mn.yaml").write_text(MULTI_NODE)
    rc, out, err = render(["-f", str(tmp_path / "mn.yaml")], capsys)
    assert rc == 1 and out == ""
    assert "spec.parallelism.pipeline: got 2; pipeline parallelism is not supported" in err


def test_render_leaderworkerset_flag(tmp_path, capsys):
    (tmp_path / "mn.yaml").write_text(MULTI_NODE)
    rc, out, _ = render(["-f", str(tmp_path / "mn.yaml"), "--leaderworkerset"], capsys)
    assert rc == 0 and list(yaml.safe_load_all(out))[1]["kind"] == "LeaderWorkerSet"


def test_render_engine_image_flag(capsys):
    rc, out, _ = render(["-f", str(EXAMPLES / "cpu.yaml"), "--engine-image", "mine:1"], capsys)
    assert next(yaml.safe_load_all(out))["spec"]["template"]["spec"]["containers"][0]["image"] == "mine:1"


BAD = """\
apiVersion: kubeinfer.io/v1alpha1
kind: InferenceService
metadata: {name: bad}
spec:
  model: {uri: "s3://bucket/model"}
  parallelism: {tensor: 3}
  replicas: -1
  engine: {args: ["--port=9000"]}
  colour: blue
"""


def test_render_invalid_lists_every_problem(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text(BAD)
    rc, out, err = render(["-f", str(f)], capsys)
    assert rc == 1 and out == ""
    assert "InferenceService bad" in err and "(5 problems)" in err
    for text in ("spec.model.uri: got 's3://bucket/model'", "hf://ORG/NAME",
                 "spec.parallelism.tensor: got 3; allowed: 1, 2, 4, 8, 16",
                 "spec.replicas: got -1; must be >= 0",
                 "spec.engine.args[0]: got '--port=9000'; the operator sets --port",
                 "spec.colour: got 'blue'; unknown field"):
        assert text in err, err


def test_render_wrong_kind(tmp_path, capsys):
    f = tmp_path / "x.yaml"
    f.write_text("apiVersion: kubeinfer.io/v1alpha1\nkind: InferenceServce\nmetadata: {name: x}\n")
    rc, _, err = render(["-f", str(f)], capsys)
    assert rc == 1 and "expected kind InferenceService" in err


def test_render_missing_file(capsys):
    rc, out, err = render(["-f", "/no/such/file.yaml"], capsys)
    assert rc == 2 and out == ""
    assert err.strip() == "error: cannot read /no/such/file.yaml: No such file or directory"


def test_render_not_yaml(tmp_path, capsys):
    f = tmp_path / "x.yaml"
    f.write_text("spec: [unclosed\n")
    rc, _, err = render(["-f", str(f)], capsys)
    assert rc == 2 and "not valid YAML" in err


def test_render_through_the_real_cli():
    """`kubeinfer render` as users run it: the top-level CLI, a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-m", "kubeinfer.cli", "render", "-f",
                           str(EXAMPLES / "inferenceservice.yaml")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(proc.stdout)]
    assert kinds == ["Deployment", "Service", "PodDisruptionBudget"]


def test_operator_flags():
    args = parse(["operator", "--namespace", "a", "-n", "b", "--liveness-port", "9090",
                  "--resync-seconds", "1.5", "--engine-image", "img:2"])
    s = cli._settings(args)
    assert s.namespaces == ("a", "b") and not s.all_namespaces
    assert (s.liveness_port, s.resync_seconds, s.engine_image) == (9090, 1.5, "img:2")
    assert cli._settings(parse(["operator", "-A"])).all_namespaces
    with pytest.raises(SystemExit):
        parse(["operator", "-A", "-n", "a"])


def test_operator_settings_from_env(monkeypatch):
    monkeypatch.setenv("KUBEINFER_WATCH_NAMESPACES", "x, y")
    monkeypatch.setenv("KUBEINFER_RESYNC_SECONDS", "2")
    s = cli._settings(parse(["operator"]))
    assert s.namespaces == ("x", "y") and s.resync_seconds == 2
    assert cli._settings(parse(["operator", "-n", "z"])).namespaces == ("z",)   # flags win
    monkeypatch.setenv("KUBEINFER_RESYNC_SECONDS", "0")
    assert cli.run_operator(parse(["operator"])) == 2


def test_hardening_flags_and_environment(monkeypatch, capsys):
    s = cli._settings(parse(["operator", "--metrics-port", "9100", "--leader-election-namespace", "ops",
                             "--scrape-via", "apiserver"]))
    assert (s.metrics_port, s.leader_election_namespace, s.scrape_via) == (9100, "ops", "apiserver")
    defaults = cli._settings(parse(["operator"]))
    assert (defaults.metrics_port, defaults.leader_election_namespace, defaults.scrape_via) == (8081, "", "pod-ip")
    monkeypatch.setenv("KUBEINFER_LEADER_ELECTION_NAMESPACE", "kubeinfer-system")
    monkeypatch.setenv("KUBEINFER_METRICS_PORT", "0")
    s = cli._settings(parse(["operator"]))
    assert (s.leader_election_namespace, s.metrics_port) == ("kubeinfer-system", 0)
    with pytest.raises(SystemExit):
        parse(["operator", "--scrape-via", "carrier-pigeon"])
    # errors a user can make get a message, not a traceback
    monkeypatch.setenv("KUBEINFER_METRICS_PORT", "8080")
    assert cli.run_operator(parse(["operator"])) == 2
    assert "metrics port and the liveness port are both 8080" in capsys.readouterr().err
    monkeypatch.setenv("KUBEINFER_METRICS_PORT", "0")
    monkeypatch.setenv("KUBEINFER_SCRAPE_VIA", "smoke-signals")
    assert cli.run_operator(parse(["operator"])) == 2
    assert "scrape via must be one of pod-ip, apiserver" in capsys.readouterr().err
