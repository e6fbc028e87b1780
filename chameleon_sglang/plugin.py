"""SGLang plugin entry point (``sglang.srt.plugins``): everything SGLang's hooks can reach.

SGLang calls :func:`register` once in every process (launcher, scheduler, detokenizer) before
it parses arguments or builds the scheduler. Every hook here is inert without ``--chameleon``,
except the CPU defaults, which only act on a machine where SGLang's CPU engine is selected.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional

from chameleon_sglang.components import (
    ComponentStatus,
    cache_status,
    scheduler_status,
    status_line,
    status_report,
)
from chameleon_sglang.config import ChameleonConfig

logger = logging.getLogger(__name__)

SCHEDULER_CLASS = "sglang.srt.managers.scheduler.Scheduler"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    register_resolution_hook("handle_cpu_backends")(cpu_backend_defaults)
    register_resolution_hook("handle_other_validations")(validate_chameleon_args)
    hooks = [
        ("init_schedule_policy", install_scheduler, HookType.AFTER),
        ("_add_request_to_queue", on_request_enqueued, HookType.AFTER),
        ("_release_aborted_request", on_request_aborted, HookType.AFTER),
        ("can_schedule_lora_req", on_can_schedule_lora_req, HookType.AROUND),
        ("get_init_info", add_chameleon_init_info, HookType.AFTER),
        ("get_internal_state", add_chameleon_internal_state, HookType.AFTER),
    ]
    for method, hook, kind in hooks:
        HookRegistry.register(f"{SCHEDULER_CLASS}.{method}", hook, kind)
    HookRegistry.register(
        "sglang.srt.entrypoints.http_server.launch_server", add_http_routes, HookType.BEFORE
    )


# -- server arguments --------------------------------------------------------------------------
# SGLang's default LoRA backend; it launches Triton kernels and so needs a GPU.
GPU_ONLY_LORA_DEFAULT = "csgmv"


def cpu_backend_defaults(server_args: Any, previous: Callable[[Any], None]) -> None:
    """On ``--device cpu``, pick backends that run without SGLang's CPU kernels.

    - attention: ``torch_native`` when the user chose none and ``sgl_kernel``'s CPU ops are
      missing (SGLang would pick ``intel_amx``, which needs them);
    - LoRA: ``torch_native`` in place of the default ``csgmv`` (Triton, GPU only). An explicitly
      chosen ``triton``/``triton_v2`` is left alone and fails as SGLang makes it fail.
    """
    from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view

    from chameleon_sglang.platform import sgl_kernel_cpu_ops_available

    cfg = resolving_view(server_args)
    if cfg.device == "cpu":
        picks: Dict[str, str] = {}
        if cfg.attention_backend is None and not sgl_kernel_cpu_ops_available():
            picks["attention_backend"] = "torch_native"
        if cfg.lora_backend == GPU_ONLY_LORA_DEFAULT:
            picks["lora_backend"] = "torch_native"
        if picks:
            logger.info("CPU engine without SGLang's CPU kernels: using %s", picks)
            declare_resolution(server_args, "chameleon_sglang.cpu_backend_defaults", **picks)
    previous(server_args)


def validate_chameleon_args(server_args: Any, previous: Callable[[Any], None]) -> None:
    """Reject inconsistent ``--chameleon-*`` values before any process starts."""
    from sglang.srt.arg_groups.overrides import resolving_view

    previous(server_args)
    ChameleonConfig.from_server_args(resolving_view(server_args))


# -- scheduler process -------------------------------------------------------------------------
def _config(scheduler: Any) -> ChameleonConfig:
    return ChameleonConfig.from_server_args(scheduler.server_args)


def _scheduler_unsupported_reason(scheduler: Any) -> Optional[str]:
    """Why the Chameleon scheduler cannot run in this SGLang configuration, if it cannot."""
    if getattr(scheduler, "disaggregation_mode", None) is not None:
        if str(getattr(scheduler.disaggregation_mode, "value", "null")) != "null":
            return "not supported with prefill/decode disaggregation: SGLang's scheduling in use"
    if int(getattr(scheduler.server_args, "pp_size", 1) or 1) > 1:
        return "not supported with pipeline parallelism: SGLang's scheduling in use"
    if getattr(scheduler.server_args, "enable_dp_attention", False):
        return "not supported with DP attention: SGLang's scheduling in use"
    return None


def install_scheduler(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    """After ``init_schedule_policy``: attach the Chameleon policy, turn priority preemption off."""
    from chameleon_sglang.sglang_scheduler import ATTR, SchedulerBridge

    config = _config(scheduler)
    reason = _scheduler_unsupported_reason(scheduler)
    if config.enabled and config.scheduler != "off" and reason is None:
        scheduler.enable_priority_preemption = False
        setattr(scheduler, ATTR, SchedulerBridge(scheduler, config))
    scheduler.chameleon_statuses = _statuses(scheduler, config, reason)
    if config.enabled:
        logger.info(status_line(config, scheduler.chameleon_statuses))
    return result


def _statuses(scheduler: Any, config: ChameleonConfig, reason: Optional[str]) -> List[ComponentStatus]:
    from chameleon_sglang.sglang_scheduler import bridge_of

    installed = None if bridge_of(scheduler) is not None else (reason or "not installed")
    return [scheduler_status(config, installed), cache_status(config)]


def on_request_enqueued(result: Any, scheduler: Any, req: Any, is_retracted: bool = False,
                        *args: Any, **kwargs: Any) -> Any:
    from chameleon_sglang.sglang_scheduler import bridge_of

    bridge = bridge_of(scheduler)
    if bridge is not None:
        bridge.on_enqueue(req, is_retracted)
    return result


def on_request_aborted(result: Any, scheduler: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    from chameleon_sglang.sglang_scheduler import bridge_of

    bridge = bridge_of(scheduler)
    if bridge is not None:
        bridge.on_waiting_abort(req)
    return result


def on_can_schedule_lora_req(original: Callable, scheduler: Any, req: Any, *args: Any,
                             **kwargs: Any) -> bool:
    from chameleon_sglang.sglang_scheduler import bridge_of

    allowed = original(scheduler, req, *args, **kwargs)
    bridge = bridge_of(scheduler)
    if not allowed and bridge is not None:
        bridge.on_lora_veto(req)
    return allowed


def add_chameleon_init_info(result: Dict[str, Any], scheduler: Any, *args: Any, **kwargs: Any):
    """Publish the component status in the scheduler's handshake (merged into /server_info)."""
    config = _config(scheduler)
    statuses = getattr(scheduler, "chameleon_statuses", None) or _statuses(
        scheduler, config, None
    )
    result["chameleon_status"] = status_report(config, statuses)
    return result


def add_chameleon_internal_state(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    """Add live Chameleon statistics to the scheduler's internal state (``/server_info``)."""
    from chameleon_sglang.sglang_scheduler import bridge_of

    bridge = bridge_of(scheduler)
    state = getattr(result, "internal_state", None)
    if isinstance(state, dict):
        state["chameleon"] = {"scheduler": bridge.stats() if bridge is not None else None}
    return result


# -- HTTP server (launcher process) ------------------------------------------------------------
STATS_PATH = "/chameleon/stats"


def add_http_routes(*args: Any, **kwargs: Any) -> None:
    """Before the HTTP server starts: add ``GET /chameleon/stats``."""
    from sglang.srt.entrypoints import http_server

    app = http_server.app
    if any(getattr(route, "path", None) == STATS_PATH for route in app.routes):
        return

    async def chameleon_stats() -> Dict[str, Any]:
        """Chameleon's live statistics per scheduler (data-parallel rank)."""
        manager = http_server._global_state.tokenizer_manager
        states = await manager.get_internal_state()
        config = ChameleonConfig.from_server_args(manager.server_args)
        return {
            "enabled": config.enabled,
            "ranks": [state.get("chameleon", {}) for state in states],
        }

    app.add_api_route(STATS_PATH, chameleon_stats, methods=["GET"])
