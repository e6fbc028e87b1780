"""Hooks of data-parallel serving (``--dp-size N``), on SGLang's controller and schedulers.

Controller process: ``--load-balance-method chameleon`` (adapter-affinity dispatch, see
:mod:`chameleon_sglang.integration.dp_controller`) and, with ``--chameleon``, a blocking event
loop. Scheduler processes: each replica's :class:`~chameleon_sglang.integration.dp_reporter.
ReplicaReporter`, fed the same events as the scheduler and cache hooks (registered after them,
so a report sees what they changed). Launcher: the flag check (:func:`resolve_dp_method`).
Every hook is inert unless its flags ask.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from chameleon_sglang.integration.capability import parallelism_unsupported_reason
from chameleon_sglang.integration.dp_reporter import install_replica_reporter
from chameleon_sglang.integration.server_args import CHAMELEON_LOAD_BALANCE_METHOD
from chameleon_sglang.integration.state import state_for, state_of

logger = logging.getLogger(__name__)

DP_CONTROLLER_MODULE = "sglang.srt.managers.data_parallel_controller"
DP_CONTROLLER_CLASS = f"{DP_CONTROLLER_MODULE}.DataParallelController"
LOAD_BALANCE_METHOD_CLASS = f"{DP_CONTROLLER_MODULE}.LoadBalanceMethod"
STAND_IN_METHOD = "round_robin"
"""What SGLang's controller is built with under ``chameleon`` (its health-check rotation)."""


def affinity_unsupported_reason(cfg: Any) -> Optional[str]:
    """Why ``--load-balance-method chameleon`` cannot run with these flags (None: it can)."""
    if not getattr(cfg, "chameleon", False):
        return "it needs --chameleon (the replicas report their adapters)"
    reason = parallelism_unsupported_reason(cfg)
    return None if reason is None else f"it is {reason}"


def resolve_dp_method(server_args: Any) -> None:
    """At argument resolution: ``--load-balance-method chameleon`` with flags it cannot serve
    falls back to SGLang's round robin, with a log line saying why."""
    from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view

    cfg = resolving_view(server_args)
    if cfg.load_balance_method != CHAMELEON_LOAD_BALANCE_METHOD:
        return
    reason = affinity_unsupported_reason(cfg)
    if reason is not None:
        logger.warning(
            "--load-balance-method chameleon: %s; using SGLang's %s", reason, STAND_IN_METHOD
        )
        declare_resolution(
            server_args, "chameleon_sglang.resolve_dp_method", load_balance_method=STAND_IN_METHOD
        )


def affinity_enabled(server_args: Any) -> bool:
    """This launch dispatches by adapter affinity (its resolved server arguments say so)."""
    return (
        str(getattr(server_args, "load_balance_method", "")).lower()
        == CHAMELEON_LOAD_BALANCE_METHOD
        and int(getattr(server_args, "dp_size", 1) or 1) > 1
        and affinity_unsupported_reason(server_args) is None
    )


# -- controller process ------------------------------------------------------------------------
def load_balance_method_from_str(original: Callable, cls: Any, method: str) -> Any:
    """``LoadBalanceMethod.from_str``: ``chameleon`` builds SGLang's controller as round robin;
    the dispatch itself is replaced after ``init_dispatcher``."""
    if str(method).lower() == CHAMELEON_LOAD_BALANCE_METHOD:
        return original(cls, STAND_IN_METHOD)
    return original(cls, method)


def install_dispatch(result: Any, controller: Any, *args: Any, **kwargs: Any) -> Any:
    """After ``DataParallelController.init_dispatcher``: adapter-affinity dispatch, if asked."""
    if not affinity_enabled(controller.server_args):
        return result
    from chameleon_sglang.integration.dp_controller import install_affinity_routing

    state = state_for(controller)
    state.routing = install_affinity_routing(
        controller, state.config, controller.port_args.tokenizer_ipc_name
    )
    return result


def controller_event_loop(original: Callable, controller: Any, *args: Any, **kwargs: Any) -> Any:
    """``DataParallelController.event_loop``: with ``--chameleon``, one that blocks while idle
    (SGLang's at the pin spins a core, which on a small CPU machine is a replica's core)."""
    if not getattr(controller.server_args, "chameleon", False):
        return original(controller, *args, **kwargs)
    from chameleon_sglang.integration.dp_controller import run_poll_event_loop

    logger.info("Chameleon DP: controller event loop blocks in zmq.Poller while idle")
    state = state_of(controller)
    return run_poll_event_loop(controller, state.routing if state is not None else None)


# -- scheduler processes -----------------------------------------------------------------------
def remember_ipc_name(
    result: Any, scheduler: Any, port_args: Any, *args: Any, **kwargs: Any
) -> Any:
    """After ``Scheduler.init_ipc_channels``: keep the launch's tokenizer IPC name (the residency
    channel's endpoint is derived from it)."""
    state_for(scheduler).tokenizer_ipc_name = getattr(port_args, "tokenizer_ipc_name", None)
    return result


def install_reporter(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    """After ``init_schedule_policy`` (after the Chameleon components): with ``--chameleon`` and
    ``--dp-size N > 1``, rank 0 of each replica counts what it takes (``/chameleon/stats``) and,
    under adapter-affinity dispatch, reports to the controller."""
    state = state_for(scheduler)
    server_args = scheduler.server_args
    if (
        not state.config.enabled
        or int(getattr(server_args, "dp_size", 1) or 1) <= 1
        or getattr(scheduler, "recv_from_tokenizer", None) is None
    ):
        return result
    from sglang.srt.runtime_context import get_parallel

    state.reporter = install_replica_reporter(
        scheduler, state, get_parallel().dp_rank, affinity_enabled(server_args)
    )
    state.reporter.report(force=True)
    return result


def report_enqueued(
    result: Any, scheduler: Any, req: Any, is_retracted: bool = False, *args: Any, **kwargs: Any
) -> Any:
    """After ``_add_request_to_queue``: a request taken (counted) or retracted, then reported."""
    state = state_of(scheduler)
    if state is not None and state.reporter is not None:
        if is_retracted:
            state.reporter.report()
        else:
            state.reporter.on_enqueued(req)
    return result
