"""Figures are written with data and, where nothing was reported, with a note instead."""

from __future__ import annotations

from eval import plots


def test_plots_with_data(tmp_path):
    status = {
        "active_components": ["adapter_cache"],
        "adapter_cache": {"hit_rate": 0.5, "resident_bytes": 2**21},
    }
    paths = [
        plots.ttft_cdf({"stock": [0.1, 0.2, 0.4], "chameleon": [0.1, 0.15]}, tmp_path / "a.png"),
        plots.ttft_vs_load(
            {"stock": [(1.0, 0.1, 0.3), (2.0, 0.2, 0.9)]}, tmp_path / "b.png", slo_s=0.5
        ),
        plots.queueing_share(
            {"stock": {"small": {"share": 0.1}, "large": {"share": None}}},
            tmp_path / "c.png",
            "meta_info.queue_time",
        ),
        plots.cache_and_memory({"chameleon": [(0.0, status), (5.0, status)]}, tmp_path / "d.png"),
    ]
    assert all(p.is_file() and p.stat().st_size > 1000 for p in paths)


def test_plots_without_data(tmp_path):
    assert plots.ttft_cdf({"stock": []}, tmp_path / "a.png").is_file()
    assert plots.cache_and_memory({"stock": [(0.0, None)]}, tmp_path / "d.png").is_file()
