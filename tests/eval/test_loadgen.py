"""The streaming client against a fake SSE ``/generate`` on 127.0.0.1: timings, records, limits."""

from __future__ import annotations

import asyncio
import json
from typing import List

import pytest
from aiohttp import web
from eval_factories import make_adapters, write_trace

from chameleon_sglang.dev.serve import free_port
from eval.loadgen import (
    STATUS_ERROR,
    STATUS_NOT_SENT,
    STATUS_OK,
    STATUS_TIMEOUT,
    check_loopback,
    run_load,
)
from eval.workload import WorkloadRequest, WorkloadSpec, build_workload

GAP_S = 0.05


async def generate(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if body["lora_path"] == "a001r16":
        return web.json_response({"error": {"message": "bad adapter"}}, status=400)
    n = body["sampling_params"]["max_new_tokens"]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await asyncio.sleep(0.1 if body["lora_path"] != "a002r32" else 3.0)
    for i in range(1, n + 1):
        meta = {
            "num_retractions": 1,
            "queue_time": 0.01,
            "finish_reason": {"type": "length"} if i == n else None,
        }
        chunk = {"output_ids": list(range(i)), "meta_info": meta}
        await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await asyncio.sleep(GAP_S)
    await resp.write(b"data: [DONE]\n\n")
    return resp


def requests_for(adapters: List[str], tmp_path, arrivals: List[float]) -> List[WorkloadRequest]:
    trace = write_trace(tmp_path / "t.csv", [(0, 80, 32)] * len(adapters))
    wl = build_workload(WorkloadSpec(trace=str(trace)), make_adapters(10), 2048)
    names = {a.name: a for a in make_adapters(10)}
    return [
        WorkloadRequest(**{**r.__dict__, "adapter": a, "rank": names[a].rank, "arrival_s": t})
        for r, a, t in zip(wl, adapters, arrivals)
    ]


async def serve_and_run(reqs, deadline_s):
    app = web.Application()
    app.router.add_post("/generate", generate)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        return await run_load(f"http://127.0.0.1:{port}", reqs, deadline_s, progress=False)
    finally:
        await runner.cleanup()


def test_stream_timings_and_statuses(tmp_path):
    reqs = requests_for(
        ["a000r8", "a001r16", "a002r32", "a003r64", "a005r8"], tmp_path, [0.0, 0.1, 0.0, 0.2, 5.0]
    )
    out = asyncio.run(serve_and_run(reqs, deadline_s=2.0))
    ok, bad, slow, ok2, unsent = out
    for r in (ok, ok2):
        assert r.status == STATUS_OK and r.num_output_tokens == 4
        assert r.ttft_s == pytest.approx(0.1, abs=0.08)
        assert len(r.tbt_s) == 3 and all(g == pytest.approx(GAP_S, abs=0.04) for g in r.tbt_s)
        assert r.e2e_s >= r.ttft_s + sum(r.tbt_s) - 1e-6
        assert r.num_retractions == 1 and r.queue_time_s == 0.01
        assert r.finish_reason == "length"
    assert ok2.sent_s == pytest.approx(0.2, abs=0.1)
    assert bad.status == STATUS_ERROR and "HTTP 400" in bad.error
    assert slow.status == STATUS_TIMEOUT
    assert unsent.status == STATUS_NOT_SENT and unsent.sent_s is None
    assert [r.index for r in out] == [r.index for r in reqs]


def test_only_loopback_is_accepted():
    assert check_loopback("http://127.0.0.1:30000/") == "http://127.0.0.1:30000"
    for url in ("http://localhost:30000", "http://10.0.0.1:30000", "http://example.com"):
        with pytest.raises(ValueError):
            check_loopback(url)
