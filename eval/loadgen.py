"""Open-loop load generator on SGLang's native streaming ``/generate``.

Contract:
* Only loopback servers are accepted (``http://127.0.0.1:<port>``).
* Request ``i`` is sent at ``start + arrival_s`` whatever happened to earlier ones (open loop).
  The run ends when every request has finished or at ``deadline_s`` after the start, whichever
  comes first; requests still running then are cancelled (``status="timeout"``) and requests not
  yet sent are recorded as ``status="not_sent"``. Nothing outlives :func:`run_load`.
* Timing (client clock, ``time.perf_counter``): TTFT = send to first streamed chunk carrying an
  output token; TBT = gaps between consecutive such chunks; e2e = send to ``data: [DONE]``.
* ``meta_info.num_retractions`` and, where the server reports it (``--enable-metrics``),
  ``meta_info.queue_time`` are copied from the last chunk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

import aiohttp

from eval.workload import WorkloadRequest

LOOPBACK = "127.0.0.1"
STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_TIMEOUT = "timeout"
STATUS_NOT_SENT = "not_sent"
_READ_BUFSIZE = 1 << 22


@dataclasses.dataclass(frozen=True)
class RequestResult:
    """What happened to one request. Offsets are seconds from the run start."""

    index: int
    adapter: str
    rank: int
    size_class: str
    input_len: int
    output_len: int
    arrival_s: float
    status: str
    sent_s: Optional[float] = None
    ttft_s: Optional[float] = None
    e2e_s: Optional[float] = None
    tbt_s: Tuple[float, ...] = ()
    num_output_tokens: int = 0
    num_retractions: int = 0
    queue_time_s: Optional[float] = None
    finish_reason: Optional[str] = None
    error: Optional[str] = None

    @property
    def is_ok(self) -> bool:
        return self.status == STATUS_OK

    @property
    def completion_s(self) -> Optional[float]:
        """Offset of the last byte, or None if it did not complete."""
        if self.sent_s is None or self.e2e_s is None:
            return None
        return self.sent_s + self.e2e_s

    def to_json(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tbt_s"] = list(self.tbt_s)
        return d

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> RequestResult:
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields}
        kwargs["tbt_s"] = tuple(d.get("tbt_s") or ())
        return cls(**kwargs)


def check_loopback(url: str) -> str:
    """``url`` without a trailing slash; raises unless its host is 127.0.0.1."""
    host = urlparse(url).hostname
    if host != LOOPBACK:
        raise ValueError(f"refusing to send load to {url!r}: only {LOOPBACK} is allowed")
    return url.rstrip("/")


def request_body(req: WorkloadRequest) -> Dict[str, Any]:
    """The ``/generate`` body: exact ``input_ids``, ``ignore_eos``, ``max_new_tokens``."""
    return {
        "input_ids": list(req.input_ids),
        "sampling_params": {
            "max_new_tokens": req.output_len,
            "temperature": 0.0,
            "ignore_eos": True,
        },
        "lora_path": req.adapter,
        "stream": True,
    }


def _base(req: WorkloadRequest, status: str, **kw: Any) -> RequestResult:
    return RequestResult(
        index=req.index,
        adapter=req.adapter,
        rank=req.rank,
        size_class=req.size_class,
        input_len=req.input_len,
        output_len=req.output_len,
        arrival_s=req.arrival_s,
        status=status,
        **kw,
    )


class _Stream:
    """Accumulates the chunks of one streamed response."""

    def __init__(self, t_send: float) -> None:
        self.t_send = t_send
        self.token_times: List[float] = []
        self.num_tokens = 0
        self.meta: Dict[str, Any] = {}
        self.error: Optional[str] = None
        self.done_at: Optional[float] = None

    def feed(self, line: bytes, now: float) -> None:
        text = line.decode("utf-8", "replace").strip()
        if not text.startswith("data:"):
            return
        payload = text[5:].strip()
        if payload == "[DONE]":
            self.done_at = now
            return
        chunk = json.loads(payload)
        if "error" in chunk:
            self.error = json.dumps(chunk["error"])[:500]
            return
        self.meta = chunk.get("meta_info") or self.meta
        n = len(chunk.get("output_ids") or ())
        if n > self.num_tokens:
            self.num_tokens = n
            self.token_times.append(now)

    def result(self, req: WorkloadRequest, start: float) -> RequestResult:
        finish = self.meta.get("finish_reason")
        finish_type = finish.get("type") if isinstance(finish, dict) else finish
        ok = self.error is None and self.done_at is not None and bool(self.token_times)
        times = self.token_times
        queue = self.meta.get("queue_time")
        return _base(
            req,
            STATUS_OK if ok else STATUS_ERROR,
            sent_s=self.t_send - start,
            ttft_s=times[0] - self.t_send if times else None,
            e2e_s=(self.done_at - self.t_send) if ok and self.done_at else None,
            tbt_s=tuple(b - a for a, b in zip(times, times[1:])),
            num_output_tokens=self.num_tokens,
            num_retractions=int(self.meta.get("num_retractions") or 0),
            queue_time_s=float(queue) if isinstance(queue, (int, float)) else None,
            finish_reason=finish_type,
            error=None if ok else (self.error or "stream ended without [DONE]"),
        )


async def send_one(
    session: aiohttp.ClientSession,
    url: str,
    req: WorkloadRequest,
    start: float,
    routing_header: Optional[str] = None,
) -> RequestResult:
    """Send ``req`` now and stream its response to the end; with ``routing_header``, its adapter's
    name goes in that header too (a gateway's routing key)."""
    t_send = time.perf_counter()
    stream = _Stream(t_send)
    headers = {routing_header: req.adapter} if routing_header and req.adapter else None
    try:
        async with session.post(url + "/generate", json=request_body(req), headers=headers) as resp:
            if resp.status != 200:
                body = (await resp.text())[:500]
                return _base(
                    req, STATUS_ERROR, sent_s=t_send - start, error=f"HTTP {resp.status}: {body}"
                )
            async for line in resp.content:
                stream.feed(line, time.perf_counter())
                if stream.done_at is not None:
                    break
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return _base(
            req, STATUS_ERROR, sent_s=t_send - start, error=f"{type(exc).__name__}: {exc}"[:500]
        )
    return stream.result(req, start)


async def _dispatch(
    session: aiohttp.ClientSession,
    url: str,
    requests: Sequence[WorkloadRequest],
    start: float,
    tasks: Dict[int, asyncio.Task[RequestResult]],
    on_done: Any,
    routing_header: Optional[str] = None,
) -> None:
    for req in requests:
        delay = start + req.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(send_one(session, url, req, start, routing_header))
        task.add_done_callback(on_done)
        tasks[req.index] = task


async def run_load(
    url: str,
    requests: Sequence[WorkloadRequest],
    deadline_s: float,
    progress: bool = True,
    desc: str = "requests",
    routing_header: Optional[str] = None,
) -> List[RequestResult]:
    """Replay ``requests`` against ``url`` (see the module contract); results in request order.
    ``routing_header``: a header that carries each request's adapter name (a gateway's key)."""
    url = check_loopback(url)
    ordered = sorted(requests, key=lambda r: (r.arrival_s, r.index))
    bar = _progress_bar(len(ordered), desc) if progress else None
    tasks: Dict[int, asyncio.Task] = {}

    def on_done(_: asyncio.Task) -> None:
        if bar is not None:
            bar.update(1)

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    connector = aiohttp.TCPConnector(limit=0)
    start = time.perf_counter()
    async with aiohttp.ClientSession(
        timeout=timeout, connector=connector, read_bufsize=_READ_BUFSIZE
    ) as session:
        dispatcher = asyncio.create_task(
            _dispatch(session, url, ordered, start, tasks, on_done, routing_header)
        )
        await _wait_all(dispatcher, tasks, start + deadline_s)
    if bar is not None:
        bar.close()
    return [_collect(req, tasks.get(req.index), start) for req in requests]


async def _wait_all(
    dispatcher: asyncio.Task, tasks: Dict[int, asyncio.Task], deadline: float
) -> None:
    try:
        await asyncio.wait_for(asyncio.shield(dispatcher), max(0.0, deadline - time.perf_counter()))
        pending = [t for t in tasks.values() if not t.done()]
        remaining = max(0.0, deadline - time.perf_counter())
        if pending:
            await asyncio.wait(pending, timeout=remaining)
    except asyncio.TimeoutError:
        pass
    finally:
        dispatcher.cancel()
        leftovers = [t for t in tasks.values() if not t.done()]
        for t in leftovers:
            t.cancel()
        await asyncio.gather(dispatcher, *leftovers, return_exceptions=True)


def _collect(req: WorkloadRequest, task: Optional[asyncio.Task], start: float) -> RequestResult:
    if task is None:
        return _base(req, STATUS_NOT_SENT)
    if task.cancelled():
        return _base(req, STATUS_TIMEOUT, error="cancelled at the run deadline")
    exc = task.exception()
    if exc is not None:
        return _base(req, STATUS_ERROR, error=f"{type(exc).__name__}: {exc}"[:500])
    return task.result()


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True, leave=False)


def run_load_sync(
    url: str,
    requests: Sequence[WorkloadRequest],
    deadline_s: float,
    progress: bool = True,
    desc: str = "requests",
    routing_header: Optional[str] = None,
) -> List[RequestResult]:
    """:func:`run_load` from synchronous code (a fresh event loop)."""
    return asyncio.run(run_load(url, requests, deadline_s, progress, desc, routing_header))
