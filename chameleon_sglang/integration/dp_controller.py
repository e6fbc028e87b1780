"""``--load-balance-method chameleon`` inside SGLang's ``DataParallelController``.

The hooks of :mod:`chameleon_sglang.integration.hooks.dp` on SGLang's controller:

- ``LoadBalanceMethod.from_str("chameleon")`` resolves to SGLang's round robin, so the controller
  builds as SGLang builds it (health checks keep SGLang's own rotation);
- after ``init_dispatcher`` (workers launched), :func:`install_affinity_routing` replaces the
  controller's ``dispatching`` with :meth:`AffinityRouting.dispatch`;
- with ``--chameleon``, :func:`run_poll_event_loop` replaces the controller's event loop, which
  at the pin polls its socket without ever blocking (a spinning core), by one that blocks in
  ``zmq.Poller`` on the tokenizer socket and the residency channel.

Contracts of :meth:`AffinityRouting.dispatch`: a request with ``routed_dp_rank`` goes where it
says (SGLang's rule); every other request goes to exactly one active replica, chosen by
:class:`~chameleon_sglang.dp.affinity.AffinityDispatcher` from the replicas' latest reports; a
replica that becomes inactive gets nothing more and one that returns is taken back.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional

import zmq

from chameleon_sglang.config import ChameleonConfig
from chameleon_sglang.dp.affinity import AffinityDispatcher
from chameleon_sglang.dp.residency_channel import (
    ResidencyReader,
    request_tokens,
    residency_endpoint,
)

logger = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 500
"""Longest block of the controller's event loop (it feeds SGLang's soft watchdog after each)."""
STATS_PERIOD_S = 30.0


class AffinityRouting:
    """Adapter-affinity dispatch of one ``DataParallelController`` (module docs)."""

    def __init__(
        self, controller: Any, epsilon: float, endpoint: str, miss_cost: float, slack: float
    ) -> None:
        self.controller = controller
        self.reader = ResidencyReader(endpoint)
        self._active = self._active_replicas()
        self.dispatcher = AffinityDispatcher(
            self._active, epsilon=epsilon, miss_cost=miss_cost, slack=slack
        )
        self.num_dispatched: Dict[int, int] = {r: 0 for r in self._active}
        self._last_stats_log = time.monotonic()

    def dispatch(self, req: Any) -> None:
        from sglang.srt.managers.io_struct import sock_send

        input_ids = getattr(req, "input_ids", None)
        cap = getattr(getattr(req, "sampling_params", None), "max_new_tokens", None)
        tokens = request_tokens(len(input_ids or ()), cap)
        if self.controller.maybe_external_dp_rank_routing(req):
            self.dispatcher.count_routed(int(req.routed_dp_rank), tokens)
            return
        self._follow_active_replicas()
        self.apply_reports()
        replica = self.dispatcher.dispatch(getattr(req, "lora_id", None), tokens)
        self.num_dispatched[replica] = self.num_dispatched.get(replica, 0) + 1
        sock_send(self.controller.workers[replica], req)
        self._maybe_log_stats()

    def apply_reports(self) -> int:
        reports = self.reader.drain()
        for report in reports:
            self.dispatcher.report(report)
        return len(reports)

    def _active_replicas(self) -> List[int]:
        c = self.controller
        active = [r for r in c._active_workers if c.status[r] and c.workers[r] is not None]
        if not active:
            raise RuntimeError("No active DP workers are available for routing.")
        return active

    def _follow_active_replicas(self) -> None:
        active = self._active_replicas()
        if active == self._active:
            return
        for r in active:
            self.dispatcher.add_replica(r)
        for r in self._active:
            if r not in active:
                self.dispatcher.remove_replica(r)
        logger.info("Chameleon DP: active replicas %s -> %s", self._active, active)
        self._active = active

    def stats(self) -> Dict[str, Any]:
        stats = self.dispatcher.stats()
        stats.update(
            num_dispatched=dict(self.num_dispatched),
            num_reports=self.reader.num_received,
            num_malformed_reports=self.reader.num_malformed,
        )
        return stats

    def _maybe_log_stats(self) -> None:
        now = time.monotonic()
        if now - self._last_stats_log >= STATS_PERIOD_S:
            self._last_stats_log = now
            logger.info("Chameleon DP dispatch: %s", self.stats())


def install_affinity_routing(
    controller: Any, config: ChameleonConfig, tokenizer_ipc_name: str
) -> AffinityRouting:
    """Replace the controller's dispatch by adapter-affinity dispatch (``config``'s bounds)."""
    routing = AffinityRouting(
        controller,
        config.dp_epsilon,
        residency_endpoint(tokenizer_ipc_name),
        config.dp_miss_cost,
        config.dp_slack,
    )
    controller.dispatching = routing.dispatch
    controller.refresh_load_budget_on_dispatch = False
    logger.info(
        "Chameleon DP: adapter-affinity dispatch over replicas %s (load bound "
        "(1 + %.2f) x mean + %.2f mean requests, a miss counts as %.2f mean requests)",
        routing.dispatcher.replicas,
        config.dp_epsilon,
        config.dp_slack,
        config.dp_miss_cost,
    )
    return routing


def run_poll_event_loop(controller: Any, routing: Optional[AffinityRouting]) -> None:
    """SGLang's controller loop (``DataParallelController.event_loop``, whose body at the pin
    ``tests/integration/test_seams.py`` pins), blocking in ``zmq.Poller`` instead of spinning;
    draining the replicas' reports when they arrive. Never returns."""
    from sglang.srt.managers.io_struct import sock_recv

    poller = zmq.Poller()
    poller.register(controller.recv_from_tokenizer, zmq.POLLIN)
    if routing is not None:
        poller.register(routing.reader.socket, zmq.POLLIN)
    while True:
        controller.soft_watchdog.feed()
        ready = dict(poller.poll(POLL_TIMEOUT_MS))
        if routing is not None and routing.reader.socket in ready:
            routing.apply_reports()
        while True:
            controller.soft_watchdog.feed()
            try:
                recv_req = sock_recv(controller.recv_from_tokenizer, flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                break
            controller._request_dispatcher(recv_req)
