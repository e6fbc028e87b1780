"""Triton LoRA shrink/expand that find every adapter matrix through a device location table:
CUDA-graph safe, no host work or host-to-device copy per call.

Same contract as :mod:`chameleon_kernels.lora_cached` (rank-exact matrices read in place in KV
memory, fp32 accumulation), one launch over all adapters of a batch, and nothing built on the
host per call: a program reads its segment's adapter id and token bounds from the batch's
:class:`~chameleon_kernels.lora_table.SegmentBuffers` and the adapter's offset, rank and scaling
from the :class:`~chameleon_kernels.lora_table.DeviceLocationTable`; a per-call argument is only
``table_row`` (which module kind and layer) and the layer's base buffer. All of these live at
fixed addresses, so a decode step captured once replays correctly with any mix of resident
adapters, loaded and evicted between replays.

Layouts (as the adapter cache stores them on GPUs): A ``[stack * r, in]`` row-major, B
``[out, r]`` row-major, both contiguous, at ``base + offset``. Grids are
``(segments, token blocks, column blocks)``; programs past their segment's tokens or rank exit
at once (empty segments cost a load and a return).
"""

from __future__ import annotations

from typing import Dict, Hashable, Optional, Sequence, Tuple

import torch

from chameleon_kernels import graph_guard
from chameleon_kernels.lora_table import BatchPlan, DeviceLocationTable

try:  # Triton is optional: without it the GPU path is unavailable (the caller falls back).
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

HAS_TRITON = triton is not None
INTERPRETED = False
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

if HAS_TRITON:

    @triton.jit
    def _segment_of(seg_adapter_ptr, seg_start_ptr, order_ptr, offsets_ptr, ranks_ptr,
                    table_row, seg, pid_m, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr):
        """This program's tokens (batch rows, mask), count, adapter id, rank and offset."""
        start = tl.load(seg_start_ptr + seg)
        count = tl.load(seg_start_ptr + seg + 1) - start
        adapter = tl.load(seg_adapter_ptr + seg)
        rank = tl.multiple_of(tl.load(ranks_ptr + table_row + adapter), ALIGN)
        w_off = tl.multiple_of(tl.load(offsets_ptr + table_row + adapter), ALIGN)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < count
        rows = tl.load(order_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
        return rows, mask_m, count, adapter, rank, w_off

    @triton.jit
    def _table_shrink_kernel(x_ptr, out_ptr, base_ptr, offsets_ptr, ranks_ptr, scalings_ptr,
                             seg_adapter_ptr, seg_start_ptr, order_ptr, table_row, in_features,
                             stride_xm, stride_om,
                             STACK: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        seg = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_n = tl.program_id(2)
        rows, mask_m, count, adapter, rank, w_off = _segment_of(
            seg_adapter_ptr, seg_start_ptr, order_ptr, offsets_ptr, ranks_ptr, table_row, seg,
            pid_m, ALIGN, BLOCK_M)
        width = STACK * rank  # the adapter's output columns = A's rows, in order
        if (pid_m * BLOCK_M >= count) | (pid_n * BLOCK_N >= width):
            return
        scale = tl.load(scalings_ptr + adapter)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < width
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = (base_ptr + w_off) + (offs_n[None, :].to(tl.int64) * in_features
                                       + offs_k[:, None])
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            mask_k = offs_k < in_features - k0
            xt = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:
                acc += tl.dot(xt.to(tl.float32), wt.to(tl.float32), input_precision=PRECISION)
            else:
                acc += tl.dot(xt, wt.to(xt.dtype), input_precision=PRECISION)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, (acc * scale).to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _table_expand_kernel(a_ptr, out_ptr, base_ptr, offsets_ptr, ranks_ptr,
                             seg_adapter_ptr, seg_start_ptr, order_ptr, table_row,
                             b1, b2, b3, stride_am, stride_om,
                             STACK: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        # Output slices: [0, b1), [b1, b2), [b2, b3) (as many as STACK).
        seg = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_n = tl.program_id(2)
        rows, mask_m, count, adapter, rank, w_off = _segment_of(
            seg_adapter_ptr, seg_start_ptr, order_ptr, offsets_ptr, ranks_ptr, table_row, seg,
            pid_m, ALIGN, BLOCK_M)
        if (pid_m * BLOCK_M >= count) | (rank == 0):
            return
        if STACK == 1:
            total = b1
        elif STACK == 2:
            total = b2
        else:
            total = b3
        n0 = pid_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < total
        offs_k = tl.arange(0, BLOCK_K)
        w_seg = base_ptr + w_off  # this adapter's B [out, rank], read in place
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in tl.static_range(STACK):
            if i == 0:
                lo = 0
                hi = b1
            elif i == 1:
                lo = b1
                hi = b2
            else:
                lo = b2
                hi = b3
            if (lo < n0 + BLOCK_N) & (hi > n0):  # this output block overlaps slice i
                in_slice = (offs_n >= lo) & (offs_n < hi)
                a_ptrs = a_ptr + rows[:, None] * stride_am + (i * rank + offs_k)[None, :]
                w_ptrs = w_seg + (offs_n[None, :].to(tl.int64) * rank + offs_k[:, None])
                for k0 in range(0, rank, BLOCK_K):
                    mask_k = offs_k < rank - k0
                    at = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                    wt = tl.load(w_ptrs, mask=mask_k[:, None] & in_slice[None, :], other=0.0)
                    if UPCAST:
                        acc += tl.dot(at.to(tl.float32), wt.to(tl.float32),
                                      input_precision=PRECISION)
                    else:
                        acc += tl.dot(at, wt.to(at.dtype), input_precision=PRECISION)
                    a_ptrs += BLOCK_K
                    w_ptrs += BLOCK_K
        out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        prev = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, (prev + acc).to(out_ptr.dtype.element_ty), mask=mask)

    INTERPRETED = type(_table_shrink_kernel).__name__ == "InterpretedFunction"


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _tiles(dtype: torch.dtype, tokens: int, align_bytes: int) -> Tuple[int, int, int]:
    """BLOCK_M, BLOCK_K and warps: fp32 (FMA dots) 32x32 with 4 warps; bf16/fp16 BLOCK_K 64
    when weights are 16-byte aligned (vector loads), 8 warps once BLOCK_M reaches 64."""
    if dtype == torch.float32:
        return _pow2(tokens, 16, 32), 32, 4
    block_m = _pow2(tokens, 16, 64)
    return block_m, 64 if align_bytes >= 16 else 32, 8 if block_m >= 64 else 4


def _dot_mode(dtype: torch.dtype) -> Dict[str, object]:
    """Exact fp32 dots for fp32 (no TF32); native 16-bit dots, except under the interpreter,
    whose ``tl.dot`` multiplies bf16 as raw bits: there tiles are upcast (exact)."""
    upcast = INTERPRETED and dtype == torch.bfloat16
    return {"PRECISION": "ieee" if dtype == torch.float32 or upcast else "tf32",
            "UPCAST": upcast}


def _check(t: torch.Tensor, base: torch.Tensor, table: DeviceLocationTable) -> None:
    """Host-side checks of tensor metadata only (no device reads)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    if not (t.is_cuda or INTERPRETED):
        raise RuntimeError("the table kernels need CUDA tensors (or TRITON_INTERPRET=1 set "
                           "before chameleon_kernels.lora_table_triton is imported)")
    if t.dtype not in DTYPES or base.dtype != t.dtype:
        raise TypeError(f"activations {t.dtype}, weights {base.dtype}")
    if t.dim() != 2 or t.stride(1) != 1:
        raise ValueError("activations must be 2-D with contiguous rows")
    if base.device != t.device or table.device != t.device:
        raise ValueError("activations, weights and table on different devices")


def table_shrink(x: torch.Tensor, plan: BatchPlan, table: DeviceLocationTable, kind: Hashable,
                 layer: int, base: torch.Tensor, stack: int, max_rank: int,
                 block_sizes: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
    """``[T, stack * max_rank]``: per token ``scaling * x @ A.T`` in its adapter's first
    ``stack * r`` columns, zeros elsewhere (and for tokens of no segment)."""
    out = torch.zeros((x.shape[0], stack * max_rank), dtype=x.dtype, device=x.device)
    if plan.num_segments == 0 or plan.max_segment_tokens == 0 or x.shape[0] == 0:
        return out
    _check(x, base, table)
    block_m, block_k, warps = _tiles(x.dtype, plan.max_segment_tokens,
                                     table.align * x.element_size())
    block_n = _pow2(stack * max_rank, 16, 64)
    block_k = min(block_k, _pow2(x.shape[1], 16, 64))
    if block_sizes is not None:
        block_m, block_n, block_k = block_sizes
    grid = (plan.num_segments, triton.cdiv(plan.max_segment_tokens, block_m),
            triton.cdiv(stack * max_rank, block_n))
    with graph_guard.launch("table_shrink", base, *table.buffers(), plan.seg_adapter,
                            plan.seg_start, plan.order):
        _table_shrink_kernel[grid](
            x, out, base, table.offsets, table.ranks, table.scalings,
            plan.seg_adapter, plan.seg_start, plan.order, table.row(kind, layer), x.shape[1],
            x.stride(0), out.stride(0),
            STACK=stack, ALIGN=table.align, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=warps, **_dot_mode(x.dtype))
    return out


def table_expand(a: torch.Tensor, plan: BatchPlan, table: DeviceLocationTable, kind: Hashable,
                 layer: int, base: torch.Tensor, slice_offsets: Sequence[int],
                 base_output: Optional[torch.Tensor], max_rank: int,
                 block_sizes: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
    """Add each slice's ``a_i @ B_i.T`` into ``base_output`` (new zeros if None) for every token
    of a segment; ``slice_offsets`` are the output slice bounds ``[0, ..., out]`` (1-3 slices,
    host ints of the module, the same at every call)."""
    bounds = [int(v) for v in slice_offsets]
    stack = len(bounds) - 1
    if not 1 <= stack <= 3 or bounds[0] != 0 or any(lo > hi for lo, hi in zip(bounds, bounds[1:])):
        raise ValueError(f"bad slice offsets {bounds}")
    out = base_output if base_output is not None else torch.zeros(
        (a.shape[0], bounds[-1]), dtype=a.dtype, device=a.device)
    if plan.num_segments == 0 or plan.max_segment_tokens == 0 or a.shape[0] == 0:
        return out
    _check(a, base, table)
    if out.stride(1) != 1 or out.shape[0] != a.shape[0] or out.shape[1] < bounds[-1]:
        raise ValueError(f"base_output {tuple(out.shape)} cannot take [{a.shape[0]}, "
                         f"{bounds[-1]}]")
    b1, b2, b3 = (bounds[1:] + [bounds[-1]] * 2)[:3]
    block_m, block_k, warps = _tiles(a.dtype, plan.max_segment_tokens,
                                     table.align * a.element_size())
    block_n = _pow2(bounds[-1], 16, 64)
    block_k = min(block_k, _pow2(max_rank, 16, 64))
    if block_sizes is not None:
        block_m, block_n, block_k = block_sizes
    grid = (plan.num_segments, triton.cdiv(plan.max_segment_tokens, block_m),
            triton.cdiv(bounds[-1], block_n))
    with graph_guard.launch("table_expand", base, *table.buffers(), plan.seg_adapter,
                            plan.seg_start, plan.order):
        _table_expand_kernel[grid](
            a, out, base, table.offsets, table.ranks,
            plan.seg_adapter, plan.seg_start, plan.order, table.row(kind, layer), b1, b2, b3,
            a.stride(0), out.stride(0),
            STACK=stack, ALIGN=table.align, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=warps, **_dot_mode(a.dtype))
    return out
