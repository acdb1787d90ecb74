"""metrics.py: reconcile counters and durations by trigger and result, API errors by code, the
phase gauge; the handlers feed them."""
from __future__ import annotations

import logging

import kopf
import pytest
from prometheus_client import CollectorRegistry, Gauge

from kubeinfer.operator import handlers, metrics
from kubeinfer.operator.apply import ApiError
from tests.operator.helpers import FakeApi, inference_service, make_settings


def value(name: str, **labels) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_reconciling_counts_results_and_errors():
    before_ok = value("kubeinfer_operator_reconciles_total", trigger="t", result="ok")
    before_err = value("kubeinfer_operator_reconciles_total", trigger="t", result="error")
    with metrics.reconciling("t"):
        pass
    with pytest.raises(RuntimeError), metrics.reconciling("t"):
        raise RuntimeError("boom")
    assert value("kubeinfer_operator_reconciles_total", trigger="t", result="ok") == before_ok + 1
    assert value("kubeinfer_operator_reconciles_total", trigger="t", result="error") == before_err + 1
    assert value("kubeinfer_operator_reconcile_duration_seconds_count", trigger="t") >= 2


def test_phase_tracker_counts_per_phase():
    gauge = Gauge("phases_test", "t", ["phase"], registry=(r := CollectorRegistry()))
    phases = metrics.PhaseTracker(gauge)
    phases.set("ns", "a", "Ready")
    phases.set("ns", "b", "Ready")
    phases.set("ns", "c", "Failed")
    phases.set("ns", "b", "Loading")
    phases.set("ns", "d", "Downloading")
    phases.set("ns", "d", "Ready")   # a model cache done: Downloading goes back to 0
    phases.set("ns", "a", None)
    got = {p: r.get_sample_value("phases_test", {"phase": p}) for p in metrics.PHASES}
    assert got == {"Pending": 0, "Downloading": 0, "Loading": 1, "Ready": 1, "Degraded": 0, "Failed": 1}


def test_handlers_feed_the_metrics(monkeypatch):
    monkeypatch.setattr(kopf, "event", lambda *a, **k: None)
    api = FakeApi()
    gauge = Gauge("phases_handlers", "t", ["phase"], registry=(r := CollectorRegistry()))
    registry = handlers.build_registry(make_settings(), api=api, phases=metrics.PhaseTracker(gauge))
    on_change = next(h.fn for h in registry._changing.get_all_handlers() if h.id == "reconcile")
    ok = value("kubeinfer_operator_reconciles_total", trigger="change", result="ok")
    partial = value("kubeinfer_operator_reconciles_total", trigger="change", result="partial")
    invalid = value("kubeinfer_operator_reconciles_total", trigger="change", result="invalid")
    on_change(body=inference_service(), patch=kopf.Patch(), logger=logging.getLogger(), retry=0)
    api.fail[("GET", "Pod")] = ApiError(503, "ServiceUnavailable", "later")
    with pytest.raises(kopf.TemporaryError):
        on_change(body=inference_service(), patch=kopf.Patch(), logger=logging.getLogger(), retry=0)
    with pytest.raises(kopf.PermanentError):
        on_change(body=inference_service({"replicas": -1}, name="bad"), patch=kopf.Patch(),
                  logger=logging.getLogger(), retry=0)
    assert value("kubeinfer_operator_reconciles_total", trigger="change", result="ok") == ok + 1
    assert value("kubeinfer_operator_reconciles_total", trigger="change", result="partial") == partial + 1
    assert value("kubeinfer_operator_reconciles_total", trigger="change", result="invalid") == invalid + 1
    assert r.get_sample_value("phases_handlers", {"phase": "Pending"}) == 1
    assert r.get_sample_value("phases_handlers", {"phase": "Failed"}) == 1


def test_api_errors_are_counted_by_code_but_not_404(monkeypatch):
    from kubeinfer.operator import apply

    before_503 = value("kubeinfer_operator_api_errors_total", code="503")
    before_404 = value("kubeinfer_operator_api_errors_total", code="404")
    apply._failure(503, "ServiceUnavailable", b'{"kind": "Status", "message": "x"}')
    apply._failure(404, "NotFound", b"")
    assert value("kubeinfer_operator_api_errors_total", code="503") == before_503 + 1
    assert value("kubeinfer_operator_api_errors_total", code="404") == before_404


def test_serve_answers_and_a_port_in_use_is_not_fatal(caplog):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert metrics.serve(port, addr="127.0.0.1")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "kubeinfer_operator_reconciles_total" in text
    assert metrics.serve(port, addr="127.0.0.1") is False   # taken now: logged, the operator goes on
    assert "set --metrics-port" in caplog.text
    assert metrics.serve(0) is False
