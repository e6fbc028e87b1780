"""The SGLang hooks of data-parallel serving (registered by ``chameleon_sglang.plugin``).

Controller process: ``--load-balance-method chameleon`` (adapter-affinity dispatch, see
:mod:`chameleon_sglang.dp.controller_routing`) and, with ``--chameleon``, a blocking event loop.
Scheduler processes: each replica's :class:`~chameleon_sglang.dp.replica_reporter.ReplicaReporter`.
Launcher: the flag checks (:func:`resolve_dp_method`). Every hook is inert unless its flags ask.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from chameleon_sglang.server_args import CHAMELEON_LOAD_BALANCE_METHOD

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
    if getattr(cfg, "enable_dp_attention", False):
        return "it is not supported with --enable-dp-attention"
    if str(getattr(cfg, "disaggregation_mode", "null") or "null") != "null":
        return "it is not supported with prefill/decode disaggregation"
    return None


def resolve_dp_method(server_args: Any) -> None:
    """At argument resolution: ``--load-balance-method chameleon`` with flags it cannot serve
    falls back to SGLang's round robin, with a log line saying why."""
    from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view

    cfg = resolving_view(server_args)
    if cfg.load_balance_method != CHAMELEON_LOAD_BALANCE_METHOD:
        return
    reason = affinity_unsupported_reason(cfg)
    if reason is not None:
        logger.warning("--load-balance-method chameleon: %s; using SGLang's %s", reason,
                       STAND_IN_METHOD)
        declare_resolution(server_args, "chameleon_sglang.dp.resolve_dp_method",
                           load_balance_method=STAND_IN_METHOD)


def affinity_enabled(server_args: Any) -> bool:
    """This launch dispatches by adapter affinity (its resolved server arguments say so)."""
    return (str(getattr(server_args, "load_balance_method", "")).lower()
            == CHAMELEON_LOAD_BALANCE_METHOD
            and int(getattr(server_args, "dp_size", 1) or 1) > 1
            and affinity_unsupported_reason(server_args) is None)


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
    from chameleon_sglang.config import ChameleonConfig
    from chameleon_sglang.dp.controller_routing import install_affinity_routing

    config = ChameleonConfig.from_server_args(controller.server_args)
    install_affinity_routing(controller, config.dp_epsilon,
                             controller.port_args.tokenizer_ipc_name,
                             miss_cost=config.dp_miss_cost, slack=config.dp_slack)
    return result


def controller_event_loop(original: Callable, controller: Any, *args: Any,
                          **kwargs: Any) -> Any:
    """``DataParallelController.event_loop``: with ``--chameleon``, one that blocks while idle
    (SGLang's at the pin spins a core, which on a small CPU machine is a replica's core)."""
    if not getattr(controller.server_args, "chameleon", False):
        return original(controller, *args, **kwargs)
    from chameleon_sglang.dp.controller_routing import run_poll_event_loop

    logger.info("Chameleon DP: controller event loop blocks in zmq.Poller while idle")
    return run_poll_event_loop(controller)


# -- scheduler processes -----------------------------------------------------------------------
TOKENIZER_IPC_ATTR = "chameleon_tokenizer_ipc_name"


def remember_ipc_name(result: Any, scheduler: Any, port_args: Any, *args: Any,
                      **kwargs: Any) -> Any:
    """After ``Scheduler.init_ipc_channels``: keep the launch's tokenizer IPC name (the residency
    channel's endpoint is derived from it)."""
    setattr(scheduler, TOKENIZER_IPC_ATTR, getattr(port_args, "tokenizer_ipc_name", None))
    return result


def maybe_install_reporter(scheduler: Any) -> None:
    """Called when the Chameleon components are installed on a scheduler: with ``--dp-size N >
    1``, rank 0 of each replica counts what it takes (``/chameleon/stats``) and, under
    adapter-affinity dispatch, reports to the controller."""
    server_args = scheduler.server_args
    if int(getattr(server_args, "dp_size", 1) or 1) <= 1 \
            or getattr(scheduler, "recv_from_tokenizer", None) is None:
        return
    from sglang.srt.runtime_context import get_parallel

    from chameleon_sglang.dp.replica_reporter import install_replica_reporter

    reporter = install_replica_reporter(scheduler, getattr(scheduler, TOKENIZER_IPC_ATTR, None),
                                        get_parallel().dp_rank, affinity_enabled(server_args))
    reporter.report(force=True)


def report_when_idle(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    """After ``Scheduler.on_idle``: the replica's exact state (sent only if it changed)."""
    from chameleon_sglang.dp.replica_reporter import replica_reporter_of

    reporter = replica_reporter_of(scheduler)
    if reporter is not None:
        reporter.report(force=True)
    return result


def report(scheduler: Any, batch: Any = None) -> None:
    from chameleon_sglang.dp.replica_reporter import replica_reporter_of

    reporter = replica_reporter_of(scheduler)
    if reporter is not None:
        reporter.report(batch=batch)


def count_received(scheduler: Any, recv_req: Any, *args: Any, **kwargs: Any) -> None:
    """Before ``Scheduler.handle_generate_request`` / ``handle_embedding_request``: the replica
    acknowledges one more request from the controller (whatever becomes of it)."""
    from chameleon_sglang.dp.replica_reporter import replica_reporter_of

    reporter = replica_reporter_of(scheduler)
    if reporter is not None:
        reporter.on_received(recv_req)
    return None


def report_enqueued(scheduler: Any, req: Any) -> None:
    from chameleon_sglang.dp.replica_reporter import replica_reporter_of

    reporter = replica_reporter_of(scheduler)
    if reporter is not None:
        reporter.on_enqueued(req)
