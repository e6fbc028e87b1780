"""The one module SGLang's patched files import (``patches/*.patch``); nothing else imports it.

Every name is resolved on first use (PEP 562), so ``sglang/__init__.py`` (patch 0001) can import
this module before anything else of SGLang or of ours is loaded. Each name below is a call a
patch inserts; the table says where it lives.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict

_CPU = "chameleon_sglang.integration.cpu_platform"
_SGL_KERNEL_STAND_INS = "chameleon_kernels.sgl_kernel_cpu"

EXPORTS: Dict[str, str] = {
    # 0001: choose SGLang's CPU engine where there is no accelerator
    "select_cpu_engine_if_no_accelerator": _CPU,
    # 0002: torch stand-ins for the sgl_kernel CPU ops (only where sgl_kernel lacks them)
    "assign_req_to_token_pool_cpu": _SGL_KERNEL_STAND_INS,
    "copy_all_layer_kv_cache_cpu": _SGL_KERNEL_STAND_INS,
    "assign_draft_cache_locs_contiguous_cpu": _SGL_KERNEL_STAND_INS,
    "assign_extend_cache_locs_cpu": _SGL_KERNEL_STAND_INS,
    "fill_accept_out_cache_loc_cpu": _SGL_KERNEL_STAND_INS,
    "fill_bonus_tokens_cpu": _SGL_KERNEL_STAND_INS,
    "rotate_input_ids_cpu": _SGL_KERNEL_STAND_INS,
    "build_tree_kernel_efficient_cpu": _SGL_KERNEL_STAND_INS,
    "verify_tree_greedy_cpu": _SGL_KERNEL_STAND_INS,
    "reconstruct_indices_from_tree_mask": _SGL_KERNEL_STAND_INS,
    # 0004: a placeholder for torchvision where it is not installed
    "MissingModule": "chameleon_sglang.integration.compat",
    # 0005: --chameleon and its sub-options as ServerArgs fields
    "chameleon_input_namespaces": "chameleon_sglang.integration.server_args",
    # 0006: Algorithm 1's candidate order and its verdict after a misfit in the prefill loop
    "prefill_candidates": "chameleon_sglang.integration.hooks.prefill",
    "prefill_pass_continues": "chameleon_sglang.integration.hooks.prefill",
}

__all__ = sorted(EXPORTS)


def __getattr__(name: str) -> Any:
    module = EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
