"""Other processes' CPU share between two snapshots."""

from __future__ import annotations

import os

import pytest

from eval.machine_load import LoadSnapshot, foreign_share, snapshot


def test_foreign_share_subtracts_own_cpu():
    cores = os.cpu_count() or 1
    a = LoadSnapshot(t=0.0, machine_busy_s=100.0, group_s=10.0, self_s=1.0, loadavg_1m=1.0)
    b = LoadSnapshot(
        t=10.0, machine_busy_s=100.0 + 5.0 * cores, group_s=12.0, self_s=2.0, loadavg_1m=2.0
    )
    share = foreign_share(a, b)
    assert share["foreign_cpu_share"] == pytest.approx((5.0 * cores - 3.0) / (10.0 * cores))
    assert (share["loadavg_1m_start"], share["loadavg_1m_end"]) == (1.0, 2.0)
    assert foreign_share(None, b)["foreign_cpu_share"] is None


def test_snapshot_of_this_machine():
    s = snapshot(os.getpgid(0))
    if s is None:
        pytest.skip("no /proc")
    assert s.machine_busy_s > 0 and s.self_s > 0
