"""CPU LoRA shrink/expand for groups of few tokens (decode), compiled with numba.

Same contract as :mod:`chameleon_kernels.lora_cached` for the groups it is given. A decode batch
spreads its tokens over many adapters, one or two tokens each: there a matrix product per adapter is
all call overhead and the work is a stream over the adapters' weights. These kernels do every small
group of a call in one compiled loop, reading each adapter's rows once, in place: a weight matrix is
located by its offset in the flat storage it lives in (a layer's K or V buffer of the KV cache, at
most two storages per call), tokens by their row in the batch (no gather or scatter).

Every dtype a model serves in: float32, bfloat16 and float16. Arithmetic is float32 in every
case (products and sums; SGLang's own LoRA rounds to the model dtype after each matrix product,
these round once, at the end); 16-bit operands and weights are read as their raw bits
(``uint16`` arrays: numba has no 16-bit floats) and widened in registers (bf16: a shift; fp16:
an exponent rebias, denormals included), results narrowed with round-to-nearest-even (both
exact against torch's conversions for every finite value). Reading
16-bit weights halves the bytes a decode step streams, which is what these loops are bound by.

Operands must be contiguous CPU tensors of one dtype, A matrices stored row-major
(``[stack * r, in]``, contiguous) and B matrices stored transposed (the ``[out, r]`` view of a
contiguous ``[r, out]`` block, as the adapter cache keeps them on CPU: expand then streams whole
rows). :func:`plan_small_groups` returns None otherwise, and the callers check the operands;
everything else, and groups of many tokens (prefill), stays with the torch path. Compiled on
first use and cached on disk (``cache=True``); :func:`warm_up` compiles ahead.

The loops are serial on purpose. numba's parallel runtimes (its OpenMP pool, or its workqueue)
are a second thread pool beside torch's: with numba's OpenMP pool started, torch's own kernels
slowed down here however idle numba's threads were (bf16 attention 50x, GEMMs ~40%), and the
workqueue costs ~100 us a call; a helper thread of ours lost to torch's spinning OpenMP workers.
One core streaming the weights costs less than any of those.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

try:  # numba ships with SGLang's CPU requirements; without it the torch path serves
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - exercised only on installs without numba
    njit = None

SMALL_GROUP_TOKENS = 16
"""Groups with fewer tokens than this go through the compiled loop; larger ones use BLAS."""

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BF16, F16 = 1, 2  # the 16-bit kernels' ``code`` argument

WeightsOf = Callable[[int], Optional[torch.Tensor]]


def available() -> bool:
    return njit is not None


def numpy_dtype(dtype: torch.dtype) -> Any:
    """The numpy element type the kernels see for ``dtype``: float32, or raw 16-bit words."""
    return np.float32 if dtype == torch.float32 else np.uint16


def as_array(t: torch.Tensor) -> np.ndarray:
    """``t``'s elements as a numpy array the kernels take (16-bit floats as ``uint16`` bits)."""
    if t.dtype == torch.float32:
        return t.numpy()
    return t.view(torch.int16).numpy().view(np.uint16)


def storage_array(t: torch.Tensor) -> np.ndarray:
    """The whole storage under ``t`` as one flat array of ``t``'s element type (see
    :func:`as_array`): what plans address by element offset."""
    numel = t.untyped_storage().nbytes() // t.element_size()
    flat = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, (numel,), (1,))
    return as_array(flat)


if njit is not None:

    @intrinsic
    def _f32_of_bits(typingctx, bits):  # pragma: no cover - compiled
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())
        return types.float32(types.uint32), codegen

    @intrinsic
    def _bits_of_f32(typingctx, value):  # pragma: no cover - compiled
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))
        return types.uint32(types.float32), codegen

    _U16 = np.uint32(16)
    _F16_MAGIC = np.float32(2.0 ** 112)  # fp16 exponent bias 15 -> float32 bias 127

    @njit(inline="always", fastmath=True)
    def _widen(h, code):  # pragma: no cover - compiled
        """One 16-bit word as float32: bf16 (``code`` 1) or fp16 (2, denormals included).
        Exact for finite values; fp16 infinities and NaNs come out as large finite values
        (the kernels run with fastmath, which assumes finite operands anyway)."""
        u = np.uint32(h)
        if code == BF16:
            return _f32_of_bits(u << _U16)
        magnitude = _f32_of_bits((u & np.uint32(0x7FFF)) << np.uint32(13)) * _F16_MAGIC
        return _f32_of_bits(_bits_of_f32(magnitude) | ((u & np.uint32(0x8000)) << _U16))

    @njit(inline="always", fastmath=True)
    def _narrow(value, code):  # pragma: no cover - compiled
        """float32 to a 16-bit word, rounded to nearest even (no NaN payloads)."""
        b = _bits_of_f32(value)
        if code == BF16:
            return np.uint16((b + np.uint32(0x7FFF) + ((b >> _U16) & np.uint32(1))) >> _U16)
        sign = (b >> _U16) & np.uint32(0x8000)
        magnitude = b & np.uint32(0x7FFFFFFF)
        if magnitude >= np.uint32(0x47800000):  # |value| >= 65536: inf (or NaN)
            h = np.uint32(0x7C00) if magnitude <= np.uint32(0x7F800000) else np.uint32(0x7E00)
        elif magnitude >= np.uint32(0x38800000):  # normal: rebias, round on the 13 lost bits
            m = magnitude - np.uint32(0x38000000)
            h = (m + np.uint32(0xFFF) + ((m >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
        else:  # subnormal or zero: the value in units of 2**-24
            h = np.uint32(np.rint(_f32_of_bits(magnitude) * np.float32(16777216.0)))
        return np.uint16(sign | h)

    @njit(inline="always", fastmath=True)
    def _widen_row(src, dst, code):  # pragma: no cover - compiled
        for k in range(src.shape[0]):
            dst[k] = _widen(src[k], code)

    @njit(inline="always", fastmath=True)
    def _narrow_row(src, dst, code):  # pragma: no cover - compiled
        for k in range(src.shape[0]):
            dst[k] = _narrow(src[k], code)

    @njit(cache=True)
    def _widen_array(src, code):  # pragma: no cover - compiled
        dst = np.empty(src.shape[0], dtype=np.float32)
        _widen_row(src, dst, code)
        return dst

    @njit(cache=True)
    def _narrow_array(src, code):  # pragma: no cover - compiled
        dst = np.empty(src.shape[0], dtype=np.uint16)
        _narrow_row(src, dst, code)
        return dst

    # Both kernels take a group's tokens two at a time, so each weight row is read once per
    # pair, with independent accumulators per token. A lone last token is computed as a pair
    # with itself in shrink; expand adds it once.

    @njit(fastmath=True, cache=True, nogil=True)
    def _shrink_kernel(x, out, buf0, buf1, rows, starts, stops, which, offsets, num_rows,
                       scalings):  # pragma: no cover - compiled
        width = x.shape[1]
        for g in range(starts.shape[0]):
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

    @njit(fastmath=True, cache=True, nogil=True)
    def _shrink16_kernel(x, out, buf0, buf1, rows, starts, stops, which, offsets, num_rows,
                         scalings, code):  # pragma: no cover - compiled
        # As _shrink_kernel, over 16-bit words: a pair's activations are widened once into
        # float32 rows, weights as they stream, each output row narrowed once at the end.
        width = x.shape[1]
        for g in range(starts.shape[0]):
            buf = buf0 if which[g] == 0 else buf1
            offset = offsets[g]
            scale = scalings[g]
            n = num_rows[g]
            x0 = np.empty(width, dtype=np.float32)
            x1 = np.empty(width, dtype=np.float32)
            acc0 = np.empty(n, dtype=np.float32)
            acc1 = np.empty(n, dtype=np.float32)
            for i in range(starts[g], stops[g], 2):
                t0 = rows[i]
                t1 = rows[i + 1] if i + 1 < stops[g] else t0
                _widen_row(x[t0], x0, code)
                _widen_row(x[t1], x1, code)
                for j in range(n):
                    row = buf[offset + j * width: offset + (j + 1) * width]
                    s0 = np.float32(0.0)
                    s1 = np.float32(0.0)
                    if code == BF16:
                        for k in range(width):
                            w = _widen(row[k], BF16)
                            s0 += x0[k] * w
                            s1 += x1[k] * w
                    else:
                        for k in range(width):
                            w = _widen(row[k], F16)
                            s0 += x0[k] * w
                            s1 += x1[k] * w
                    acc0[j] = s0 * scale
                    acc1[j] = s1 * scale
                _narrow_row(acc0, out[t0, :n], code)
                _narrow_row(acc1, out[t1, :n], code)

    @njit(fastmath=True, cache=True, nogil=True)
    def _expand_kernel(a, out, buf0, buf1, rows, starts, stops, which, offsets, ranks,
                       bounds):  # pragma: no cover - compiled
        # B is stored transposed (``[rank, out]`` rows): each of its rows is one contiguous
        # run that is added, scaled, into the token's output row (a vectorised axpy), four
        # rank rows per pass over the output slice.
        num_slices = bounds.shape[0] - 1
        total = bounds[num_slices]
        for g in range(starts.shape[0]):
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

    @njit(inline="always", fastmath=True)
    def _axpy4(o, r0, r1, r2, r3, u0, u1, u2, u3, code):  # pragma: no cover - compiled
        for c in range(o.shape[0]):
            o[c] += (u0 * _widen(r0[c], code) + u1 * _widen(r1[c], code)
                     + u2 * _widen(r2[c], code) + u3 * _widen(r3[c], code))

    @njit(inline="always", fastmath=True)
    def _axpy4_pair(o0, o1, r0, r1, r2, r3, u0, u1, u2, u3, v0, v1, v2, v3,
                    code):  # pragma: no cover - compiled
        for c in range(o0.shape[0]):
            w0 = _widen(r0[c], code)
            w1 = _widen(r1[c], code)
            w2 = _widen(r2[c], code)
            w3 = _widen(r3[c], code)
            o0[c] += u0 * w0 + u1 * w1 + u2 * w2 + u3 * w3
            o1[c] += v0 * w0 + v1 * w1 + v2 * w2 + v3 * w3

    @njit(fastmath=True, cache=True, nogil=True)
    def _expand16_kernel(a, out, buf0, buf1, rows, starts, stops, which, offsets, ranks,
                         bounds, code):  # pragma: no cover - compiled
        # As _expand_kernel, over 16-bit words: a token's output slice is widened into a
        # float32 row, every rank row of B added into it, then narrowed once.
        num_slices = bounds.shape[0] - 1
        total = bounds[num_slices]
        widest = 0
        for s in range(num_slices):
            widest = max(widest, bounds[s + 1] - bounds[s])
        for g in range(starts.shape[0]):
            buf = buf0 if which[g] == 0 else buf1
            offset = offsets[g]
            rank = ranks[g]
            acc0 = np.empty(widest, dtype=np.float32)
            acc1 = np.empty(widest, dtype=np.float32)
            coef0 = np.empty(rank, dtype=np.float32)
            coef1 = np.empty(rank, dtype=np.float32)
            for i in range(starts[g], stops[g], 2):
                pair = i + 1 < stops[g]
                t0 = rows[i]
                t1 = rows[i + 1] if pair else t0
                for s in range(num_slices):
                    lo = bounds[s]
                    n = bounds[s + 1] - lo
                    o0 = acc0[:n]
                    o1 = acc1[:n]
                    col = s * rank
                    _widen_row(out[t0, lo:lo + n], o0, code)
                    _widen_row(a[t0, col:col + rank], coef0, code)
                    if pair:
                        _widen_row(out[t1, lo:lo + n], o1, code)
                        _widen_row(a[t1, col:col + rank], coef1, code)
                    k = 0
                    while k + 4 <= rank:
                        at = offset + k * total + lo
                        r0 = buf[at: at + n]
                        r1 = buf[at + total: at + total + n]
                        r2 = buf[at + 2 * total: at + 2 * total + n]
                        r3 = buf[at + 3 * total: at + 3 * total + n]
                        if pair:
                            if code == BF16:
                                _axpy4_pair(o0, o1, r0, r1, r2, r3, coef0[k], coef0[k + 1],
                                            coef0[k + 2], coef0[k + 3], coef1[k], coef1[k + 1],
                                            coef1[k + 2], coef1[k + 3], BF16)
                            else:
                                _axpy4_pair(o0, o1, r0, r1, r2, r3, coef0[k], coef0[k + 1],
                                            coef0[k + 2], coef0[k + 3], coef1[k], coef1[k + 1],
                                            coef1[k + 2], coef1[k + 3], F16)
                        elif code == BF16:
                            _axpy4(o0, r0, r1, r2, r3, coef0[k], coef0[k + 1], coef0[k + 2],
                                   coef0[k + 3], BF16)
                        else:
                            _axpy4(o0, r0, r1, r2, r3, coef0[k], coef0[k + 1], coef0[k + 2],
                                   coef0[k + 3], F16)
                        k += 4
                    while k < rank:
                        r0 = buf[offset + k * total + lo: offset + k * total + lo + n]
                        for c in range(n):
                            w = _widen(r0[c], code)
                            o0[c] += coef0[k] * w
                            if pair:
                                o1[c] += coef1[k] * w
                        k += 1
                    _narrow_row(o0, out[t0, lo:lo + n], code)
                    if pair:
                        _narrow_row(o1, out[t1, lo:lo + n], code)


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


_FLATS: Dict[Tuple[int, torch.dtype], np.ndarray] = {}  # (storage address, dtype) -> flat
_LOCATED: Dict[int, Tuple[Any, int, int, int, int]] = {}  # id(weight) -> location
_MAX_STORAGES = 256  # a model's K and V buffers: two per layer
_MAX_WEIGHTS = 1 << 16


def _flat(weight: torch.Tensor, storage_ptr: int) -> np.ndarray:
    """The whole storage under ``weight`` as a flat array (remembered per storage)."""
    key = (storage_ptr, weight.dtype)
    known = _FLATS.get(key)
    if known is None:
        if len(_FLATS) >= _MAX_STORAGES:
            _FLATS.clear()
        known = _FLATS[key] = storage_array(weight)
    return known


def accepts(t: torch.Tensor) -> bool:
    """Whether the kernels can take ``t`` as an operand (float32/bf16/fp16, CPU, contiguous)."""
    return available() and t.dtype in DTYPES and t.device.type == "cpu" and t.is_contiguous()


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
    if weight.dtype not in DTYPES or weight.device.type != "cpu" or weight.dim() != 2:
        return None
    if not (is_transposed_storage(weight) if transposed else weight.is_contiguous()):
        return None
    storage_ptr = weight.untyped_storage().data_ptr()
    if len(_LOCATED) >= _MAX_WEIGHTS:
        _LOCATED.clear()
    located = (weakref.ref(weight), storage_ptr,
               (weight.data_ptr() - storage_ptr) // weight.element_size(),
               int(weight.shape[0]), int(weight.shape[1]))
    _LOCATED[id(weight)] = located
    return located


def plan_small_groups(x: torch.Tensor, groups: Sequence[Tuple[int, int, int]],
                      rows: np.ndarray, weights_of: WeightsOf, scalings: dict,
                      for_expand: bool = False) -> Optional[SmallGroupPlan]:
    """Locate the weights of ``groups`` (``(start, stop, adapter)`` over ``rows``) in their flat
    storages. None when the kernels cannot take them (not a CPU tensor of ``x``'s dtype, not
    stored as the module docstring says, more than two storages); groups whose adapter has no
    weights for the module are dropped. ``for_expand``: the weights are B matrices (``dims`` is
    then their rank).

    Per-group Python work: callers that keep a :class:`~chameleon_kernels.lora_locations.
    MatrixLocations` table build plans from it instead."""
    if not available() or x.dtype not in DTYPES or x.device.type != "cpu":
        return None
    keys: List[int] = []
    flats: List[np.ndarray] = []
    kept: List[Tuple[int, int, int, int, int]] = []
    scales: List[float] = []
    for start, stop, adapter in groups:
        weight = weights_of(adapter)
        if weight is None:
            continue
        if weight.dtype != x.dtype:
            return None
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


def widen(bits: torch.Tensor) -> torch.Tensor:
    """The kernels' 16-bit to float32 conversion over a flat bf16/fp16 tensor (for tests)."""
    code = BF16 if bits.dtype == torch.bfloat16 else F16
    return torch.from_numpy(_widen_array(as_array(bits.contiguous()), code))


def narrow(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The kernels' float32 to bf16/fp16 conversion over a flat float32 tensor (for tests)."""
    code = BF16 if dtype == torch.bfloat16 else F16
    words = _narrow_array(values.contiguous().numpy(), code)
    return torch.from_numpy(words.view(np.int16)).view(dtype)


def _code(t: torch.Tensor, plan: SmallGroupPlan) -> int:
    """The 16-bit kernels' dtype code for ``t``; the plan's storages must hold that dtype."""
    if plan.buffers[0].dtype != numpy_dtype(t.dtype):
        raise TypeError(f"{t.dtype} operands, weights stored as {plan.buffers[0].dtype}")
    return BF16 if t.dtype == torch.bfloat16 else F16


def shrink_small(x: torch.Tensor, out: torch.Tensor, plan: SmallGroupPlan) -> None:
    """``out[t, :stack*r] = scaling * x[t] @ A.T`` for every token of the plan's groups."""
    args = (as_array(x), as_array(out), plan.buffers[0], plan.buffers[1], plan.rows,
            plan.starts, plan.stops, plan.which, plan.offsets, plan.dims, plan.scalings)
    if x.dtype == torch.float32:
        _shrink_kernel(*args)
    else:
        _shrink16_kernel(*args, _code(x, plan))


def expand_small(a: torch.Tensor, out: torch.Tensor, plan: SmallGroupPlan,
                 bounds: np.ndarray) -> None:
    """``out[t, lo_i:hi_i] += a[t, i*r:(i+1)*r] @ B[lo_i:hi_i].T`` for every slice ``i``
    (``plan.dims`` are the ranks; every B is stored transposed)."""
    args = (as_array(a), as_array(out), plan.buffers[0], plan.buffers[1], plan.rows,
            plan.starts, plan.stops, plan.which, plan.offsets, plan.dims, bounds)
    if a.dtype == torch.float32:
        _expand_kernel(*args)
    else:
        _expand16_kernel(*args, _code(a, plan))


def warm_up(dtypes: Sequence[torch.dtype] = DTYPES) -> None:
    """Compile (or load from the on-disk cache) the kernels of ``dtypes`` now, not on the first
    batch."""
    if not available():
        return
    for dtype in dtypes:
        weights = torch.zeros(16, dtype=dtype)
        x = torch.zeros((1, 2), dtype=dtype)
        rows = np.zeros(1, dtype=np.int64)
        a_block, b_block = weights[:4].view(2, 2), weights[:4].view(2, 2).t()
        plan = plan_small_groups(x, [(0, 1, 1)], rows, lambda _, w=a_block: w, {1: 1.0})
        b_plan = plan_small_groups(x, [(0, 1, 1)], rows, lambda _, w=b_block: w, {1: 1.0},
                                   for_expand=True)
        assert plan is not None and b_plan is not None
        out = torch.zeros((1, 2), dtype=dtype)
        shrink_small(x, out, plan)
        expand_small(out, torch.zeros((1, 2), dtype=dtype), b_plan,
                     np.array([0, 2], dtype=np.int64))
