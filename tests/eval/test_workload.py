"""Workload synthesis: determinism, rank mix, Zipf popularity, length scaling, arrivals."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
from eval_factories import make_adapters, write_trace

from eval.trace import DEFAULT_TRACE, parse_timestamp, read_trace
from eval.workload import (
    MIN_TOKEN_ID,
    SIZE_CLASSES,
    WorkloadSpec,
    assign_adapters,
    build_workload,
    map_adapter_ids,
    poisson_arrivals,
    poisson_arrivals_until,
    scale_length,
    size_classes,
    zipf_weights,
)

VOCAB = 2048


@pytest.fixture
def trace(tmp_path):
    rows = [(i * 0.5, 100 + 37 * i, 3 + 11 * i) for i in range(60)]
    return write_trace(tmp_path / "t.csv", rows)


def spec(trace, **kw) -> WorkloadSpec:
    return WorkloadSpec(trace=str(trace), **kw)


def test_same_seed_same_workload(trace):
    adapters = make_adapters()
    a = build_workload(spec(trace, rps=2.0, max_requests=40), adapters, VOCAB)
    b = build_workload(spec(trace, rps=2.0, max_requests=40), adapters, VOCAB)
    assert a == b and len(a) == 40


def test_other_seed_other_workload(trace):
    adapters = make_adapters()
    a = build_workload(spec(trace, rps=2.0, max_requests=40, seed=0), adapters, VOCAB)
    b = build_workload(spec(trace, rps=2.0, max_requests=40, seed=1), adapters, VOCAB)
    assert [r.adapter for r in a] != [r.adapter for r in b]
    assert [r.arrival_s for r in a] != [r.arrival_s for r in b]
    assert a[0].input_ids != b[0].input_ids


def test_prompts_have_exact_length_and_range(trace):
    wl = build_workload(spec(trace, max_requests=30), make_adapters(), VOCAB)
    for r in wl:
        assert len(r.input_ids) == r.input_len
        assert all(MIN_TOKEN_ID <= t < VOCAB for t in r.input_ids)


def test_prompt_salt_changes_prompts_only(trace):
    adapters = make_adapters()
    a = build_workload(spec(trace, rps=2.0, max_requests=10), adapters, VOCAB)
    b = build_workload(spec(trace, rps=2.0, max_requests=10, prompt_salt=5), adapters, VOCAB)
    assert [r.adapter for r in a] == [r.adapter for r in b]
    assert all(x.input_ids != y.input_ids for x, y in zip(a, b))


def test_ranks_equally_likely():
    adapters = make_adapters(100)
    picks = assign_adapters(20000, adapters, 1.0, np.random.default_rng(0))
    counts = Counter(a.rank for a in picks)
    assert set(counts) == {8, 16, 32, 64, 128}
    for c in counts.values():  # binomial sd ~ 57: allow 5 sd
        assert abs(c - 4000) < 5 * 57


def test_power_law_within_a_rank():
    adapters = make_adapters(100)
    picks = assign_adapters(50000, adapters, 1.0, np.random.default_rng(1))
    rank8 = [a for a in adapters if a.rank == 8]
    counts = np.array([sum(1 for p in picks if p.name == a.name) for a in rank8], dtype=float)
    assert counts[0] > counts[1] > counts[2] > counts[5] > counts[19]
    assert counts[0] / counts[1] == pytest.approx(2.0, rel=0.1)
    slope = np.polyfit(np.log(np.arange(1, 21)), np.log(counts), 1)[0]
    assert slope == pytest.approx(-1.0, abs=0.12)


def test_zipf_exponent_is_configurable():
    assert zipf_weights(4, 0.0) == pytest.approx([0.25] * 4)
    w1, w2 = zipf_weights(20, 1.0), zipf_weights(20, 2.0)
    assert w2[0] > w1[0]
    assert w1[0] / w1[1] == pytest.approx(2.0) and w2[0] / w2[1] == pytest.approx(4.0)


@pytest.mark.parametrize(
    "tokens,expected_in,expected_out",
    [(0, 1, 4), (7, 1, 4), (8, 1, 4), (40, 5, 5), (800, 100, 64), (100000, 512, 64)],
)
def test_scaling_and_caps(tokens, expected_in, expected_out):
    assert scale_length(tokens, 8.0, 1, 512) == expected_in
    assert scale_length(tokens, 8.0, 4, 64) == expected_out


def test_workload_lengths_follow_the_trace(trace):
    wl = build_workload(spec(trace, max_requests=60), make_adapters(), VOCAB)
    rows = read_trace(trace)
    for r, row in zip(wl, rows):
        assert r.input_len == min(512, max(1, row.input_tokens // 8))
        assert r.output_len == min(64, max(4, row.output_tokens // 8))
        assert (r.trace_input, r.trace_output) == (row.input_tokens, row.output_tokens)
    assert max(r.input_len for r in wl) <= 512 and min(r.output_len for r in wl) >= 4


def test_other_caps(trace):
    wl = build_workload(
        spec(trace, length_divisor=2.0, max_input=64, max_output=16, min_output=2),
        make_adapters(),
        VOCAB,
    )
    assert max(r.input_len for r in wl) == 64 and max(r.output_len for r in wl) == 16
    assert wl[0].output_len == 2  # trace output 3 // 2 = 1, raised to the minimum


def test_poisson_rate():
    rng = np.random.default_rng(3)
    t = poisson_arrivals(20001, 5.0, rng)
    gaps = np.diff(t)
    assert t[0] == 0.0 and np.all(gaps > 0)
    assert gaps.mean() == pytest.approx(0.2, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV = 1


def test_poisson_until_duration():
    t = poisson_arrivals_until(1000.0, 4.0, np.random.default_rng(4))
    assert t[-1] <= 1000.0 and len(t) == pytest.approx(4000, rel=0.06)


def test_rps_workload_uses_poisson_arrivals(trace):
    wl = build_workload(spec(trace, rps=10.0, max_requests=200), make_adapters(), VOCAB)
    assert len(wl) == 200  # more than the 60 trace rows: rows are reused cyclically
    assert wl[60].trace_row == 0
    assert np.diff([r.arrival_s for r in wl]).mean() == pytest.approx(0.1, rel=0.2)


def test_trace_arrivals_time_scale_and_duration(trace):
    base = build_workload(spec(trace), make_adapters(), VOCAB)
    assert [r.arrival_s for r in base][:3] == pytest.approx([0.0, 0.5, 1.0])
    fast = build_workload(spec(trace, time_scale=0.5), make_adapters(), VOCAB)
    assert [r.arrival_s for r in fast][:3] == pytest.approx([0.0, 0.25, 0.5])
    short = build_workload(spec(trace, duration_s=10.0), make_adapters(), VOCAB)
    assert len(short) == 21 and short[-1].arrival_s == pytest.approx(10.0)
    capped = build_workload(spec(trace, max_requests=7), make_adapters(), VOCAB)
    assert len(capped) == 7


def test_iso_timestamps(tmp_path):
    path = write_trace(
        tmp_path / "iso.csv",
        [("2023-11-16 18:15:46.6805900", 10, 10), ("2023-11-16 18:15:50.9951690", 10, 10)],
    )
    rows = read_trace(path)
    assert rows[1].offset_s == pytest.approx(4.314579, abs=1e-5)
    assert parse_timestamp("12.5") == 12.5


def test_adapter_id_column_is_used(tmp_path):
    adapters = make_adapters(10)
    ids = ["a003r64", "7", "user-x", "user-y", "user-x"]
    path = write_trace(tmp_path / "ids.csv", [(i, 80, 80) for i in range(5)], ids)
    wl = build_workload(spec(path), adapters, VOCAB)
    assert [r.adapter for r in wl] == [
        "a003r64",
        adapters[7].name,
        adapters[0].name,
        adapters[1].name,
        adapters[0].name,
    ]
    assert map_adapter_ids(["12"], adapters)[0] == adapters[2]


def test_size_classes_are_tertiles_of_wrs(trace):
    wl = build_workload(spec(trace, rps=5.0, max_requests=300), make_adapters(), VOCAB)
    counts = Counter(r.size_class for r in wl)
    assert set(counts) == set(SIZE_CLASSES)
    assert all(80 <= c <= 120 for c in counts.values())
    by = {c: [r.wrs for r in wl if r.size_class == c] for c in SIZE_CLASSES}
    assert max(by["small"]) <= min(by["medium"]) and max(by["medium"]) <= min(by["large"])
    assert size_classes(np.asarray([0.1, 0.2, 0.3])) == ["small", "medium", "large"]


def test_default_trace_baseline_recipe():
    """The default trace (kept in the repository) with the baseline recipe: 150 requests at
    3 req/s over 100 adapters."""
    assert DEFAULT_TRACE.is_file() and "shared" not in DEFAULT_TRACE.parts
    s = WorkloadSpec(rps=3.0, max_requests=150)
    wl = build_workload(s, make_adapters(100), VOCAB)
    assert len(wl) == 150
    assert max(r.input_len for r in wl) <= 512 and max(r.output_len for r in wl) <= 64
    assert dataclasses.replace(s, seed=0) == s


def test_rank_zipf_makes_small_ranks_popular_and_zero_keeps_the_old_draws(trace):
    uniform = build_workload(spec(trace), make_adapters(), VOCAB)
    same = build_workload(spec(trace, rank_zipf_s=0.0), make_adapters(), VOCAB)
    assert [r.adapter for r in uniform] == [r.adapter for r in same]
    skewed = build_workload(spec(trace, rank_zipf_s=1.5), make_adapters(), VOCAB)
    counts = Counter(r.rank for r in skewed)
    assert counts[8] > counts[128] and counts[8] >= max(counts.values())
