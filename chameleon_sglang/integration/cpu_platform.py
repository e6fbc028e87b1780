"""Platform defaults that let the pinned SGLang serve on a machine without an accelerator."""

from __future__ import annotations

import logging
import os
from typing import Any

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


CPU_THREADS_BIND_ENV = "SGLANG_CPU_OMP_THREADS_BIND"


def split_cores(cores: list, num_ranks: int) -> str:
    """``SGLANG_CPU_OMP_THREADS_BIND`` giving each of ``num_ranks`` ranks an equal, contiguous
    share of ``cores`` (the first ranks take one more where they do not divide); ranks share
    cores only when there are fewer cores than ranks."""
    cores = sorted(cores)
    if num_ranks <= len(cores):
        base, extra = divmod(len(cores), num_ranks)
        groups, start = [], 0
        for rank in range(num_ranks):
            size = base + (1 if rank < extra else 0)
            groups.append(cores[start : start + size])
            start += size
    else:
        groups = [[cores[rank % len(cores)]] for rank in range(num_ranks)]
    return "|".join(",".join(str(c) for c in group) for group in groups)


def default_cpu_threads_binding(num_ranks: int, num_numa_nodes: int) -> None:
    """On the CPU engine, SGLang gives each rank (``dp_size * tp_size * pp_size``) one NUMA node
    and refuses to start with more ranks than nodes unless ``SGLANG_CPU_OMP_THREADS_BIND`` names
    each rank's cores. Where the user left it unset and the ranks outnumber the nodes, set it to
    an even split of this process's cores (inherited by every rank; logged). An explicit value
    is never changed."""
    if os.environ.get(CPU_THREADS_BIND_ENV) or num_ranks <= max(1, num_numa_nodes):
        return
    binding = split_cores(list(os.sched_getaffinity(0)), num_ranks)
    os.environ[CPU_THREADS_BIND_ENV] = binding
    logger.info(
        "CPU engine: %d ranks on %d NUMA node(s): %s=%s (set it to choose the cores)",
        num_ranks,
        num_numa_nodes,
        CPU_THREADS_BIND_ENV,
        binding,
    )


def parse_cpu_list(spec: str) -> list:
    """``"0,2-4"`` -> ``[0, 2, 3, 4]`` (the format of ``SGLANG_CPU_OMP_THREADS_BIND`` entries)."""
    cores = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            cores.extend(range(int(lo), int(hi) + 1))
        else:
            cores.append(int(part))
    return sorted(set(cores))


def bind_rank_threads(spec: Any) -> list:
    """Pin this process (an SGLang rank) to the cores ``spec`` names and size torch's intra-op
    pool to them; returns the cores. Ranks sharing a machine then no longer run more OpenMP
    threads than cores (each spinning in the others' time slices)."""
    import torch

    cores = parse_cpu_list(",".join(map(str, spec)) if isinstance(spec, (list, tuple)) else spec)
    cores = sorted(set(cores) & set(os.sched_getaffinity(0)))  # never outside what we may use
    if not cores:
        return []
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
    return cores
