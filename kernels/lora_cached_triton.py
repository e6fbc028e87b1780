"""LoRA shrink/expand over adapters stored rank-exact in the adapter cache (Triton, one launch).

Same contract as :mod:`chameleon_kernels.lora_cached` (see its module docstring): tokens grouped
by adapter (:class:`~chameleon_kernels.lora_cached.AdapterGroups`), each adapter's matrix read in
place at its own rank ``r``. Here every op is ONE Triton launch over all adapters of the batch,
whatever their ranks:

- :func:`build_segment_table` turns the groups plus each adapter's matrix into a small "segment
  table" (int64 ``[S, 5]``: token start, token stop, element offset of the matrix, rank, row
  stride; plus float32 scalings and the token permutation ``order``). The element offset is taken
  against a flat ``base`` tensor that holds the matrices (the KV buffer they were carved from):
  ``(w.data_ptr() - base.data_ptr()) // w.element_size()``, so the kernel addresses adapter ``s``
  as ``base_ptr + offset[s] + row * row_stride[s] + col`` - a page-table-like indirection that
  needs no copy of the weights and no per-adapter pointer argument.
- :func:`shrink_triton` runs a grid ``(segment, token block, column block)``; a program computes
  ``scaling * x[rows] @ A[cols].T`` for columns ``< stack * r`` of its segment (A's rows are the
  output columns, so the rank-exact layout ``[i*r, (i+1)*r)`` falls out of A's own row order)
  and exits at once when its token block or column block lies past the segment's length or
  ``stack * r``.
- :func:`expand_triton` runs a grid ``(segment, token block, output block)``; a program adds,
  for each slice ``i`` that overlaps its output columns, ``a[rows, i*r : i*r + r] @ B[cols].T``
  with B's columns masked to the slice's ``[offsets[i], offsets[i+1])`` and K masked to ``r``.
  Segments cover disjoint tokens, so the read-modify-write of the output needs no atomics.

Both accumulate in fp32 (``input_precision="ieee"`` for fp32 inputs, so no TF32) and take
fp32/bf16/fp16 activations; weights are cast to the activation dtype inside the kernel. The table
also carries the largest power of two (up to 16 bytes) dividing every offset, rank and row
stride; the kernels pass it to ``tl.multiple_of`` so aligned weights get vector (cp.async) loads.

:func:`lora_shrink` / :func:`lora_expand` are the one call site for CPU and GPU: Triton on CUDA
tensors (or on CPU tensors under ``TRITON_INTERPRET=1`` when asked with ``use_triton=True``), the
torch reference otherwise. Without a ``base`` they derive one: a flat view of the storage all
matrices share, or, when they sit in different allocations (a layer's K and V buffers), the
first matrix as the anchor of address-difference offsets. Not CUDA-graph safe (the table is
built on the host per call): the serving GPU path is :mod:`chameleon_kernels.lora_table_triton`
(same arithmetic, metadata in device buffers of fixed address); this per-call path serves only
where the adapter cache keeps no device table.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .lora_cached import AdapterGroups, WeightsOf, expand, shrink

try:  # Triton is optional: without it every call takes the torch path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

HAS_TRITON = triton is not None
# Whether the kernels below run in Triton's interpreter: Triton decides when ``@triton.jit``
# runs (at this module's import, from TRITON_INTERPRET); set again after the kernels exist.
INTERPRETED = False

# Columns of the int64 segment table.
SEG_START, SEG_STOP, SEG_OFFSET, SEG_RANK, SEG_STRIDE = range(5)
SEG_FIELDS = 5

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class SegmentTable:
    """Launch table of one module's matrices (A or B) over a batch's adapter groups.

    ``segments[s]`` = (token start, token stop, element offset into ``base``, rank, row stride)
    of the s-th group that has weights; tokens are positions in ``order`` (None: the batch
    order). ``width`` is the matrices' common column count (A: ``in``) or row count (B: ``out``).
    """

    segments: torch.Tensor  # int64 [S, SEG_FIELDS], on base.device
    scalings: torch.Tensor  # float32 [S], on base.device
    order: Optional[torch.Tensor]  # int64 [num grouped tokens] on base.device, or None
    kind: str  # "A" or "B"
    stack: int
    num_tokens: int
    max_tokens: int  # the longest segment (grid size along tokens)
    max_rank: int  # the largest rank present (0 when no segment)
    width: int
    dtype: torch.dtype
    device: torch.device
    align: int  # power of two dividing every offset, rank and row stride (<= 16 bytes)

    @property
    def num_segments(self) -> int:
        return int(self.segments.shape[0])


def _element_offset(w: torch.Tensor, base: torch.Tensor, check_bounds: bool) -> int:
    """Element offset of ``w``'s first element relative to ``base``'s first element."""
    if w.device != base.device:
        raise ValueError(f"matrix on {w.device}, base on {base.device}")
    if w.dtype != base.dtype:
        raise ValueError(f"matrix dtype {w.dtype} differs from base dtype {base.dtype}")
    size = w.element_size()
    delta = w.data_ptr() - base.data_ptr()
    if delta % size:
        raise ValueError("matrix is not element-aligned with base")
    offset = delta // size
    if check_bounds:
        last = offset + (w.shape[0] - 1) * w.stride(0) + (w.shape[1] - 1) * w.stride(1)
        if offset < 0 or last >= base.numel():
            raise ValueError(f"matrix at element offset {offset} (last element {last}) lies "
                             f"outside base of {base.numel()} elements")
    return offset


def build_segment_table(groups: AdapterGroups, weights_of: WeightsOf, base: torch.Tensor,
                        stack: int, kind: str, check_bounds: bool = True) -> SegmentTable:
    """The launch table of ``kind`` ("A": ``[stack*r, in]``; "B": ``[out, r]``) matrices.

    ``base`` is a flat tensor containing every matrix (same dtype and device). Groups whose
    adapter has no weights (``weights_of`` -> None) are left out: their tokens get nothing.
    With ``check_bounds=False`` a matrix may lie outside ``base`` (even in another allocation
    of the same device: the offset is then a plain address difference, which CUDA's flat
    address space resolves); offsets may be negative.
    """
    if kind not in ("A", "B"):
        raise ValueError(f"kind must be 'A' or 'B', not {kind!r}")
    if stack < 1:
        raise ValueError("stack must be >= 1")
    rows: List[Tuple[int, int, int, int, int]] = []
    scales: List[float] = []
    width = -1
    max_tokens = 0
    max_rank = 0
    for start, stop, adapter in groups.groups:
        if stop <= start:
            continue
        w = weights_of(adapter)
        if w is None:
            continue
        if w.dim() != 2:
            raise ValueError(f"adapter {adapter}: matrix must be 2-D, got {tuple(w.shape)}")
        if w.shape[1] > 1 and w.stride(1) != 1:
            raise ValueError(f"adapter {adapter}: matrix rows must be contiguous")
        if kind == "A":
            rank, remainder = divmod(int(w.shape[0]), stack)
            if remainder:
                raise ValueError(f"adapter {adapter}: A has {w.shape[0]} rows, not stack*r "
                                 f"for stack={stack}")
            cols = int(w.shape[1])
        else:
            rank = int(w.shape[1])
            cols = int(w.shape[0])
        if rank == 0:
            continue
        if width not in (-1, cols):
            raise ValueError(f"adapter {adapter}: matrix width {cols} differs from {width}")
        width = cols
        offset = _element_offset(w, base, check_bounds)
        rows.append((int(start), int(stop), offset, rank, int(w.stride(0))))
        scales.append(float(groups.scalings[adapter]))
        max_tokens = max(max_tokens, int(stop) - int(start))
        max_rank = max(max_rank, rank)
    device = base.device
    segments = torch.tensor(rows, dtype=torch.int64).reshape(-1, SEG_FIELDS).to(device)
    scalings = torch.tensor(scales, dtype=torch.float32).to(device)
    order = None
    if groups.order is not None and rows:
        order = groups.order.to(device=device, dtype=torch.int64)
    return SegmentTable(segments, scalings, order, kind, int(stack), int(groups.num_tokens),
                        max_tokens, max_rank, max(width, 0), base.dtype, device,
                        _alignment(rows, base.element_size()))


def _alignment(rows: Sequence[Tuple[int, int, int, int, int]], element_size: int) -> int:
    """Largest power of two (at most 16 bytes' worth of elements) dividing every segment's
    offset, rank and row stride: lets the compiler vectorize the weight loads."""
    align = max(1, 16 // element_size)
    for row in rows:
        for value in (row[SEG_OFFSET], row[SEG_RANK], row[SEG_STRIDE]):
            while value % align:
                align //= 2
    return align


def _block(n: int, lo: int, hi: int) -> int:
    """Power of two covering ``n``, clamped to ``[lo, hi]`` (tl.dot needs >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


if HAS_TRITON:

    @triton.jit
    def _segment(seg_ptr, seg, ALIGN: tl.constexpr):
        """One row of the segment table; offset/stride/rank carry the host's alignment hint."""
        row = seg_ptr + seg * 5
        start = tl.load(row + 0)
        stop = tl.load(row + 1)
        w_off = tl.multiple_of(tl.load(row + 2), ALIGN)
        rank = tl.multiple_of(tl.load(row + 3).to(tl.int32), ALIGN)
        row_stride = tl.multiple_of(tl.load(row + 4).to(tl.int32), ALIGN)
        return start, stop - start, w_off, rank, row_stride

    @triton.jit
    def _token_rows(order_ptr, start, offs_m, mask_m, HAS_ORDER: tl.constexpr):
        """Batch rows of the segment's tokens ``start + offs_m`` (through ``order`` if any)."""
        if HAS_ORDER:
            rows = tl.load(order_ptr + start + offs_m, mask=mask_m, other=0)
        else:
            rows = start + offs_m
        return rows.to(tl.int64)

    @triton.jit
    def _shrink_kernel(x_ptr, out_ptr, base_ptr, seg_ptr, scale_ptr, order_ptr,
                       in_features, stride_xm, stride_xk, stride_om, stride_on,
                       STACK: tl.constexpr, HAS_ORDER: tl.constexpr, ALIGN: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        seg = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_n = tl.program_id(2)
        start, count, w_off, rank, row_stride = _segment(seg_ptr, seg, ALIGN)
        width = STACK * rank  # this adapter's output columns = A's rows, in order
        if pid_m * BLOCK_M >= count:
            return
        if pid_n * BLOCK_N >= width:
            return
        scale = tl.load(scale_ptr + seg)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < count
        rows = _token_rows(order_ptr, start, offs_m, mask_m, HAS_ORDER)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < width
        offs_k = tl.arange(0, BLOCK_K)

        # x tile [BLOCK_M, BLOCK_K]; A^T tile [BLOCK_K, BLOCK_N] read in place at base + w_off.
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = (base_ptr + w_off) + (offs_n[None, :] * row_stride + offs_k[:, None])
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            mask_k = offs_k < in_features - k0
            xt = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:
                acc += tl.dot(xt.to(tl.float32), wt.to(tl.float32), input_precision=PRECISION)
            else:
                acc += tl.dot(xt, wt.to(xt.dtype), input_precision=PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K
        acc = acc * scale
        out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _expand_kernel(a_ptr, out_ptr, base_ptr, seg_ptr, order_ptr, slice_ptr,
                       stride_am, stride_ak, stride_om, stride_on,
                       STACK: tl.constexpr, HAS_ORDER: tl.constexpr, ALIGN: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        seg = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_n = tl.program_id(2)
        start, count, w_off, rank, row_stride = _segment(seg_ptr, seg, ALIGN)
        if pid_m * BLOCK_M >= count:
            return

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < count
        rows = _token_rows(order_ptr, start, offs_m, mask_m, HAS_ORDER)
        n0 = pid_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        total = tl.load(slice_ptr + STACK)
        mask_n = offs_n < total

        w_seg = base_ptr + w_off  # this adapter's B, read in place
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in tl.static_range(STACK):
            lo = tl.load(slice_ptr + i)
            hi = tl.load(slice_ptr + i + 1)
            if (lo < n0 + BLOCK_N) & (hi > n0):  # this output block overlaps slice i
                in_slice = (offs_n >= lo) & (offs_n < hi)
                # a tile [BLOCK_M, BLOCK_K] of slice i's columns [i*r, (i+1)*r); B^T tile
                # [BLOCK_K, BLOCK_N] of B's rows in the slice (others masked to zero).
                a_cols = (i * rank + offs_k)[None, :] * stride_ak
                a_ptrs = a_ptr + rows[:, None] * stride_am + a_cols
                w_ptrs = w_seg + (offs_n[None, :] * row_stride + offs_k[:, None])
                for k0 in range(0, rank, BLOCK_K):
                    mask_k = offs_k < rank - k0
                    at = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                    wt = tl.load(w_ptrs, mask=mask_k[:, None] & in_slice[None, :], other=0.0)
                    if UPCAST:
                        acc += tl.dot(at.to(tl.float32), wt.to(tl.float32),
                                      input_precision=PRECISION)
                    else:
                        acc += tl.dot(at, wt.to(at.dtype), input_precision=PRECISION)
                    a_ptrs += BLOCK_K * stride_ak
                    w_ptrs += BLOCK_K
        out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
        mask = mask_m[:, None] & mask_n[None, :]
        prev = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, (prev + acc).to(out_ptr.dtype.element_ty), mask=mask)


    INTERPRETED = type(_shrink_kernel).__name__ == "InterpretedFunction"


def _blocks(table: SegmentTable, dtype: torch.dtype) -> Tuple[int, int, int]:
    """BLOCK_M, BLOCK_K and num_warps that compile without register spills for sm80 and sm90
    (checked offline with cuobjdump at BLOCK_N=64): fp32 (FMA dots) stays at 32x32 with 4
    warps; bf16/fp16 take BLOCK_K 64 when the weights are 16-byte aligned (vector cp.async
    loads), 32 otherwise, and 8 warps once BLOCK_M reaches 64."""
    if dtype == torch.float32:
        return _block(table.max_tokens, 16, 32), 32, 4
    aligned = table.align * table.dtype.itemsize >= 16
    block_m = _block(table.max_tokens, 16, 64)
    return block_m, 64 if aligned else 32, 8 if block_m >= 64 else 4


def _checked_blocks(block_sizes: Sequence[int]) -> Tuple[int, int, int]:
    block_m, block_n, block_k = (int(b) for b in block_sizes)
    for b in (block_m, block_n, block_k):
        if b < 16 or b & (b - 1):
            raise ValueError(f"block sizes must be powers of two >= 16, got {block_sizes}")
    return block_m, block_n, block_k


def _dot_mode(dtype: torch.dtype) -> Dict[str, object]:
    """``tl.dot`` settings: exact fp32 (no TF32) for fp32; native bf16/fp16 tensor-core dots,
    except under the interpreter, whose ``tl.dot`` multiplies bf16 as raw uint16 bits: there
    bf16 tiles are upcast to fp32 first (exact, so the products are the same)."""
    upcast = INTERPRETED and dtype == torch.bfloat16
    return {"PRECISION": "ieee" if dtype == torch.float32 or upcast else "tf32",
            "UPCAST": upcast}


def _check_launchable(t: torch.Tensor, table: SegmentTable, base: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    if t.dtype not in _DTYPES or base.dtype not in _DTYPES:
        raise TypeError(f"unsupported dtypes {t.dtype} / {base.dtype}")
    if not (t.is_cuda or INTERPRETED):
        raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set "
                           "before chameleon_kernels.lora_cached_triton is imported)")
    if base.dtype != table.dtype or base.device != table.device:
        raise ValueError("base differs from the one the table was built against")
    if t.device != base.device:
        raise ValueError(f"activations on {t.device}, weights on {base.device}")


def shrink_triton(x: torch.Tensor, table: SegmentTable, base: torch.Tensor, stack: int,
                  max_rank: int, *, block_sizes: Optional[Tuple[int, int, int]] = None
                  ) -> torch.Tensor:
    """:func:`~chameleon_kernels.lora_cached.shrink` in one launch: ``[T, stack * max_rank]``.

    ``block_sizes`` (BLOCK_M, BLOCK_N, BLOCK_K) overrides the chosen tiles (powers of two >= 16;
    tests use it to cover several token/column blocks with tiny shapes)."""
    if table.kind != "A" or table.stack != stack:
        raise ValueError("shrink needs a table of A matrices built with the same stack")
    if table.max_rank > max_rank:
        raise ValueError(f"rank {table.max_rank} exceeds max_rank {max_rank}")
    out = torch.zeros((x.shape[0], stack * max_rank), dtype=x.dtype, device=x.device)
    if table.num_segments == 0 or x.shape[0] == 0:
        return out
    _check_launchable(x, table, base)
    if x.dim() != 2 or x.shape[1] != table.width:
        raise ValueError(f"x of shape {tuple(x.shape)} does not match A's {table.width} columns")
    block_m, block_k, warps = _blocks(table, x.dtype)
    block_n = _block(stack * table.max_rank, 16, 64)
    block_k = min(block_k, _block(x.shape[1], 16, 64))
    if block_sizes is not None:
        block_m, block_n, block_k = _checked_blocks(block_sizes)
    grid = (table.num_segments, triton.cdiv(table.max_tokens, block_m),
            triton.cdiv(stack * table.max_rank, block_n))
    order = table.order if table.order is not None else table.segments
    _shrink_kernel[grid](
        x, out, base, table.segments, table.scalings, order,
        x.shape[1], x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        STACK=stack, HAS_ORDER=table.order is not None, ALIGN=table.align,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        **_dot_mode(x.dtype))
    return out


def expand_triton(a: torch.Tensor, table: SegmentTable, base: torch.Tensor,
                  offsets: Sequence[int], base_output: Optional[torch.Tensor], *,
                  block_sizes: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
    """:func:`~chameleon_kernels.lora_cached.expand` in one launch; adds into ``base_output``.

    ``block_sizes``: as for :func:`shrink_triton`."""
    offsets = [int(o) for o in offsets]
    num_slices = len(offsets) - 1
    if num_slices < 1 or offsets[0] != 0 or any(lo > hi for lo, hi in zip(offsets, offsets[1:])):
        raise ValueError(f"bad offsets {offsets}")
    total = offsets[-1]
    out = base_output if base_output is not None else torch.zeros(
        (a.shape[0], total), dtype=a.dtype, device=a.device)
    if table.num_segments == 0 or a.shape[0] == 0 or total == 0:
        return out
    if table.kind != "B" or table.stack != num_slices:
        raise ValueError("expand needs a table of B matrices built with len(offsets) - 1")
    _check_launchable(a, table, base)
    if table.width != total:
        raise ValueError(f"B matrices have {table.width} rows, offsets end at {total}")
    if a.shape[1] < num_slices * table.max_rank:
        raise ValueError(f"a has {a.shape[1]} columns, fewer than {num_slices} * rank "
                         f"{table.max_rank}")
    if out.shape[0] != a.shape[0] or out.shape[1] < total or out.device != a.device:
        raise ValueError(f"base_output {tuple(out.shape)} cannot take [{a.shape[0]}, {total}]")
    slices = torch.tensor(offsets, dtype=torch.int64).to(a.device)
    block_m, block_k, warps = _blocks(table, a.dtype)
    block_n = _block(total, 16, 64)
    block_k = min(block_k, _block(table.max_rank, 16, 64))
    if block_sizes is not None:
        block_m, block_n, block_k = _checked_blocks(block_sizes)
    grid = (table.num_segments, triton.cdiv(table.max_tokens, block_m),
            triton.cdiv(total, block_n))
    order = table.order if table.order is not None else table.segments
    _expand_kernel[grid](
        a, out, base, table.segments, order, slices,
        a.stride(0), a.stride(1), out.stride(0), out.stride(1),
        STACK=num_slices, HAS_ORDER=table.order is not None, ALIGN=table.align,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        **_dot_mode(a.dtype))
    return out


# -- one call site for CPU and GPU -------------------------------------------------------------
def _use_triton(t: torch.Tensor, use_triton: Optional[bool]) -> bool:
    """None: Triton on CUDA tensors when installed. True: Triton (CUDA or interpreter)."""
    if use_triton is False:
        return False
    if use_triton is None:
        return HAS_TRITON and t.is_cuda and t.dtype in _DTYPES
    if not HAS_TRITON:
        raise RuntimeError("use_triton=True but triton is not installed")
    if not (t.is_cuda or INTERPRETED):
        raise RuntimeError("use_triton=True on CPU tensors needs TRITON_INTERPRET=1 set before "
                           "chameleon_kernels.lora_cached_triton is imported")
    return True


def _present_matrices(groups: AdapterGroups, weights_of: WeightsOf) -> Dict[int, torch.Tensor]:
    found: Dict[int, torch.Tensor] = {}
    for _, _, adapter in groups.groups:
        if adapter not in found:
            w = weights_of(adapter)
            if w is not None:
                found[adapter] = w
    return found


def _derive_base(mats: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, bool]:
    """A base for ``mats`` and whether bounds can be checked against it.

    All in one storage: a flat view of that storage. Otherwise (e.g. some matrices in a layer's
    K buffer, some in its V buffer) the first matrix anchors cross-allocation offsets, which
    only a flat address space (CUDA, or CPU tensors under the interpreter) resolves.
    """
    first = mats[0]
    storage = first.untyped_storage()
    if all(m.untyped_storage().data_ptr() == storage.data_ptr() for m in mats):
        numel = storage.nbytes() // first.element_size()
        flat = torch.empty(0, dtype=first.dtype, device=first.device)
        flat.set_(storage, 0, (numel,), (1,))
        return flat, True
    return first, False


def lora_shrink(x: torch.Tensor, groups: AdapterGroups, weights_of: WeightsOf, stack: int,
                max_rank: int, base: Optional[torch.Tensor] = None,
                use_triton: Optional[bool] = None) -> torch.Tensor:
    """Shrink: the Triton kernel where it can run (see :func:`_use_triton`), else the torch one.

    ``base``: flat tensor holding every A matrix; None derives one from the matrices' storage.
    """
    if not _use_triton(x, use_triton):
        return shrink(x, groups, weights_of, stack, max_rank)
    mats = _present_matrices(groups, weights_of)
    if not mats:
        return torch.zeros((x.shape[0], stack * max_rank), dtype=x.dtype, device=x.device)
    check = True
    if base is None:
        base, check = _derive_base(list(mats.values()))
    table = build_segment_table(groups, mats.get, base, stack, "A", check_bounds=check)
    return shrink_triton(x, table, base, stack, max_rank)


def lora_expand(a: torch.Tensor, groups: AdapterGroups, weights_of: WeightsOf,
                offsets: Sequence[int], base_output: Optional[torch.Tensor],
                base: Optional[torch.Tensor] = None,
                use_triton: Optional[bool] = None) -> torch.Tensor:
    """Expand: the Triton kernel where it can run (see :func:`_use_triton`), else the torch one.

    ``base``: flat tensor holding every B matrix; None derives one from the matrices' storage.
    """
    if not _use_triton(a, use_triton):
        return expand(a, groups, weights_of, offsets, base_output)
    mats = _present_matrices(groups, weights_of)
    if not mats:
        return base_output if base_output is not None else torch.zeros(
            (a.shape[0], int(offsets[-1])), dtype=a.dtype, device=a.device)
    check = True
    if base is None:
        base, check = _derive_base(list(mats.values()))
    table = build_segment_table(groups, mats.get, base, len(offsets) - 1, "B",
                                check_bounds=check)
    return expand_triton(a, table, base, offsets, base_output)
