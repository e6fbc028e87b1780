"""Trace input beyond the Azure CSV: JSONL in the Mooncake/Kimi shape (timestamps in ms), read
directly or converted to the CSV shape with ``python -m eval.trace``."""

from __future__ import annotations

import json

import pytest
from eval_factories import make_adapters

from eval.trace import main as convert
from eval.trace import read_trace
from eval.workload import WorkloadSpec, build_workload

ROWS = [
    {
        "timestamp": 1000 + 250 * i * i,
        "input_length": 300 + 7 * i,
        "output_length": 20 + i,
        "hash_ids": [i, i + 1],
    }
    for i in range(12)
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_reads_as_seconds_from_the_first_row(tmp_path):
    rows = read_trace(write_jsonl(tmp_path / "m.jsonl", ROWS))
    assert [r.offset_s for r in rows] == pytest.approx([0.25 * i * i for i in range(12)])
    assert [r.input_tokens for r in rows] == [300 + 7 * i for i in range(12)]
    assert all(r.adapter_id is None for r in rows)
    assert [
        r.offset_s for r in read_trace(tmp_path / "m.jsonl", start_row=4, max_rows=3)
    ] == pytest.approx([0.0, 0.25 * 25 - 4.0, 0.25 * 36 - 4.0])


def test_jsonl_adapter_key_is_kept(tmp_path):
    rows = [dict(r, adapter=f"lora{i % 3}") for i, r in enumerate(ROWS)]
    got = read_trace(write_jsonl(tmp_path / "a.jsonl", rows))
    assert [r.adapter_id for r in got] == [f"lora{i % 3}" for i in range(12)]


def test_a_malformed_jsonl_row_names_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"timestamp": 5}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*input_length"):
        read_trace(path)


def test_converted_csv_reads_back_the_same_rows(tmp_path, capsys):
    rows = [dict(r, adapter=f"a{i % 2}") for i, r in enumerate(ROWS)]
    src = write_jsonl(tmp_path / "m.jsonl", rows)
    assert convert([str(src), str(tmp_path / "m.csv")]) == 0
    assert "12 rows" in capsys.readouterr().out
    assert [
        (r.input_tokens, r.output_tokens, r.adapter_id) for r in read_trace(tmp_path / "m.csv")
    ] == [(r.input_tokens, r.output_tokens, r.adapter_id) for r in read_trace(src)]
    assert [r.offset_s for r in read_trace(tmp_path / "m.csv")] == pytest.approx(
        [r.offset_s for r in read_trace(src)]
    )


def test_trace_arrivals_keep_the_jsonl_burstiness(tmp_path):
    src = write_jsonl(tmp_path / "m.jsonl", ROWS)
    workload = build_workload(
        WorkloadSpec(trace=str(src), rps=None, max_requests=12), make_adapters(), 2048
    )
    assert [w.arrival_s for w in workload] == pytest.approx([0.25 * i * i for i in range(12)])
