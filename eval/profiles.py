"""Named cost profiles: what an adapter load costs next to a prefill, applied to every arm alike.

``cpu`` (the default): adapter copies cost what they cost on this machine (a memory copy: a few
milliseconds, far cheaper next to a CPU prefill than a PCIe transfer is next to a GPU prefill).

``gpu-like``: every arm gets ``--chameleon-host-link-gbps`` (``chameleon_sglang.memory.host_link``:
every adapter copy into SGLang's slots or the adapter cache takes at least ``bytes / rate``) set so
that loading the served adapters' mean costs :data:`GPU_LOAD_OVER_TTFT` of an unloaded request's
TTFT, as in the paper's setting. The derivation, from the paper's published figures (A40, Llama-7B,
ranks 8-128 equally likely; ``../shared/design/chameleon.md`` §1):

- a rank-32 Llama-7B adapter is 64 MB, so bytes grow 2 MB per rank: rank 128 is 256 MB and the
  mean over ranks {8, 16, 32, 64, 128} (49.6) is 99 MB;
- at rank 128 loading is 17.5% of an unloaded TTFT of 144 ms: 25.2 ms for 256 MB, an effective
  host-to-device rate of 10.2 GB/s (PCIe 4.0 x16 moves 16-25 GB/s at best);
- the mean adapter then loads in 9.8 ms, and an unloaded request at rank 8 (adapter loading a
  negligible part) takes 74 ms: a mean load is **0.132** of an unloaded TTFT.

On this machine the unloaded TTFT of a workload-mean prompt is measured first (one stock server,
warmed up, sequential probes: ``eval.warmup``), and the rate is
``mean adapter bytes (served dtype) / (0.132 * that TTFT)``.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

from chameleon_sglang.dev.assets import AdapterInfo
from eval.memory_budget import DTYPE_BYTES
from eval.runner import RunConfig, arm_server, warm

PROFILES = ("cpu", "gpu-like")
GPU_LOAD_OVER_TTFT = 0.132
"""Mean adapter load over an unloaded TTFT in the paper's GPU setting (module derivation)."""
HOST_LINK_FLAG = "--chameleon-host-link-gbps"


def adapter_bytes(adapter: AdapterInfo, dtype: str) -> int:
    """Bytes of ``adapter``'s weights in the served ``dtype`` (from its safetensors header)."""
    from safetensors import safe_open

    numel = 0
    with safe_open(str(Path(adapter.path) / "adapter_model.safetensors"), "np") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            shape = f.get_slice(key).get_shape()
            count = 1
            for dim in shape:
                count *= int(dim)
            numel += count
    return numel * DTYPE_BYTES[dtype]


def host_link_gbps(mean_adapter_bytes: float, unloaded_ttft_s: float) -> float:
    """The link rate (GB/s) at which a mean adapter loads in ``GPU_LOAD_OVER_TTFT`` of the
    unloaded TTFT."""
    if unloaded_ttft_s <= 0:
        raise ValueError("the unloaded TTFT must be positive")
    return mean_adapter_bytes / (GPU_LOAD_OVER_TTFT * unloaded_ttft_s) / 1e9


def apply_gpu_like(
    cfg: RunConfig, mean_input: int, out: Path, adapters: Sequence[AdapterInfo]
) -> Tuple[RunConfig, Dict[str, Any]]:
    """``cfg`` with the host link of the ``gpu-like`` profile for every arm, and the record of
    its calibration (a stock server's unloaded TTFT at ``mean_input`` tokens)."""
    with arm_server("stock", cfg, out / "calibration") as server:
        profile = warm(server, cfg, max(mean_input, 8))
    ttft = profile.prefill_s(mean_input)
    mean_bytes = statistics.fmean(adapter_bytes(a, cfg.flags.dtype) for a in adapters)
    gbps = host_link_gbps(mean_bytes, ttft)
    flags = dataclasses.replace(cfg.flags, extra=(*cfg.flags.extra, f"{HOST_LINK_FLAG}={gbps:.6g}"))
    record = {
        "profile": "gpu-like",
        "load_over_ttft": GPU_LOAD_OVER_TTFT,
        "unloaded_ttft_s": ttft,
        "mean_input_tokens": mean_input,
        "mean_adapter_bytes": mean_bytes,
        "host_link_gbps": float(f"{gbps:.6g}"),
        "mean_load_s": mean_bytes / (float(f"{gbps:.6g}") * 1e9),
    }
    return dataclasses.replace(cfg, flags=flags), record
