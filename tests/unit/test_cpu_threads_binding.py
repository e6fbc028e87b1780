"""The CPU engine's per-rank core binding: set where SGLang would refuse more ranks than NUMA
nodes, an even split of the cores, an explicit value never changed."""

from __future__ import annotations

import pytest

from chameleon_sglang import platform
from chameleon_sglang.platform import CPU_THREADS_BIND_ENV, default_cpu_threads_binding, split_cores


@pytest.mark.parametrize("cores, ranks, expected", [
    ([0, 1], 2, "0|1"),
    ([3, 1, 0, 2], 2, "0,1|2,3"),
    (list(range(5)), 2, "0,1,2|3,4"),
    ([0, 1], 3, "0|1|0"),
    ([4], 1, "4"),
])
def test_cores_are_split_evenly_and_contiguously(cores, ranks, expected):
    assert split_cores(cores, ranks) == expected


def test_set_only_when_ranks_outnumber_numa_nodes(monkeypatch):
    monkeypatch.delenv(CPU_THREADS_BIND_ENV, raising=False)
    monkeypatch.setattr(platform.os, "sched_getaffinity", lambda pid: {0, 1})
    default_cpu_threads_binding(num_ranks=2, num_numa_nodes=2)
    assert CPU_THREADS_BIND_ENV not in platform.os.environ
    default_cpu_threads_binding(num_ranks=2, num_numa_nodes=1)
    assert platform.os.environ[CPU_THREADS_BIND_ENV] == "0|1"


def test_an_explicit_binding_is_kept(monkeypatch):
    monkeypatch.setenv(CPU_THREADS_BIND_ENV, "1|0")
    default_cpu_threads_binding(num_ranks=2, num_numa_nodes=1)
    assert platform.os.environ[CPU_THREADS_BIND_ENV] == "1|0"
