"""CPU LoRA shrink/expand for groups of few tokens (decode), compiled with numba.

Same contract as :mod:`chameleon_kernels.lora_cached` for the groups it is given. A decode batch
spreads its tokens over many adapters, one or two tokens each: there a matrix product per
adapter is all call overhead and the work is a stream over the adapters' weights. These kernels
do every small group of a call in one compiled loop, parallel over groups, reading each
adapter's rows once, in place: a weight matrix is located by its offset in the flat storage it
lives in (a layer's K or V buffer of the KV cache, at most two storages per call), tokens by
their row in the batch (no gather or scatter).

Only float32 on CPU qualifies, with contiguous operands, A matrices stored row-major
(``[stack * r, in]``, contiguous) and B matrices stored transposed (the ``[out, r]`` view of a
contiguous ``[r, out]`` block, as the adapter cache keeps them on CPU: expand then streams whole
rows). :func:`plan_small_groups` returns None otherwise, and the callers check the operands;
everything else, and groups of many tokens (prefill), stays with the torch path. Compiled on
first use and cached on disk (``cache=True``); :func:`warm_up` compiles ahead.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

try:  # numba ships with SGLang's CPU requirements; without it the torch path serves
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only on installs without numba
    njit = None
    prange = range

SMALL_GROUP_TOKENS = 16
"""Groups with fewer tokens than this go through the compiled loop; larger ones use BLAS."""

WeightsOf = Callable[[int], Optional[torch.Tensor]]


def available() -> bool:
    return njit is not None


if njit is not None:

    # Both kernels take a group's tokens two at a time, so each weight row is read once per
    # pair, with independent accumulators per token. A lone last token is computed as a pair
    # with itself in shrink; expand adds it once.

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _shrink_kernel(x, out, buf0, buf1, rows, starts, stops, which, offsets, num_rows,
                       scalings):  # pragma: no cover - compiled
        width = x.shape[1]
        for g in prange(starts.shape[0]):
            buf = buf0 if which[g] == 0 else buf1
            offset = offsets[g]
            scale = scalings[g]
            for i in range(starts[g], stops[g], 2):
                t0 = rows[i]
                t1 = rows[i + 1] if i + 1 < stops[g] else t0
                x0 = x[t0]
                x1 = x[t1]
                for j in range(num_rows[g]):
                    row = buf[offset + j * width: offset + (j + 1) * width]  # slices vectorise
                    s0 = np.float32(0.0)
                    s1 = np.float32(0.0)
                    for k in range(width):
                        w = row[k]
                        s0 += x0[k] * w
                        s1 += x1[k] * w
                    out[t0, j] = s0 * scale
                    out[t1, j] = s1 * scale

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _expand_kernel(a, out, buf0, buf1, rows, starts, stops, which, offsets, ranks,
                       bounds):  # pragma: no cover - compiled
        # B is stored transposed (``[rank, out]`` rows): each of its rows is one contiguous
        # run that is added, scaled, into the token's output row (a vectorised axpy), four
        # rank rows per pass over the output slice.
        num_slices = bounds.shape[0] - 1
        total = bounds[num_slices]
        for g in prange(starts.shape[0]):
            buf = buf0 if which[g] == 0 else buf1
            offset = offsets[g]
            rank = ranks[g]
            for i in range(starts[g], stops[g], 2):
                pair = i + 1 < stops[g]
                t0 = rows[i]
                t1 = rows[i + 1] if pair else t0
                for s in range(num_slices):
                    lo = bounds[s]
                    n = bounds[s + 1] - lo
                    o0 = out[t0, lo:lo + n]
                    o1 = out[t1, lo:lo + n]
                    col = s * rank
                    k = 0
                    while k + 4 <= rank:
                        at = offset + k * total + lo
                        r0 = buf[at: at + n]
                        r1 = buf[at + total: at + total + n]
                        r2 = buf[at + 2 * total: at + 2 * total + n]
                        r3 = buf[at + 3 * total: at + 3 * total + n]
                        u0 = a[t0, col + k]
                        u1 = a[t0, col + k + 1]
                        u2 = a[t0, col + k + 2]
                        u3 = a[t0, col + k + 3]
                        if pair:
                            v0 = a[t1, col + k]
                            v1 = a[t1, col + k + 1]
                            v2 = a[t1, col + k + 2]
                            v3 = a[t1, col + k + 3]
                            for c in range(n):
                                w0 = r0[c]
                                w1 = r1[c]
                                w2 = r2[c]
                                w3 = r3[c]
                                o0[c] += u0 * w0 + u1 * w1 + u2 * w2 + u3 * w3
                                o1[c] += v0 * w0 + v1 * w1 + v2 * w2 + v3 * w3
                        else:
                            for c in range(n):
                                o0[c] += u0 * r0[c] + u1 * r1[c] + u2 * r2[c] + u3 * r3[c]
                        k += 4
                    while k < rank:
                        at = offset + k * total + lo
                        r0 = buf[at: at + n]
                        u0 = a[t0, col + k]
                        for c in range(n):
                            o0[c] += u0 * r0[c]
                        if pair:
                            v0 = a[t1, col + k]
                            for c in range(n):
                                o1[c] += v0 * r0[c]
                        k += 1


@dataclasses.dataclass(frozen=True)
class SmallGroupPlan:
    """The small groups of one call, as the kernels take them."""

    buffers: Tuple[np.ndarray, np.ndarray]
    rows: np.ndarray
    starts: np.ndarray
    stops: np.ndarray
    which: np.ndarray
    offsets: np.ndarray
    dims: np.ndarray  # shrink: rows of A (stack * rank); expand: rank
    scalings: np.ndarray


_FLATS: Dict[int, Tuple[torch.Tensor, np.ndarray]] = {}  # storage address -> flat views
_LOCATED: Dict[int, Tuple[Any, int, int, int, int]] = {}  # id(weight) -> location
_MAX_STORAGES = 256  # a model's K and V buffers: two per layer
_MAX_WEIGHTS = 1 << 16


def _flat(weight: torch.Tensor, storage_ptr: int) -> np.ndarray:
    """The whole storage under ``weight`` as a flat float32 array (remembered per storage)."""
    known = _FLATS.get(storage_ptr)
    if known is None:
        if len(_FLATS) >= _MAX_STORAGES:
            _FLATS.clear()
        flat = torch.empty(0, dtype=torch.float32).set_(weight.untyped_storage())
        known = _FLATS[storage_ptr] = (flat, flat.numpy())
    return known[1]


def accepts(t: torch.Tensor) -> bool:
    """Whether the kernels can take ``t`` as an operand (float32, CPU, contiguous)."""
    return available() and t.dtype == torch.float32 and t.device.type == "cpu" \
        and t.is_contiguous()


def is_transposed_storage(weight: torch.Tensor) -> bool:
    """``weight`` (2-D) is the transposed view of a contiguous block: strides ``(1, rows)``."""
    return weight.dim() == 2 and weight.stride() == (1, weight.shape[0])


def _locate(weight: torch.Tensor, transposed: bool
            ) -> Optional[Tuple[Any, int, int, int, int]]:
    """``(weakref to weight, storage address, element offset, rows, columns)``, remembered per
    weight object (the cache hands out the same views while an adapter is resident); None when
    the kernels cannot read it in place (``transposed``: B, stored as a ``[r, out]`` block)."""
    known = _LOCATED.get(id(weight))
    if known is not None and known[0]() is weight:
        return known
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
        return None
    if not (is_transposed_storage(weight) if transposed else weight.is_contiguous()):
        return None
    storage_ptr = weight.untyped_storage().data_ptr()
    if len(_LOCATED) >= _MAX_WEIGHTS:
        _LOCATED.clear()
    located = (weakref.ref(weight), storage_ptr, (weight.data_ptr() - storage_ptr) // 4,
               int(weight.shape[0]), int(weight.shape[1]))
    _LOCATED[id(weight)] = located
    return located


def plan_small_groups(x: torch.Tensor, groups: Sequence[Tuple[int, int, int]],
                      rows: np.ndarray, weights_of: WeightsOf, scalings: dict,
                      for_expand: bool = False) -> Optional[SmallGroupPlan]:
    """Locate the weights of ``groups`` (``(start, stop, adapter)`` over ``rows``) in their flat
    storages. None when the kernels cannot take them (not float32 CPU, not stored as the module
    docstring says, more than two storages); groups whose adapter has no weights for the module
    are dropped. ``for_expand``: the weights are B matrices (``dims`` is then their rank).

    Per-group Python work: callers that keep a :class:`~chameleon_kernels.lora_locations.
    MatrixLocations` table build plans from it instead."""
    if not available() or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    keys: List[int] = []
    flats: List[np.ndarray] = []
    kept: List[Tuple[int, int, int, int, int]] = []
    scales: List[float] = []
    for start, stop, adapter in groups:
        weight = weights_of(adapter)
        if weight is None:
            continue
        located = _locate(weight, for_expand)
        if located is None:
            return None
        _, storage_ptr, offset, num_rows, num_cols = located
        if storage_ptr not in keys:
            if len(keys) == 2:
                return None
            keys.append(storage_ptr)
            flats.append(_flat(weight, storage_ptr))
        kept.append((start, stop, keys.index(storage_ptr), offset,
                     num_cols if for_expand else num_rows))
        scales.append(scalings.get(adapter, 1.0))
    if not kept:
        return None
    starts, stops, which, offsets, dims = np.ascontiguousarray(np.array(kept, dtype=np.int64).T)
    return SmallGroupPlan(
        buffers=(flats[0], flats[-1]),
        rows=rows,
        starts=starts,
        stops=stops,
        which=which,
        offsets=offsets,
        dims=dims,
        scalings=np.array(scales, dtype=np.float32),
    )


def shrink_small(x: torch.Tensor, out: torch.Tensor, plan: SmallGroupPlan) -> None:
    """``out[t, :stack*r] = scaling * x[t] @ A.T`` for every token of the plan's groups."""
    _shrink_kernel(x.numpy(), out.numpy(), plan.buffers[0], plan.buffers[1], plan.rows,
                   plan.starts, plan.stops, plan.which, plan.offsets, plan.dims, plan.scalings)


def expand_small(a: torch.Tensor, out: torch.Tensor, plan: SmallGroupPlan,
                 bounds: np.ndarray) -> None:
    """``out[t, lo_i:hi_i] += a[t, i*r:(i+1)*r] @ B[lo_i:hi_i].T`` for every slice ``i``
    (``plan.dims`` are the ranks; every B is stored transposed)."""
    _expand_kernel(a.numpy(), out.numpy(), plan.buffers[0], plan.buffers[1], plan.rows,
                   plan.starts, plan.stops, plan.which, plan.offsets, plan.dims, bounds)


def warm_up() -> None:
    """Compile (or load from the on-disk cache) both kernels now, not on the first batch."""
    if not available():
        return
    weights = torch.zeros(16)
    x = torch.zeros((1, 2))
    rows = np.zeros(1, dtype=np.int64)
    plan = plan_small_groups(x, [(0, 1, 1)], rows, lambda _: weights[:4].view(2, 2), {1: 1.0})
    b_plan = plan_small_groups(x, [(0, 1, 1)], rows, lambda _: weights[:4].view(2, 2).t(),
                               {1: 1.0}, for_expand=True)
    assert plan is not None and b_plan is not None
    out = torch.zeros((1, 2))
    shrink_small(x, out, plan)
    expand_small(out, torch.zeros((1, 2)), b_plan, np.array([0, 2], dtype=np.int64))
