"""The host-link model: a host-to-device adapter copy takes at least bytes / bandwidth."""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from chameleon_sglang.plugin import load_into_slot_with_host_link


def _adapter(num_bytes: int) -> SimpleNamespace:
    weight = torch.zeros(num_bytes // 4, dtype=torch.float32)
    return SimpleNamespace(layers=[SimpleNamespace(weights={"w": weight})])


def _timed_load(gbps: float, adapter: SimpleNamespace) -> float:
    pool = SimpleNamespace(chameleon_host_link_gbps=gbps)
    calls = []
    start = time.perf_counter()
    load_into_slot_with_host_link(lambda *a, **k: calls.append(a), pool, "uid", 3, adapter)
    assert len(calls) == 1  # SGLang's own slot fill ran
    return time.perf_counter() - start


def test_slot_fill_is_held_to_the_modelled_bandwidth():
    """400 kB over a 0.01 GB/s link takes at least 40 ms."""
    assert _timed_load(0.01, _adapter(400_000)) >= 0.04


def test_without_a_link_model_the_fill_is_not_delayed():
    """Bandwidth 0 (the default) adds no delay, and base-model fills (uid None) never wait."""
    assert _timed_load(0.0, _adapter(400_000)) < 0.04
    pool = SimpleNamespace(chameleon_host_link_gbps=0.01)
    start = time.perf_counter()
    load_into_slot_with_host_link(lambda *a, **k: None, pool, None, 0, None)
    assert time.perf_counter() - start < 0.04
