"""Platform defaults that let the pinned SGLang serve on a machine without an accelerator."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

CPU_ENGINE_ENV = "SGLANG_USE_CPU_ENGINE"


def has_accelerator() -> bool:
    """True when torch sees a CUDA/ROCm, XPU, NPU or MPS device."""
    import torch

    if torch.cuda.is_available():
        return True
    for name in ("xpu", "npu", "mps"):
        backend = getattr(torch, name, None)
        if backend is not None and getattr(backend, "is_available", lambda: False)():
            return True
    return False


def select_cpu_engine_if_no_accelerator() -> None:
    """Set ``SGLANG_USE_CPU_ENGINE=1`` when the user left it unset and there is no accelerator.

    SGLang reads the variable at import time in every process (``is_cpu()``, platform
    selection) and child processes inherit it, so this must run before SGLang's own imports
    (patch 0001 calls it from ``sglang/__init__.py``). An explicit value is never changed.
    """
    if os.environ.get(CPU_ENGINE_ENV) is None and not has_accelerator():
        os.environ[CPU_ENGINE_ENV] = "1"


def sgl_kernel_cpu_ops_available() -> bool:
    """True when SGLang's own CPU kernels (a CPU build of ``sgl_kernel``) are importable."""
    try:
        import sgl_kernel  # noqa: F401
        import torch

        return hasattr(torch.ops.sgl_kernel, "convert_weight_packed")
    except (ImportError, AttributeError, RuntimeError):
        return False
