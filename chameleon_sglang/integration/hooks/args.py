"""Resolution hooks on SGLang's server arguments (launcher, before any process starts).

Each runs inside SGLang's resolution step named in :data:`chameleon_sglang.integration.plugin.
RESOLUTION_HOOKS` and declares what it decides through SGLang's ``declare_resolution`` (so
``/server_info`` says who chose a value); the user's explicit flags always win.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict

import torch

from chameleon_sglang.config import ChameleonConfig
from chameleon_sglang.integration.capability import CHAMELEON_LORA_BACKEND, flags_unsupported_reason
from chameleon_sglang.integration.cpu_platform import sgl_kernel_cpu_ops_available
from chameleon_sglang.integration.hooks.cpu import default_cpu_threads_binding_for
from chameleon_sglang.integration.hooks.dp import resolve_dp_method

logger = logging.getLogger(__name__)

GPU_ONLY_LORA_DEFAULT = "csgmv"
"""SGLang's default LoRA backend; it launches Triton kernels and so needs a GPU."""


def cpu_backend_defaults(server_args: Any, previous: Callable[[Any], None]) -> None:
    """On ``--device cpu``, pick backends that run without SGLang's CPU kernels; with the
    adapter cache, the ``chameleon`` LoRA backend.

    - attention: ``torch_native`` when the user chose none and ``sgl_kernel``'s CPU ops are
      missing (SGLang would pick ``intel_amx``, which needs them);
    - LoRA: ``torch_native`` in place of the default ``csgmv`` (Triton, GPU only). An explicitly
      chosen ``triton``/``triton_v2`` is left alone and fails as SGLang makes it fail.
    """
    from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view

    cfg = resolving_view(server_args)
    picks: Dict[str, str] = {}
    if cfg.device == "cpu":
        if cfg.attention_backend is None and not sgl_kernel_cpu_ops_available():
            picks["attention_backend"] = "torch_native"
        if cfg.lora_backend == GPU_ONLY_LORA_DEFAULT:
            picks["lora_backend"] = "torch_native"
        if picks:
            logger.info("CPU engine without SGLang's CPU kernels: using %s", picks)
        default_cpu_threads_binding_for(cfg)
    if flags_unsupported_reason(cfg) is None:
        picks["lora_backend"] = CHAMELEON_LORA_BACKEND
        logger.info("Chameleon adapter cache: LoRA backend %r", CHAMELEON_LORA_BACKEND)
    if picks:
        declare_resolution(server_args, "chameleon_sglang.cpu_backend_defaults", **picks)
    previous(server_args)


def cuda_graph_safety(server_args: Any, previous: Callable[[Any], None]) -> None:
    """With the adapter cache on a CUDA device, the ``chameleon`` LoRA backend captures decode
    graphs through its device location table, which needs Triton; without Triton it runs the
    host path, which cannot be captured: CUDA graphs are turned off (with a log line) instead of
    failing at capture. Anything else is left to SGLang."""
    from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view

    cfg = resolving_view(server_args)
    if (
        cfg.device in (None, "cuda")
        and flags_unsupported_reason(cfg) is None
        and not cfg.disable_cuda_graph
        and torch.cuda.is_available()
    ):
        from chameleon_sglang.integration.lora_pool import table_kernels_available

        if not table_kernels_available():
            logger.warning(
                "Chameleon adapter cache: Triton is not installed, so the LoRA "
                "kernels run on the host path, which CUDA graphs cannot capture: "
                "CUDA graphs disabled"
            )
            declare_resolution(
                server_args, "chameleon_sglang.cuda_graph_safety", disable_cuda_graph=True
            )
    previous(server_args)


def validate_chameleon_args(server_args: Any, previous: Callable[[Any], None]) -> None:
    """Reject inconsistent ``--chameleon-*`` values before any process starts; resolve
    ``--load-balance-method chameleon``."""
    from sglang.srt.arg_groups.overrides import resolving_view

    previous(server_args)
    ChameleonConfig.from_server_args(resolving_view(server_args))
    resolve_dp_method(server_args)
