"""cpu_threads: the CPU count from affinity and cgroup quota, OMP_NUM_THREADS, the split over ranks."""
from __future__ import annotations

import logging

import pytest
import torch

from kubeinfer.engine import cpu_threads


def cgroup(tmp_path, v2: str | None = None, v1: tuple[str, str] | None = None):
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1[0] + "\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(v1[1] + "\n")
    return tmp_path


@pytest.mark.parametrize("v2,v1,want", [
    (None, None, None),  # no cgroup files (not Linux, or not mounted)
    ("max 100000", None, None),  # v2, no limit
    ("250000 100000", None, 2.5),  # v2, a Kubernetes limit of 2500m
    (None, ("-1", "100000"), None),  # v1, no limit
    (None, ("50000", "100000"), 0.5),  # v1, 500m
    ("garbage", None, None),
])
def test_cgroup_cpu_limit(tmp_path, v2, v1, want):
    assert cpu_threads.cgroup_cpu_limit(cgroup(tmp_path, v2, v1)) == want


@pytest.mark.parametrize("affinity,v2,want", [
    (8, None, 8),
    (8, "250000 100000", 2),  # quota 2.5 CPUs: rounded down, a throttled thread stalls the rest
    (2, "800000 100000", 2),  # pinned to 2 cores of a node with a bigger quota
    (8, "50000 100000", 1),  # less than one CPU: still one thread
])
def test_available_cpus(tmp_path, monkeypatch, affinity, v2, want):
    monkeypatch.setattr(cpu_threads.os, "sched_getaffinity", lambda _: set(range(affinity)),
                        raising=False)
    assert cpu_threads.available_cpus(cgroup(tmp_path, v2)) == want


@pytest.mark.parametrize("env,world,want", [
    ({}, 1, 6),
    ({}, 2, 3),
    ({}, 4, 1),
    ({}, 8, 1),  # more ranks than CPUs: one thread each, never zero
    ({"OMP_NUM_THREADS": "3"}, 1, 3),  # the user's count wins, even above the CPU count
    ({"OMP_NUM_THREADS": "3"}, 2, 3),  # a per-process count: each rank uses it as given
    ({"OMP_NUM_THREADS": " "}, 2, 3),
])
def test_choose_num_threads(tmp_path, monkeypatch, env, world, want):
    monkeypatch.setattr(cpu_threads.os, "sched_getaffinity", lambda _: set(range(6)), raising=False)
    assert cpu_threads.choose_num_threads(world, env, root=tmp_path)[0] == want


@pytest.mark.parametrize("bad", ["0", "-2", "four", "2,1"])
def test_bad_omp_num_threads_is_named_and_ignored(tmp_path, monkeypatch, caplog, bad):
    monkeypatch.setattr(cpu_threads.os, "sched_getaffinity", lambda _: set(range(4)), raising=False)
    with caplog.at_level(logging.WARNING, logger=cpu_threads.__name__):
        num, _ = cpu_threads.choose_num_threads(2, {"OMP_NUM_THREADS": bad}, root=tmp_path)
    assert num == 2
    assert "OMP_NUM_THREADS" in caplog.text and repr(bad) in caplog.text


def test_configure_sets_torch_threads_on_cpu_only(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_threads.torch, "set_num_threads", calls.append)
    monkeypatch.setattr(cpu_threads, "choose_num_threads", lambda world: (7 * world, "test"))
    cpu_threads.configure(torch.device("cuda", 0), 2)
    assert calls == []
    cpu_threads.configure(torch.device("cpu"), 2)
    assert calls == [14]
