"""The host-link model: a host-to-device adapter copy takes at least bytes / bandwidth."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from chameleon_sglang.integration.hooks.lora import (
    load_into_slot_with_host_link,
    use_stock_pool_link,
)
from chameleon_sglang.memory.host_link import HostLink


@pytest.fixture(autouse=True)
def _no_link_model_afterwards():
    yield
    use_stock_pool_link(HostLink())


def _adapter(num_bytes: int) -> SimpleNamespace:
    weight = torch.zeros(num_bytes // 4, dtype=torch.float32)
    return SimpleNamespace(layers=[SimpleNamespace(weights={"w": weight})])


def _timed_load(gbps: float, adapter: SimpleNamespace) -> float:
    use_stock_pool_link(HostLink(gbps))
    pool = SimpleNamespace()
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
    use_stock_pool_link(HostLink(0.01))
    start = time.perf_counter()
    load_into_slot_with_host_link(lambda *a, **k: None, SimpleNamespace(), None, 0, None)
    assert time.perf_counter() - start < 0.04


def test_the_adapter_cache_and_the_stock_pool_share_one_link_model():
    """``HostLink.hold`` is the one model: 40 kB at 0.001 GB/s take at least 40 ms from the
    copy's start, and a copy that already took that long is not held further."""
    start = time.perf_counter()
    HostLink(0.001).hold(40_000, start)
    assert time.perf_counter() - start >= 0.04
    late = time.perf_counter() - 1.0
    start = time.perf_counter()
    HostLink(0.001).hold(40_000, late)
    assert time.perf_counter() - start < 0.04
