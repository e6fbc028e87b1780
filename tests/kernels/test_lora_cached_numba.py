"""The compiled decode path of the CPU LoRA kernels (chameleon_kernels.lora_cached_numba).

Adapters are packed as the adapter cache packs them: every matrix a contiguous view of one of
two flat storages (a layer's K and V buffers). Results are checked against the float32
per-request reference of ``test_lora_cached`` in every dtype a model may serve in, and the tests
check which path served. The kernels' own 16-bit conversions are checked bit for bit against
torch's over every 16-bit pattern.
"""

from __future__ import annotations

import itertools
from typing import Dict, Sequence, Tuple

import pytest
import torch
from test_lora_cached import (
    NUM_ADAPTERS,
    RANK_MIXES,
    make_adapters,
    module_offsets,
    reference,
    seed_of,
    sharing,
)

from chameleon_kernels import lora_cached_numba
from chameleon_kernels.lora_cached import expand, group_tokens, shrink

pytestmark = pytest.mark.skipif(not lora_cached_numba.available(), reason="numba not installed")
TOL = dict(atol=1e-4, rtol=1e-4)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# One rounding of a float32 result (the reference rounds its inputs the same way): 16-bit
# results are within a few units in the last place of the float32 reference.
DTYPE_TOL = {
    torch.float32: TOL,
    torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
    torch.float16: dict(atol=3e-3, rtol=2e-3),
}


def pack_in_two_storages(
    A: Dict[int, torch.Tensor], B: Dict[int, torch.Tensor]
) -> Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor]]:
    """Copies of ``A`` and ``B`` as views of two flat buffers, adapters alternating between them
    (as matrices alternate between a layer's K and V rows): A contiguous, B stored transposed
    (a ``[r, out]`` block, viewed as ``[out, r]``), as the cache keeps them on CPU."""
    items = [(d, i, m) for d, group in enumerate((A, B)) for i, m in group.items()]
    sizes = [0, 0]
    for d, i, m in items:
        sizes[(d + i) % 2] += m.numel() + 3  # gaps: offsets are not multiples of a row
    dtype = next(iter(A.values())).dtype
    flats = [torch.zeros(s, dtype=dtype) for s in sizes]
    cursor = [0, 0]
    packed: Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor]] = ({}, {})
    for d, i, m in items:
        which = (d + i) % 2
        block = flats[which][cursor[which] : cursor[which] + m.numel()]
        view = block.view(m.shape) if d == 0 else block.view(m.shape[1], m.shape[0]).t()
        view.copy_(m)
        packed[d][i] = view
        cursor[which] += m.numel() + 3
    return packed


class PathSpy:
    """Counts how many groups each path served."""

    def __init__(self, monkeypatch) -> None:
        self.compiled = 0
        shrink_small, expand_small = lora_cached_numba.shrink_small, lora_cached_numba.expand_small

        def count_shrink(x, out, plan):
            self.compiled += len(plan.starts)
            shrink_small(x, out, plan)

        def count_expand(a, out, plan, bounds):
            self.compiled += len(plan.starts)
            expand_small(a, out, plan, bounds)

        monkeypatch.setattr(lora_cached_numba, "shrink_small", count_shrink)
        monkeypatch.setattr(lora_cached_numba, "expand_small", count_expand)


def _run(
    adapters: Sequence,
    counts: Sequence[int],
    kind: str,
    hidden: int,
    rank_mix: str,
    seed: int,
    dtype: torch.dtype = torch.float32,
):
    """shrink then expand over packed adapters; returns ``(a, a_ref, out, expected)``, the
    references in float32 from the same (rounded) inputs, ``expected`` from ``a`` as computed
    (so expand is checked on its own)."""
    gen = torch.Generator().manual_seed(seed)
    offsets = module_offsets(kind, hidden)
    stack = len(offsets) - 1
    ranks = RANK_MIXES[rank_mix]
    A, B, scalings = make_adapters(ranks, stack, hidden, offsets[-1], dtype, gen)
    A, B = pack_in_two_storages(A, B)
    x = torch.randn(sum(counts), hidden, generator=gen).to(dtype)
    a_ref, _, _ = reference(x, adapters, counts, A, B, scalings, offsets, max(ranks), stack)
    groups = group_tokens(adapters, counts, scalings)
    a = shrink(x, groups, A.get, stack, max(ranks))
    base = torch.randn(x.shape[0], offsets[-1], generator=gen).to(dtype)
    out = expand(a, groups, B.get, offsets, base.clone())
    assert a.dtype == out.dtype == dtype
    out_ref = expand_reference(a, adapters, counts, B, scalings, offsets)
    return a.float(), a_ref, out.float(), base.float() + out_ref


def expand_reference(
    a: torch.Tensor,
    adapters: Sequence,
    counts: Sequence[int],
    B: Dict[int, torch.Tensor],
    scalings: Dict[int, float],
    offsets: Sequence[int],
) -> torch.Tensor:
    """float32 ``a_j @ B_j.T`` per slice from the given shrink output."""
    out = torch.zeros(a.shape[0], offsets[-1])
    t = 0
    for adapter, count in zip(adapters, counts):
        rows = slice(t, t + count)
        t += count
        if adapter not in scalings:
            continue
        b = B[adapter].float()
        r = b.shape[1]
        for j in range(len(offsets) - 1):
            lo, hi = offsets[j], offsets[j + 1]
            out[rows, lo:hi] += a[rows, j * r : (j + 1) * r].float() @ b[lo:hi].T
    return out


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize(
    "pattern,kind,rank_mix",
    list(
        itertools.product(
            ["distinct", "zipf", "interleaved", "with_base"],
            ["o_proj", "qkv", "gate_up"],
            sorted(RANK_MIXES),
        )
    ),
)
def test_decode_batches_take_the_compiled_path_and_match_the_reference(
    monkeypatch, pattern, kind, rank_mix, dtype
):
    """One token per request: every adapter group is small, so the compiled loop serves them
    all, reading the packed matrices in place, in the model's dtype."""
    spy = PathSpy(monkeypatch)
    gen = torch.Generator().manual_seed(seed_of(pattern, kind, rank_mix))
    adapters = sharing(pattern, 24, gen)
    a, a_ref, out, expected = _run(
        adapters, [1] * 24, kind, 64, rank_mix, seed_of("run", pattern, kind, rank_mix), dtype
    )
    torch.testing.assert_close(a, a_ref, **DTYPE_TOL[dtype])
    torch.testing.assert_close(out, expected, **DTYPE_TOL[dtype])
    assert spy.compiled > 0


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_mixed_prefill_and_decode_groups_split_between_the_paths(monkeypatch, dtype):
    """A prefill chunk (many tokens of one adapter) goes to BLAS, the decode tokens of the other
    adapters to the compiled loop, interleaved in the batch; the result is the reference."""
    spy = PathSpy(monkeypatch)
    adapters = [0, 1, 2, 1, 3, 0, 4]
    counts = [1, 1, 40, 1, 1, 1, 20]
    a, a_ref, out, expected = _run(adapters, counts, "qkv", 64, "mixed", 5, dtype)
    torch.testing.assert_close(a, a_ref, **DTYPE_TOL[dtype])
    torch.testing.assert_close(out, expected, **DTYPE_TOL[dtype])
    # adapters 0 and 1 (2 tokens each) and 3 (1 token) are small: 3 groups, shrink and expand
    assert spy.compiled == 2 * 3


def test_batches_the_compiled_path_cannot_read_fall_back_to_torch(monkeypatch):
    """Matrices in more than two storages, or of another dtype than the activations, are
    served by the torch path, correctly."""
    spy = PathSpy(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    offsets = module_offsets("o_proj", 64)
    A, B, scalings = make_adapters((8, 16), 1, 64, offsets[-1], torch.float32, gen)
    adapters = list(range(NUM_ADAPTERS)) * 2
    x = torch.randn(len(adapters), 64, generator=gen)
    groups = group_tokens(adapters, [1] * len(adapters), scalings)
    a = shrink(x, groups, A.get, 1, 16)  # separate tensors: one storage per matrix
    a_ref, out_ref, _ = reference(x, adapters, [1] * len(adapters), A, B, scalings, offsets, 16, 1)
    torch.testing.assert_close(a, a_ref, **TOL)
    torch.testing.assert_close(expand(a, groups, B.get, offsets, None), out_ref, **TOL)
    assert spy.compiled == 0
    A16 = {i: m.to(torch.bfloat16) for i, m in A.items()}
    A16, _ = pack_in_two_storages(A16, {})
    plan = lora_cached_numba.plan_small_groups(
        x, groups.groups, groups.row_index, A16.get, scalings
    )
    assert plan is None  # float32 activations, bf16 weights
    assert (
        lora_cached_numba.plan_small_groups(
            x.bfloat16(), groups.groups, groups.row_index, A16.get, scalings
        )
        is not None
    )


def test_plans_locate_each_matrix_by_storage_and_offset():
    """A plan names, per group, which of the two storages holds its matrix and where."""
    gen = torch.Generator().manual_seed(11)
    A, B, scalings = make_adapters((8, 32), 1, 16, 16, torch.float32, gen)
    A, B = pack_in_two_storages(A, B)
    groups = group_tokens(list(range(NUM_ADAPTERS)), [1] * NUM_ADAPTERS, scalings)
    plan = lora_cached_numba.plan_small_groups(
        torch.zeros(NUM_ADAPTERS, 16), groups.groups, groups.row_index, A.get, scalings
    )
    assert plan is not None
    for g, (_, _, adapter) in enumerate(groups.groups):
        flat = plan.buffers[plan.which[g]]
        rows = plan.dims[g]
        found = flat[plan.offsets[g] : plan.offsets[g] + rows * 16].reshape(rows, 16)
        assert torch.equal(torch.from_numpy(found.copy()), A[adapter])
        assert plan.scalings[g] == pytest.approx(scalings[adapter])


def test_groups_of_many_tokens_stay_with_blas(monkeypatch):
    """A group of SMALL_GROUP_TOKENS tokens or more is a matrix product: BLAS serves it."""
    spy = PathSpy(monkeypatch)
    count = lora_cached_numba.SMALL_GROUP_TOKENS
    a, a_ref, out, expected = _run([0, 1], [count, count], "gate_up", 64, "mixed", 9)
    torch.testing.assert_close(a, a_ref, **TOL)
    torch.testing.assert_close(out, expected, **TOL)
    assert spy.compiled == 0


ALL_16_BIT_PATTERNS = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16_bit_conversions_are_exact_for_every_finite_value(dtype):
    """Widening gives torch's float32 value for every finite 16-bit pattern (fp16 denormals
    included); narrowing rounds to nearest even as torch does, across the whole float32 range
    (denormal results, overflow to infinity, ties)."""
    words = ALL_16_BIT_PATTERNS.view(dtype)
    exact = words.float()
    finite = torch.isfinite(exact)
    assert torch.equal(lora_cached_numba.widen(words)[finite], exact[finite])
    gen = torch.Generator().manual_seed(1)
    spread = torch.randn(200_000, generator=gen) * torch.exp(
        torch.randn(200_000, generator=gen) * 8
    )
    ties = exact[finite] * (1 + 2.0 ** (-8 if dtype == torch.bfloat16 else -11))
    values = torch.cat(
        [
            spread,
            exact[finite],
            ties,
            torch.tensor([0.0, -0.0, 1e-8, -1e-8, 65504.0, 65519.0, 65520.0, 3e38]),
        ]
    )
    got = lora_cached_numba.narrow(values, dtype)
    assert torch.equal(got.view(torch.int16), values.to(dtype).view(torch.int16))
