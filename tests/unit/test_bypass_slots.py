"""Bypass under SGLang's fixed LoRA slots: which younger requests can delay a blocked head."""

from __future__ import annotations

from types import SimpleNamespace

from chameleon_sglang.scheduler import RequestEntry
from chameleon_sglang.sglang_scheduler import _RunningAdapters


def entry(rid: str, adapter: str, predicted: int) -> RequestEntry:
    return RequestEntry(rid, adapter, 10, predicted, predicted, 8, 0.1, 0.0)


def running_view(remaining: dict, admitted_adapters=()) -> _RunningAdapters:
    """Running requests, one per adapter, each with ``remaining`` predicted steps left."""
    reqs, running = [], {}
    for i, (adapter, left) in enumerate(remaining.items()):
        req = SimpleNamespace(rid=f"run{i}", lora_id=adapter, output_ids=[0] * 5)
        reqs.append(req)
        running[req.rid] = (req, entry(req.rid, adapter, 5 + left))
    adder = SimpleNamespace(can_run_list=[SimpleNamespace(lora_id=a) for a in admitted_adapters])
    return _RunningAdapters(SimpleNamespace(reqs=reqs), running, adder)


def test_head_waits_for_the_first_adapter_to_free():
    """A blocked head gets a slot when the running adapter with the least work left finishes."""
    view = running_view({"a": 30, "b": 4})
    assert view.frees_in(entry("h", "cold", 10)) == 4


def test_request_of_a_later_freeing_adapter_cannot_delay_the_head():
    """A younger request whose adapter is not the first to free never delays the head."""
    view = running_view({"a": 30, "b": 4})
    assert view.holds_slot_until(entry("y", "a", 100)) == float("-inf")


def test_short_request_of_the_first_freeing_adapter_cannot_delay_the_head():
    """A younger request that finishes within its adapter's remaining work is harmless."""
    view = running_view({"a": 30, "b": 4})
    assert view.holds_slot_until(entry("y", "b", 3)) == float("-inf")


def test_long_request_of_the_first_freeing_adapter_would_delay_the_head():
    """A younger request that outlasts the first-freeing adapter's work reports its length."""
    view = running_view({"a": 30, "b": 4})
    assert view.holds_slot_until(entry("y", "b", 12)) == 12.0


def test_adapters_admitted_in_this_pass_count_as_resident():
    """Adapters admitted earlier in the same pass are resident for bypass."""
    view = running_view({"a": 30}, admitted_adapters=("c",))
    assert view.is_resident("a") and view.is_resident("c") and not view.is_resident("d")
