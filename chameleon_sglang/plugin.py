"""SGLang plugin entry point (``sglang.srt.plugins``): everything SGLang's hooks can reach.

SGLang calls :func:`register` once in every process (launcher, scheduler, detokenizer) before
it parses arguments or builds the scheduler. Every hook here is inert without ``--chameleon``,
except the CPU defaults, which only act on a machine where SGLang's CPU engine is selected.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict

from chameleon_sglang.components import status_line, status_report
from chameleon_sglang.config import ChameleonConfig

logger = logging.getLogger(__name__)

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
    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler.get_init_info",
        add_chameleon_init_info,
        HookType.AFTER,
    )


# -- server arguments --------------------------------------------------------------------------
# SGLang's LoRA backends that launch Triton kernels and so need a GPU.
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
    config = ChameleonConfig.from_server_args(resolving_view(server_args))
    if config.enabled:
        logger.info(status_line(config))


# -- scheduler process -------------------------------------------------------------------------
def add_chameleon_init_info(result: Dict[str, Any], scheduler: Any, *args: Any, **kwargs: Any):
    """Publish the component status in the scheduler's handshake (merged into /server_info)."""
    config = ChameleonConfig.from_server_args(scheduler.server_args)
    logger.info(status_line(config))
    result["chameleon_status"] = status_report(config)
    return result
