"""A replica's side of adapter-affinity dispatch: what this scheduler holds, and its load.

Installed on a scheduler (rank 0 of its tensor-parallel group) when SGLang runs ``--chameleon``
with ``--dp-size N > 1``; it publishes only under ``--load-balance-method chameleon`` (otherwise
it only counts what the replica takes). The hooks of :mod:`chameleon_sglang.integration.hooks.dp`
call :meth:`ReplicaReporter.report` at each arrival, abort, prefill pass and batch result
(throttled to one scan per ``MIN_INTERVAL_S`` unless forced) and, forced, whenever the scheduler
idles, so the controller's view is at most one busy interval old and exact once the replica is
idle.

Each report carries the number of requests this replica has received from the controller
(counted as SGLang's scheduler reads them, before any check that might reject them), so the
controller can tell which of the requests it sent are already in the reported load and which are
still in flight.

Adapters held: those resident in the adapter cache (or in SGLang's LoRA slots without it), and
those of requests queued here (they will be loaded here: a request for the same adapter should
follow them). Load: the work left of every unfinished request here, prompt plus output cap
until its prefill, then the output its cap leaves
(:func:`~chameleon_sglang.dp.residency_channel.replica_load_tokens`).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable, List, Optional, Set

from chameleon_sglang.dp.residency_channel import (
    ResidencyPublisher,
    replica_load_tokens,
    request_tokens,
    residency_endpoint,
)
from chameleon_sglang.integration.state import ChameleonState

logger = logging.getLogger(__name__)

MIN_INTERVAL_S = 0.005


class ReplicaReporter:
    """Scans one scheduler and publishes its report when it changed (module docs)."""

    def __init__(
        self,
        scheduler: Any,
        publisher: Optional[ResidencyPublisher],
        dp_rank: int,
        clock: Callable[[], float] = time.monotonic,
        resident: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self.scheduler = scheduler
        self._resident = resident  # adapters this replica holds in memory
        self.publisher = publisher  # None: this replica only counts (SGLang's own dispatch)
        self.dp_rank = int(dp_rank)
        self._clock = clock
        self._last_scan = float("-inf")
        self.num_requests = 0
        self.num_tokens = 0
        self.num_received = 0

    def on_enqueued(self, req: Any) -> None:
        """Count a request this replica took (its dispatch share, for the load-imbalance
        figure), then report."""
        self.num_requests += 1
        self.num_tokens += request_tokens(
            len(getattr(req, "origin_input_ids", ()) or ()),
            getattr(getattr(req, "sampling_params", None), "max_new_tokens", None),
        )
        self.report()

    def on_received(self, recv_req: Any) -> None:
        """A request read from the controller (health checks aside): one more acknowledged."""
        from sglang.srt.managers.utils import is_health_check_generate_req

        if not is_health_check_generate_req(recv_req):
            self.num_received += 1

    def report(self, force: bool = False, batch: Any = None) -> bool:
        """Publish this replica's state (at most every ``MIN_INTERVAL_S`` unless ``force``);
        ``batch``: a batch just formed, whose requests are in no queue SGLang keeps yet."""
        if self.publisher is None:
            return False
        now = self._clock()
        if not force and now - self._last_scan < MIN_INTERVAL_S:
            return False
        self._last_scan = now
        requests = self._requests()
        if batch is not None:
            requests.extend(getattr(batch, "reqs", None) or ())
        return self.publisher.publish(
            self.adapters_held(), replica_load_tokens(requests), self.num_received
        )

    def adapters_held(self) -> Set[str]:
        held = set(self._resident())
        held.update(
            req.lora_id
            for req in self.scheduler.waiting_queue
            if getattr(req, "lora_id", None) is not None
        )
        return held

    def _requests(self) -> List[Any]:
        s = self.scheduler
        requests: List[Any] = list(s.waiting_queue)
        running = getattr(s, "running_batch", None)
        requests.extend(getattr(running, "reqs", None) or ())
        for batch in (getattr(s, "last_batch", None), getattr(s, "cur_batch_for_debug", None)):
            mode = getattr(batch, "forward_mode", None)
            if batch is not None and mode is not None and mode.is_extend():
                requests.extend(getattr(batch, "reqs", None) or ())  # prefilled, not merged yet
        chunked = getattr(s, "chunked_req", None)
        if chunked is not None:
            requests.append(chunked)
        return requests

    def stats(self) -> dict:
        publisher = self.publisher
        return {
            "dp_rank": self.dp_rank,
            "num_requests": self.num_requests,
            "num_tokens": self.num_tokens,
            "num_received": self.num_received,
            "num_reports_sent": publisher.num_sent if publisher is not None else 0,
            "num_reports_dropped": publisher.num_dropped if publisher is not None else 0,
        }


def resident_adapters(scheduler: Any, state: ChameleonState) -> Callable[[], Iterable[str]]:
    """What the replica holds: the adapter cache's residents, else SGLang's LoRA slots'."""
    if state.cache is not None:
        return state.cache.cache.resident_ids

    def in_slots() -> Iterable[str]:  # SGLang's own LoRA slots (--no-chameleon-cache)
        try:
            pool = scheduler.tp_worker.model_runner.lora_manager.memory_pool
            return [uid for uid in pool.uid_to_buffer_id if isinstance(uid, str)]
        except AttributeError:
            return ()

    return in_slots


def install_replica_reporter(
    scheduler: Any, state: ChameleonState, dp_rank: Optional[int], publish: bool
) -> ReplicaReporter:
    """A reporter for ``scheduler``: it counts the requests this replica takes and, with
    ``publish`` (adapter-affinity dispatch), reports to the controller (a replica that cannot,
    for want of an IPC name, only counts: the controller then places it by hash and load)."""
    publisher = None
    tokenizer_ipc_name = state.tokenizer_ipc_name
    if publish and tokenizer_ipc_name is not None and dp_rank is not None:
        publisher = ResidencyPublisher(residency_endpoint(tokenizer_ipc_name), dp_rank)
        logger.info(
            "Chameleon DP: replica %d reports adapter residency and load to the controller", dp_rank
        )
    elif publish:
        logger.warning(
            "Chameleon DP: replica %s cannot report residency (no IPC name or DP "
            "rank); the controller places its requests by adapter hash and load",
            dp_rank,
        )
    return ReplicaReporter(
        scheduler,
        publisher,
        dp_rank if dp_rank is not None else 0,
        resident=resident_adapters(scheduler, state),
    )
