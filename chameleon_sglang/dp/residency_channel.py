"""Replica reports to the data-parallel controller: adapters held and load, over ZMQ PUSH/PULL.

Each replica's scheduler (rank 0 of its tensor-parallel group) owns a :class:`ResidencyPublisher`
that pushes a :class:`~chameleon_sglang.dp.affinity.ReplicaReport` whenever what it would say
changes; the controller owns the one :class:`ResidencyReader`, bound to the endpoint, and drains
it before each dispatch (and whenever its event loop finds it readable).

Contracts:
- the endpoint is an IPC path derived from the launch's tokenizer IPC name, which the controller
  and every replica share, so both sides find it without another port or handshake;
- sending never blocks the scheduler: a report that cannot be queued (the controller is behind by
  ``SEND_HWM`` reports) is dropped and sent again at the next change or :meth:`publish` call;
- the reader keeps only each replica's latest report; a malformed message is counted and skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Tuple

import orjson
import zmq

from chameleon_sglang.dp.affinity import ReplicaReport

logger = logging.getLogger(__name__)

SEND_HWM = 64
"""Reports a publisher queues before it drops new ones (the controller is that far behind)."""


def residency_endpoint(tokenizer_ipc_name: str) -> str:
    """The IPC endpoint of one launch's residency channel (same on every side of the launch)."""
    digest = hashlib.sha1(tokenizer_ipc_name.encode()).hexdigest()[:16]
    return f"ipc://{os.path.join(tempfile.gettempdir(), f'chameleon-residency-{digest}')}"


def encode_report(report: ReplicaReport) -> bytes:
    return orjson.dumps(
        {
            "replica": report.replica,
            "adapters": sorted(report.adapters),
            "load_tokens": report.load_tokens,
            "received": report.received,
        }
    )


def decode_report(message: bytes) -> ReplicaReport:
    """Raises ``ValueError`` (or ``orjson.JSONDecodeError``, a subclass) on a malformed message."""
    data = orjson.loads(message)
    if not isinstance(data, dict):
        raise ValueError("report is not an object")
    replica, adapters, load = data.get("replica"), data.get("adapters"), data.get("load_tokens")
    received = data.get("received")
    if (
        not isinstance(replica, int)
        or not isinstance(load, int)
        or not isinstance(adapters, list)
        or not (received is None or isinstance(received, int))
    ):
        raise ValueError(f"malformed report {data!r}")
    return ReplicaReport(
        replica=replica,
        adapters=frozenset(str(a) for a in adapters),
        load_tokens=load,
        received=received,
    )


class ResidencyPublisher:
    """A replica's side: push a report when it differs from the last one queued."""

    def __init__(self, endpoint: str, replica: int, context: Optional[zmq.Context] = None) -> None:
        self.replica = int(replica)
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, SEND_HWM)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(endpoint)
        self._last: Optional[Tuple[FrozenSet[str], int, Optional[int]]] = None
        self.num_sent = 0
        self.num_dropped = 0

    def publish(
        self, adapters: Iterable[str], load_tokens: int, received: Optional[int] = None
    ) -> bool:
        """Queue a report of ``adapters``, ``load_tokens`` and the number of requests
        ``received`` unless it equals the last one queued; True if one was queued."""
        state = (frozenset(adapters), int(load_tokens), received)
        if state == self._last:
            return False
        message = encode_report(ReplicaReport(self.replica, state[0], state[1], received))
        try:
            self._socket.send(message, zmq.NOBLOCK)
        except zmq.Again:
            self.num_dropped += 1
            return False
        self._last = state
        self.num_sent += 1
        return True

    def close(self) -> None:
        self._socket.close(linger=0)


class ResidencyReader:
    """The controller's side: bound PULL socket; :meth:`drain` returns the latest reports."""

    def __init__(self, endpoint: str, context: Optional[zmq.Context] = None) -> None:
        self._context = context or zmq.Context.instance()
        self.socket = self._context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self.endpoint = endpoint
        self.num_received = 0
        self.num_malformed = 0

    def drain(self) -> List[ReplicaReport]:
        """Every report queued so far, the latest per replica (in replica order)."""
        latest: Dict[int, ReplicaReport] = {}
        while True:
            try:
                message = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                report = decode_report(message)
            except ValueError as exc:
                self.num_malformed += 1
                logger.warning("Chameleon DP: malformed replica report skipped (%s)", exc)
                continue
            self.num_received += 1
            latest[report.replica] = report
        return [latest[r] for r in sorted(latest)]

    def close(self) -> None:
        self.socket.close(linger=0)
        path = self.endpoint[len("ipc://") :] if self.endpoint.startswith("ipc://") else None
        if path:
            with contextlib.suppress(OSError):
                os.unlink(path)


def replica_load_tokens(requests: Iterable[Any]) -> int:
    """The load a replica reports: the work left of each unfinished request, counted once.
    A request not yet prefilled counts its prompt plus its output cap (what the dispatcher
    charges a request when it sends it); one that has its first token counts the output tokens
    its cap leaves (its prompt is done: it no longer delays a newcomer's first token)."""
    seen = set()
    total = 0
    for req in requests:
        rid = getattr(req, "rid", None)
        if rid in seen or (hasattr(req, "finished") and req.finished()):
            continue
        seen.add(rid)
        cap = getattr(getattr(req, "sampling_params", None), "max_new_tokens", None)
        generated = len(getattr(req, "output_ids", None) or ())
        if generated:
            total += max(request_tokens(0, cap) - generated, 0)
        else:
            total += request_tokens(len(getattr(req, "origin_input_ids", ()) or ()), cap)
    return total


DEFAULT_OUTPUT_CAP = 128
"""Output tokens charged to a request without ``max_new_tokens`` (SGLang's default cap)."""


def request_tokens(num_input_tokens: int, max_new_tokens: Optional[int]) -> int:
    """Prompt plus output cap: what a request brings to a replica before its prefill."""
    return int(num_input_tokens) + int(
        max_new_tokens if max_new_tokens is not None else DEFAULT_OUTPUT_CAP
    )
