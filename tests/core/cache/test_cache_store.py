import pytest
from cache_factories import FakeSlotStore


def test_slots_for_bytes_rounds_up():
    """An adapter occupies ceil(bytes / bytes_per_slot) slots."""
    store = FakeSlotStore(10, bytes_per_slot=64)
    assert [store.slots_for_bytes(n) for n in (1, 64, 65, 128)] == [1, 1, 2, 2]


def test_alloc_returns_none_when_there_is_not_enough_room():
    """alloc refuses more slots than are free and changes nothing."""
    store = FakeSlotStore(10, 1)
    assert store.alloc(7) is not None
    assert store.alloc(4) is None
    assert store.num_free_slots() == 3


def test_double_free_raises():
    """Freeing a handle twice is an error."""
    store = FakeSlotStore(10, 1)
    handle = store.alloc(3)
    store.free(handle)
    with pytest.raises(ValueError, match="double free"):
        store.free(handle)


def test_freeing_an_unknown_handle_raises():
    """Freeing a handle the store never gave out is an error."""
    store = FakeSlotStore(10, 1)
    with pytest.raises(ValueError, match="unknown"):
        store.free(42)
    with pytest.raises(ValueError, match="unknown"):
        store.free("x")
