"""The CPU engine's per-rank core binding: set where SGLang would refuse more ranks than NUMA
nodes, an even split of the cores, an explicit value never changed."""

from __future__ import annotations

import pytest

from chameleon_sglang.integration import cpu_platform as platform
from chameleon_sglang.integration.cpu_platform import (
    CPU_THREADS_BIND_ENV,
    default_cpu_threads_binding,
    split_cores,
)


@pytest.mark.parametrize(
    "cores, ranks, expected",
    [
        ([0, 1], 2, "0|1"),
        ([3, 1, 0, 2], 2, "0,1|2,3"),
        (list(range(5)), 2, "0,1,2|3,4"),
        ([0, 1], 3, "0|1|0"),
        ([4], 1, "4"),
    ],
)
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


@pytest.mark.parametrize(
    "spec, cores",
    [("0", [0]), ("0,1", [0, 1]), ("2-4,0", [0, 2, 3, 4]), ([1, 0], [0, 1]), ("", [])],
)
def test_cpu_lists_parse(spec, cores):
    text = ",".join(map(str, spec)) if isinstance(spec, list) else spec
    assert platform.parse_cpu_list(text) == cores


def test_a_rank_is_pinned_to_its_cores_with_as_many_torch_threads(monkeypatch):
    import torch

    pinned = {}
    monkeypatch.setattr(
        platform.os, "sched_setaffinity", lambda pid, cores: pinned.update(cores=sorted(cores))
    )
    monkeypatch.setattr(platform.os, "sched_getaffinity", lambda pid: {0, 1})
    threads = torch.get_num_threads()
    try:
        assert platform.bind_rank_threads("0") == [0]
        assert pinned["cores"] == [0] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_sglang_binds_itself_where_its_cpu_kernels_exist(monkeypatch):
    import importlib

    from chameleon_sglang.integration.hooks import cpu as plugin

    bootstrap = importlib.import_module(plugin.BOOTSTRAP_MODULE)
    monkeypatch.setattr(bootstrap, "_is_cpu_amx_available", True)
    calls = []
    plugin.bind_cpu_rank_threads(lambda **kw: calls.append(kw), local_omp_cpuid="0")
    assert calls == [{"local_omp_cpuid": "0"}]


def test_one_rank_keeps_sglangs_threads(monkeypatch):
    import importlib

    from chameleon_sglang.integration.hooks import cpu as plugin

    bootstrap = importlib.import_module(plugin.BOOTSTRAP_MODULE)
    monkeypatch.setattr(bootstrap, "_is_cpu_amx_available", False)
    monkeypatch.setattr(plugin, "_running_ranks", lambda: 1)
    calls = []
    plugin.bind_cpu_rank_threads(lambda **kw: calls.append(kw), local_omp_cpuid="0")
    assert calls == [{"local_omp_cpuid": "0"}]
