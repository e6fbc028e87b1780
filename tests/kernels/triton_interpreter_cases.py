"""Triton LoRA shrink/expand over rank-exact cached adapters, run under the Triton interpreter.

Run by ``test_lora_cached_triton.py`` in a fresh Python process started with
``TRITON_INTERPRET=1``: Triton decides at import whether its own ``@jit`` library functions are
interpreted, so the variable must be set before anything in the process imports Triton (SGLang
does). The kernels run on CPU tensors and are compared with a float32 reference computed here,
token by token. Adapter matrices are carved out of one flat buffer at uneven offsets, as the
adapter cache does. Shapes are tiny so the whole module runs in seconds on 2 cores.
"""

import os
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import triton  # noqa: F401  - no importorskip: a missing Triton must fail loudly

from chameleon_kernels import lora_cached_triton as lct
from chameleon_kernels.lora_cached import expand, group_tokens, shrink

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run this module in a process started with TRITON_INTERPRET=1 "
                       "(tests/kernels/test_lora_cached_triton.py does)")
assert lct.HAS_TRITON and lct.INTERPRETED

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}

# adapter id -> rank; adapter 4 has a scaling but no weights for the module under test.
RANKS = {1: 4, 2: 16, 3: 8}
NO_WEIGHTS = 4
SCALINGS = {1: 0.5, 2: 2.0, 3: 1.0, NO_WEIGHTS: 1.5}
BASE_MODEL = -1  # not in SCALINGS: its tokens get nothing

# (adapter per request, tokens per request)
LAYOUTS = {
    # each adapter in one run: groups contiguous, no permutation
    "contiguous": ([1, 1, BASE_MODEL, 2, 3, NO_WEIGHTS], [3, 2, 2, 1, 4, 2]),
    # adapters interleaved: groups need the token permutation ``order``
    "interleaved": ([2, 1, BASE_MODEL, 3, 1, NO_WEIGHTS, 2, 3], [2, 3, 1, 2, 2, 2, 1, 1]),
}

# (output slice offsets, hidden size)
SLICES = {
    "one": ([0, 48], 64),
    "unequal3": ([0, 32, 40, 48], 40),
    "equal2": ([0, 16, 32], 32),
}


class Cache:
    """One flat buffer holding every adapter's A ``[stack*r, in]`` and B ``[out, r]`` as views at
    uneven element offsets (gaps between them), like matrices packed into KV-cache slots."""

    def __init__(self, dtype: torch.dtype, stack: int, hidden: int, out_total: int,
                 seed: int = 0, padded_row_adapter: Optional[int] = None,
                 aligned: bool = False) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.base = torch.full((20000,), float("nan"), dtype=dtype)  # NaN: stray reads show
        self.a: Dict[int, torch.Tensor] = {}
        self.b: Dict[int, torch.Tensor] = {}
        self.offsets: Dict[Tuple[str, int], int] = {}
        cursor = 5
        for adapter, rank in RANKS.items():
            if aligned:  # 16-byte aligned starts, as rank/hidden multiples of 8 give
                cursor = -(-cursor // 8) * 8
            pad = 3 if adapter == padded_row_adapter else 0  # row stride > row length
            rows, cols = stack * rank, hidden
            a = self._carve(cursor, rows, cols + pad)[:, :cols]
            a.copy_(torch.randn(rows, cols, generator=gen) / cols ** 0.5)
            self.a[adapter] = a
            self.offsets[("A", adapter)] = cursor
            cursor += rows * (cols + pad) + 7
            if aligned:
                cursor = -(-cursor // 8) * 8
            b = self._carve(cursor, out_total, rank)
            b.copy_(torch.randn(out_total, rank, generator=gen) / rank ** 0.5)
            self.b[adapter] = b
            self.offsets[("B", adapter)] = cursor
            cursor += out_total * rank + 3
        assert cursor < self.base.numel()

    def _carve(self, offset: int, rows: int, cols: int) -> torch.Tensor:
        return self.base[offset:offset + rows * cols].view(rows, cols)

    def a_of(self, adapter: int) -> Optional[torch.Tensor]:
        return self.a.get(adapter)

    def b_of(self, adapter: int) -> Optional[torch.Tensor]:
        return self.b.get(adapter)


def adapter_per_token(layout: str) -> List[int]:
    adapters, counts = LAYOUTS[layout]
    return [adapter for adapter, count in zip(adapters, counts) for _ in range(count)]


def reference_shrink(x: torch.Tensor, per_token: Sequence[int], cache: Cache, stack: int,
                     max_rank: int) -> torch.Tensor:
    out = torch.zeros(x.shape[0], stack * max_rank)
    for t, adapter in enumerate(per_token):
        a = cache.a_of(adapter)
        if adapter in SCALINGS and a is not None:
            out[t, :a.shape[0]] = SCALINGS[adapter] * (a.float() @ x[t].float())
    return out


def reference_expand(a_in: torch.Tensor, per_token: Sequence[int], cache: Cache,
                     offsets: Sequence[int], base_output: Optional[torch.Tensor]) -> torch.Tensor:
    out = (torch.zeros(a_in.shape[0], offsets[-1]) if base_output is None
           else base_output.float().clone())
    for t, adapter in enumerate(per_token):
        b = cache.b_of(adapter)
        if adapter not in SCALINGS or b is None:
            continue
        r = b.shape[1]
        for i in range(len(offsets) - 1):
            lo, hi = offsets[i], offsets[i + 1]
            out[t, lo:hi] += b[lo:hi].float() @ a_in[t, i * r:(i + 1) * r].float()
    return out


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.float(), expected, **TOL[dtype])


# -- the kernels against the float32 reference -------------------------------------------------
@pytest.mark.parametrize("block_sizes", [None, (16, 16, 16)], ids=["auto", "tiles16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("slices", list(SLICES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_shrink_expand_match_reference(dtype, slices, layout, block_sizes):
    offsets, hidden = SLICES[slices]
    stack = len(offsets) - 1
    max_rank = max(RANKS.values())
    cache = Cache(dtype, stack, hidden, offsets[-1], seed=stack,
                  padded_row_adapter=3 if layout == "interleaved" else None)
    adapters, counts = LAYOUTS[layout]
    groups = group_tokens(adapters, counts, SCALINGS)
    assert (groups.order is not None) == (layout == "interleaved")
    per_token = adapter_per_token(layout)
    num_tokens = len(per_token)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)

    table_a = lct.build_segment_table(groups, cache.a_of, cache.base, stack, "A")
    a_out = lct.shrink_triton(x, table_a, cache.base, stack, max_rank, block_sizes=block_sizes)
    assert a_out.shape == (num_tokens, stack * max_rank)
    close(a_out, reference_shrink(x, per_token, cache, stack, max_rank), dtype)
    for t, adapter in enumerate(per_token):  # base-model / weightless tokens: exact zeros
        if adapter in (BASE_MODEL, NO_WEIGHTS):
            assert not a_out[t].any()

    # expand reads only each adapter's [i*r, (i+1)*r) columns: feed it noise everywhere
    a_in = torch.randn(num_tokens, stack * max_rank, generator=gen).to(dtype)
    table_b = lct.build_segment_table(groups, cache.b_of, cache.base, stack, "B")
    fresh = lct.expand_triton(a_in, table_b, cache.base, offsets, None, block_sizes=block_sizes)
    close(fresh, reference_expand(a_in, per_token, cache, offsets, None), dtype)

    base_output = torch.randn(num_tokens, offsets[-1], generator=gen).to(dtype)
    before = base_output.clone()
    result = lct.expand_triton(a_in, table_b, cache.base, offsets, base_output,
                               block_sizes=block_sizes)
    assert result is base_output  # added in place
    close(result, reference_expand(a_in, per_token, cache, offsets, before), dtype)
    for t, adapter in enumerate(per_token):
        if adapter in (BASE_MODEL, NO_WEIGHTS):
            assert torch.equal(result[t], before[t])


def test_fp16_and_the_torch_path_agree():
    offsets, hidden = SLICES["unequal3"]
    stack = len(offsets) - 1
    cache = Cache(torch.float16, stack, hidden, offsets[-1], seed=7)
    adapters, counts = LAYOUTS["interleaved"]
    groups = group_tokens(adapters, counts, SCALINGS)
    per_token = adapter_per_token("interleaved")
    x = torch.randn(len(per_token), hidden).half()
    table_a = lct.build_segment_table(groups, cache.a_of, cache.base, stack, "A")
    a_out = lct.shrink_triton(x, table_a, cache.base, stack, 16)
    close(a_out, reference_shrink(x, per_token, cache, stack, 16), torch.float16)
    close(a_out, shrink(x, groups, cache.a_of, stack, 16).float(), torch.float16)
    table_b = lct.build_segment_table(groups, cache.b_of, cache.base, stack, "B")
    out = lct.expand_triton(a_out, table_b, cache.base, offsets, None)
    close(out, reference_expand(a_out, per_token, cache, offsets, None), torch.float16)
    close(out, expand(a_out, groups, cache.b_of, offsets, None).float(), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_long_segment_next_to_short_ones_aligned_weights(dtype):
    """A prefill-like segment longer than BLOCK_M between one-token (decode-like) segments,
    weights 16-byte aligned (the vector-load hint and, for bf16, BLOCK_K 64 / 8 warps)."""
    offsets, hidden = [0, 32, 40, 48], 64
    cache = Cache(dtype, 3, hidden, 48, seed=3, aligned=True)
    adapters, counts = [3, 2, BASE_MODEL, 3, 2], [1, 70, 2, 1, 1]
    groups = group_tokens(adapters, counts, SCALINGS)
    assert groups.order is not None
    per_token = [a for a, c in zip(adapters, counts) for _ in range(c)]
    x = torch.randn(len(per_token), hidden).to(dtype)
    table_a = lct.build_segment_table(groups, cache.a_of, cache.base, 3, "A")
    assert table_a.max_tokens == 71 and table_a.align == 16 // x.element_size()
    a_out = lct.shrink_triton(x, table_a, cache.base, 3, 16)
    close(a_out, reference_shrink(x, per_token, cache, 3, 16), dtype)
    table_b = lct.build_segment_table(groups, cache.b_of, cache.base, 3, "B")
    out = lct.expand_triton(a_out, table_b, cache.base, offsets, None)
    close(out, reference_expand(a_out, per_token, cache, offsets, None), dtype)


# -- the segment table ---------------------------------------------------------------------------
def test_segment_table_records_offsets_ranks_strides_and_order():
    stack, hidden = 3, 40
    cache = Cache(torch.float32, stack, hidden, 48, padded_row_adapter=3)
    adapters, counts = LAYOUTS["interleaved"]
    groups = group_tokens(adapters, counts, SCALINGS)
    table = lct.build_segment_table(groups, cache.a_of, cache.base, stack, "A")
    with_weights = [g for g in groups.groups if g[2] != NO_WEIGHTS]
    assert table.num_segments == len(with_weights) == 3
    for row, scale, (start, stop, adapter) in zip(table.segments.tolist(),
                                                  table.scalings.tolist(), with_weights):
        assert row[lct.SEG_START] == start and row[lct.SEG_STOP] == stop
        assert row[lct.SEG_OFFSET] == cache.offsets[("A", adapter)]
        assert row[lct.SEG_RANK] == RANKS[adapter]
        assert row[lct.SEG_STRIDE] == hidden + (3 if adapter == 3 else 0)
        assert scale == SCALINGS[adapter]
    assert table.segments.dtype == torch.int64
    assert torch.equal(table.order, groups.order)
    assert table.max_rank == 16 and table.width == hidden and table.align == 1

    table_b = lct.build_segment_table(groups, cache.b_of, cache.base, stack, "B")
    assert [row[lct.SEG_OFFSET] for row in table_b.segments.tolist()] == [
        cache.offsets[("B", g[2])] for g in with_weights]
    assert [row[lct.SEG_STRIDE] for row in table_b.segments.tolist()] == [
        RANKS[g[2]] for g in with_weights]
    assert table_b.width == 48


def test_segment_table_rejects_matrices_outside_base_and_mismatches():
    cache = Cache(torch.float32, 1, 32, 48)
    groups = group_tokens([1, 2], [2, 2], SCALINGS)
    stray = torch.randn(4, 32)
    with pytest.raises(ValueError, match="outside base"):
        lct.build_segment_table(groups, {1: cache.a[1], 2: stray}.get, cache.base, 1, "A")
    with pytest.raises(ValueError, match="dtype"):
        lct.build_segment_table(groups, {1: cache.a[1].double()}.get, cache.base, 1, "A")
    with pytest.raises(ValueError, match="stack"):
        lct.build_segment_table(groups, cache.a_of, cache.base, 3, "A")  # 4 rows, stack 3
    empty = lct.build_segment_table(groups, {}.get, cache.base, 1, "A")
    assert empty.num_segments == 0
    x = torch.randn(4, 32)
    assert not lct.shrink_triton(x, empty, cache.base, 1, 16).any()


# -- the one call site ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dispatch_cpu_uses_torch_and_interpreter_on_request(dtype):
    offsets, hidden = SLICES["unequal3"]
    stack = len(offsets) - 1
    cache = Cache(dtype, stack, hidden, offsets[-1], seed=11)
    adapters, counts = LAYOUTS["interleaved"]
    groups = group_tokens(adapters, counts, SCALINGS)
    per_token = adapter_per_token("interleaved")
    x = torch.randn(len(per_token), hidden).to(dtype)

    # default on CPU tensors: exactly the torch reference implementation
    a_torch = lct.lora_shrink(x, groups, cache.a_of, stack, 16)
    assert torch.equal(a_torch, shrink(x, groups, cache.a_of, stack, 16))
    out_torch = lct.lora_expand(a_torch, groups, cache.b_of, offsets, None)
    assert torch.equal(out_torch, expand(a_torch, groups, cache.b_of, offsets, None))

    # asked for: the Triton kernels (interpreted), with the base given or derived
    for base in (cache.base, None):
        a_tri = lct.lora_shrink(x, groups, cache.a_of, stack, 16, base=base, use_triton=True)
        close(a_tri, reference_shrink(x, per_token, cache, stack, 16), dtype)
        out_tri = lct.lora_expand(a_tri, groups, cache.b_of, offsets, None, base=base,
                                  use_triton=True)
        close(out_tri, reference_expand(a_tri, per_token, cache, offsets, None), dtype)


def test_dispatch_matrices_in_two_buffers():
    """Like an adapter packed partly into a layer's K buffer, partly into its V buffer: no
    common storage, so the derived base anchors offsets across allocations."""
    offsets, hidden = [0, 48], 32
    k_cache = Cache(torch.float32, 1, hidden, 48, seed=5)
    v_cache = Cache(torch.float32, 1, hidden, 48, seed=6)
    a_of = {1: k_cache.a[1], 2: v_cache.a[2], 3: k_cache.a[3]}.get
    b_of = {1: v_cache.b[1], 2: k_cache.b[2], 3: v_cache.b[3]}.get
    groups = group_tokens([1, 2, BASE_MODEL, 3], [2, 3, 1, 2], SCALINGS)
    x = torch.randn(8, hidden)
    a_tri = lct.lora_shrink(x, groups, a_of, 1, 16, use_triton=True)
    torch.testing.assert_close(a_tri, shrink(x, groups, a_of, 1, 16), **TOL[torch.float32])
    out = lct.lora_expand(a_tri, groups, b_of, offsets, None, use_triton=True)
    torch.testing.assert_close(out, expand(a_tri, groups, b_of, offsets, None),
                               **TOL[torch.float32])


def test_dispatch_without_weights_returns_zeros_or_base_output():
    groups = group_tokens([NO_WEIGHTS, BASE_MODEL], [3, 2], SCALINGS)
    x = torch.randn(5, 32)
    a = lct.lora_shrink(x, groups, {}.get, 2, 8, use_triton=True)
    assert a.shape == (5, 16) and not a.any()
    base_output = torch.randn(5, 24)
    before = base_output.clone()
    out = lct.lora_expand(a, groups, {}.get, [0, 16, 24], base_output, use_triton=True)
    assert out is base_output and torch.equal(out, before)
