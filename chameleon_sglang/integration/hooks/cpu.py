"""SGLang's CPU engine with several ranks (``--dp-size``/``--tp-size``/``--pp-size`` on a CPU):
an even split of the cores, one share per rank, where SGLang's own binding cannot be used."""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

from chameleon_sglang.integration.cpu_platform import bind_rank_threads, default_cpu_threads_binding

logger = logging.getLogger(__name__)

BOOTSTRAP_MODULE = "sglang.srt.distributed.bootstrap"


def num_cpu_ranks(cfg: Any) -> int:
    """Processes SGLang's CPU engine runs as ranks (replicas x TP x PP) under ``cfg``."""
    ranks = 1
    for name in ("dp_size", "tp_size", "pp_size"):
        ranks *= int(getattr(cfg, name, 1) or 1)
    return ranks


def default_cpu_threads_binding_for(cfg: Any) -> None:
    """At argument resolution: name each rank's cores where the ranks outnumber the NUMA nodes
    (:func:`~chameleon_sglang.integration.cpu_platform.default_cpu_threads_binding`)."""
    ranks = num_cpu_ranks(cfg)
    if ranks > 1:
        from sglang.srt.utils.common import get_cpu_ids_by_node

        default_cpu_threads_binding(ranks, len(get_cpu_ids_by_node()))


def bind_cpu_rank_threads(
    original: Callable, *args: Any, local_omp_cpuid: Any = None, **kwargs: Any
) -> Any:
    """SGLang's CPU rank set-up: it binds each rank's OpenMP threads to the rank's cores only
    with ``sgl_kernel``'s CPU ops (AMX or arm64) and otherwise leaves every rank with a thread
    per core of the machine, so ``--dp-size``/``--tp-size`` ranks oversubscribe the cores
    (measured: 2 replicas on 2 cores ran 10x slower than one). Where SGLang cannot bind, this
    process is pinned to the rank's cores and torch's pool sized to them (logged)."""
    bootstrap = sys.modules[BOOTSTRAP_MODULE]
    if (
        getattr(bootstrap, "_is_cpu_amx_available", False)
        or getattr(bootstrap, "_is_cpu_arm64", False)
        or not local_omp_cpuid
        or _running_ranks() <= 1
    ):  # one rank: nothing to oversubscribe, SGLang's threads stay
        return original(*args, local_omp_cpuid=local_omp_cpuid, **kwargs)
    cores = bind_rank_threads(local_omp_cpuid)
    logger.info(
        "CPU engine without SGLang's CPU kernels: this rank runs on cores %s with %d torch threads",
        cores,
        len(cores),
    )
    return None


def _running_ranks() -> int:
    """Ranks of the launch this process belongs to (1 without SGLang's runtime context)."""
    try:
        from sglang.srt.runtime_context import get_parallel

        return num_cpu_ranks(get_parallel())
    except Exception:
        return 1
