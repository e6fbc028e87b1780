"""The per-name locks that make concurrent first requests for one adapter load it once."""

from __future__ import annotations

import asyncio
import contextlib

from chameleon_sglang.catalog.name_locks import NameLocks


def test_requests_for_one_name_take_turns_and_others_do_not_wait():
    locks, order = NameLocks(), []

    async def request(tag: str, names, hold_s: float) -> None:
        async with locks.hold(names):
            order.append(f"{tag}+")
            await asyncio.sleep(hold_s)
            order.append(f"{tag}-")

    async def scenario() -> None:
        first = asyncio.create_task(request("a1", ["a"], 0.05))
        await asyncio.sleep(0)  # a1 holds "a"
        await asyncio.gather(first, request("a2", ["a"], 0), request("b", ["b"], 0))

    asyncio.run(scenario())
    assert order.index("a1-") < order.index("a2+")  # the second waited for the first
    assert order.index("b-") < order.index("a1-")  # another name did not wait
    assert len(locks) == 0  # nothing left behind


def test_overlapping_name_sets_do_not_deadlock_and_a_burst_leaves_nothing():
    locks = NameLocks()

    async def request(names) -> None:
        async with locks.hold(names):
            await asyncio.sleep(0.001)

    async def scenario() -> None:
        await asyncio.wait_for(
            asyncio.gather(
                request(["x", "y"]), request(["y", "x"]), *(request([f"n{i}"]) for i in range(500))
            ),
            timeout=10,
        )

    asyncio.run(scenario())
    assert len(locks) == 0


def test_a_failure_inside_releases_the_locks():
    locks = NameLocks()

    async def failing() -> None:
        async with locks.hold(["a"]):
            raise ValueError("load failed")

    async def scenario() -> None:
        with contextlib.suppress(ValueError):
            await failing()
        async with locks.hold(["a"]):  # not stuck
            pass

    asyncio.run(asyncio.wait_for(scenario(), timeout=5))
    assert len(locks) == 0
