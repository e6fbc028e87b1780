"""Workload files replay exactly; result records round-trip through JSON."""

from __future__ import annotations

import json

from eval_factories import make_adapters, result, write_trace

from eval.loadgen import RequestResult, request_body
from eval.workload import (
    WorkloadSpec,
    build_workload,
    load_spec,
    load_workload,
    save_spec,
    save_workload,
)


def test_workload_round_trip(tmp_path):
    trace = write_trace(tmp_path / "t.csv", [(i, 50 + i, 20 + i) for i in range(25)])
    spec = WorkloadSpec(trace=str(trace), rps=4.0, max_requests=25, seed=9)
    wl = build_workload(spec, make_adapters(), 2048)
    path = tmp_path / "out" / "workload.jsonl"
    save_workload(path, wl)
    assert len(path.read_text().splitlines()) == 25
    assert load_workload(path) == wl


def test_spec_round_trip(tmp_path):
    spec = WorkloadSpec(rps=2.5, max_requests=10, zipf_s=1.3, duration_s=30.0)
    save_spec(tmp_path / "spec.json", spec)
    assert load_spec(tmp_path / "spec.json") == spec
    assert load_spec(tmp_path / "missing.json") is None


def test_request_body_sends_exact_ids(tmp_path):
    trace = write_trace(tmp_path / "t.csv", [(0, 80, 40)])
    req = build_workload(WorkloadSpec(trace=str(trace)), make_adapters(), 2048)[0]
    body = request_body(req)
    assert body["input_ids"] == list(req.input_ids) and len(body["input_ids"]) == 10
    assert body["sampling_params"]["max_new_tokens"] == 5
    assert body["sampling_params"]["ignore_eos"] is True
    assert body["stream"] is True and body["lora_path"] == req.adapter


def test_result_round_trip():
    r = result(3, tbt=(0.1, 0.2), queue=0.05, retractions=2)
    assert RequestResult.from_json(json.loads(json.dumps(r.to_json()))) == r
