"""The adapter-catalog benchmark's workload, cold/warm split and arm commands (no server)."""

from __future__ import annotations

from pathlib import Path

from eval.catalog import arm_command, catalog_workload, cold_indices, tbt_during_cold_waits
from eval.loadgen import RequestResult


def _result(index, sent, ttft, gaps, status="ok"):
    return RequestResult(
        index=index, adapter="a", rank=8, size_class="-", input_len=1, output_len=1,
        arrival_s=sent, status=status, sent_s=sent, ttft_s=ttft, tbt_s=tuple(gaps),
    )  # fmt: skip


def test_the_workload_is_seeded_zipf_over_the_catalog_with_poisson_arrivals(tiny_assets):
    a = catalog_workload(tiny_assets, 400, rate=4.0, zipf=1.0)
    assert a == catalog_workload(tiny_assets, 400, rate=4.0, zipf=1.0)
    counts = {}
    for req in a:
        counts[req.adapter] = counts.get(req.adapter, 0) + 1
        assert 64 <= req.input_len <= 256 and len(req.input_ids) == req.input_len
    ordered = sorted(counts.values(), reverse=True)
    assert ordered[0] > 3 * ordered[-1]  # skewed popularity
    arrivals = [r.arrival_s for r in a]
    assert arrivals == sorted(arrivals) and 70 < arrivals[-1] < 130  # ~100 s at 4/s


def test_cold_requests_are_the_first_of_each_adapter(tiny_assets):
    reqs = catalog_workload(tiny_assets, 50, rate=4.0, zipf=1.0)
    cold = cold_indices(reqs)
    assert len(cold) == len({r.adapter for r in reqs})
    first = {}
    for r in reqs:
        first.setdefault(r.adapter, r.index)
    assert cold == set(first.values())


def test_warm_token_gaps_are_split_by_cold_waits():
    cold = _result(0, sent=1.0, ttft=1.0, gaps=[0.1])  # waits from 1.0 to 2.0
    warm = _result(1, sent=0.0, ttft=0.5, gaps=[0.5, 1.2, 0.1, 0.1])  # tokens 1.0 2.2 2.3 2.4
    during, outside = tbt_during_cold_waits([cold, warm], {0})
    assert during == [0.5] and outside == [1.2, 0.1, 0.1]


def test_stock_preregisters_every_adapter_and_chameleon_only_names_the_directory(
    tiny_assets, tmp_path: Path
):
    stock = arm_command("stock", tiny_assets, 1234, "float32", tmp_path)
    assert stock.count("--lora-paths") == 1 and "--chameleon" not in stock
    assert all(f"{a.name}={a.path}" in stock for a in tiny_assets.adapters)
    cham = arm_command("chameleon", tiny_assets, 1234, "float32", tmp_path)
    assert "--lora-paths" not in cham and "--chameleon" in cham
    assert cham[cham.index("--chameleon-adapter-dir") + 1] == str(tiny_assets.root / "adapters")
    empty = arm_command("chameleon-empty", tiny_assets, 1234, "float32", tmp_path)
    directory = Path(empty[empty.index("--chameleon-adapter-dir") + 1])
    assert directory.is_dir() and not any(directory.iterdir())
