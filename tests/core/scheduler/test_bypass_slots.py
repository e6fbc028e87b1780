"""Bypass estimates from plain data: under fixed LoRA slots (which younger requests can delay a
blocked head) and with the adapter cache (when a blocked head's memory frees)."""

from __future__ import annotations

from chameleon_sglang.scheduler import RequestEntry
from chameleon_sglang.scheduler.bypass import CacheBypassView, SlotBypassView


def entry(rid: str, adapter: str, predicted: int) -> RequestEntry:
    return RequestEntry(rid, adapter, 10, predicted, predicted, 8, 0.1, 0.0)


def running_view(remaining: dict, admitted_adapters=()) -> SlotBypassView:
    """Running requests, one per adapter, each with ``remaining`` predicted steps left."""
    return SlotBypassView(lambda: list(remaining.items()), lambda: list(admitted_adapters))


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


def test_the_most_work_left_counts_per_adapter():
    """An adapter's slot frees when its last request finishes: its requests' most steps left."""
    view = SlotBypassView(lambda: [("a", 3.0), ("a", 9.0), ("b", 5.0)], lambda: ())
    assert view.frees_in(entry("h", "cold", 10)) == 5.0
    assert view.holds_slot_until(entry("y", "b", 7)) == 7.0


def test_slot_hooks_carry_all_three_estimates():
    hooks = running_view({"a": 30, "b": 4}).hooks()
    assert hooks.is_adapter_resident("a") and not hooks.is_adapter_resident("z")
    assert hooks.predicted_free_at(entry("h", "cold", 10)) == 4
    assert hooks.predicted_finish_at(entry("y", "b", 12)) == 12.0


def test_with_the_cache_memory_frees_when_the_first_running_request_finishes():
    """With the adapter cache, resident means cached, and a blocked head's memory frees when
    the running request with the fewest predicted steps left finishes (0 with none running)."""
    cached = {"hot"}
    view = CacheBypassView(lambda: [("a", 30.0), (None, 6.0), ("b", 11.0)], cached.__contains__)
    hooks = view.hooks()
    assert hooks.predicted_free_at(entry("h", "cold", 10)) == 6.0
    assert hooks.is_adapter_resident("hot") and not hooks.is_adapter_resident("cold")
    assert CacheBypassView(lambda: [], cached.__contains__).frees_in(entry("h", "x", 1)) == 0.0
