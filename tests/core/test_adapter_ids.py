"""Adapter ids (SGLang's LoRA "buffer ids") of the adapter cache's pool."""

from __future__ import annotations

import pytest

from chameleon_sglang.memory.adapter_ids import BASE_ID, AdapterIds


def test_the_base_model_is_id_0_and_adapters_take_the_others():
    ids = AdapterIds(capacity=4)
    assert ids.id_of == {None: BASE_ID} and ids.uid_of == [None]
    assert [ids.take(u) for u in ("a", "b", "c")] == [1, 2, 3]
    assert ids.id_of == {None: 0, "a": 1, "b": 2, "c": 3} and ids.uid_of == [None, "a", "b", "c"]


def test_a_released_id_is_taken_again_first():
    ids = AdapterIds(capacity=8)
    for uid in ("a", "b", "c"):
        ids.take(uid)
    assert ids.release("b") == 2
    assert ids.uid_of[2] is None and "b" not in ids.id_of
    assert ids.take("d") == 2


def test_ids_double_when_they_run_out_unless_a_limit_holds_them():
    ids = AdapterIds(capacity=2)
    assert ids.take("a") == 1 and ids.capacity == 2
    assert ids.take("b") == 2 and ids.capacity == 4
    ids.limit = 4
    assert ids.take("c") == 3 and not ids.can_take()
    with pytest.raises(RuntimeError):
        ids.take("d")
    ids.release("a")
    assert ids.can_take() and ids.take("d") == 1


def test_capacity_must_hold_an_adapter():
    with pytest.raises(ValueError):
        AdapterIds(capacity=1)
