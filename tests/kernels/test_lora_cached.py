"""Rank-exact LoRA shrink/expand over cached adapters (chameleon_kernels.lora_cached), checked
Punica-style against a float32 per-request reference."""

from __future__ import annotations

import itertools
import zlib
from typing import Dict, List, Optional, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chameleon_kernels.lora_cached import AdapterGroups, expand, group_tokens, shrink

TOLERANCE = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
}
RANK_MIXES = {"r8": (8,), "mixed": (8, 16, 32, 64, 128)}
NUM_ADAPTERS = 6
BASE = None  # a request of the base model
NOT_SCALED = 99  # an adapter id with no scaling entry: treated as the base model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These matmuls are tiny: one intra-op thread avoids spinning threads on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def module_offsets(kind: str, hidden: int) -> List[int]:
    """Output slice offsets: o_proj (1 slice), qkv with GQA (3 unequal), gate_up (2 equal)."""
    if kind == "o_proj":
        return [0, hidden]
    if kind == "qkv":
        return [0, hidden, hidden + hidden // 4, hidden + hidden // 2]
    if kind == "gate_up":
        return [0, 2 * hidden, 4 * hidden]
    raise ValueError(kind)


# -- batches ------------------------------------------------------------------------------------


def sharing(pattern: str, num_requests: int, gen: torch.Generator) -> List[Optional[int]]:
    """Adapter id per request for a sharing pattern over adapters 0..NUM_ADAPTERS-1."""

    def draw(probs):
        return torch.multinomial(
            torch.tensor(probs, dtype=torch.float64), num_requests, replacement=True, generator=gen
        ).tolist()

    if pattern == "distinct":
        return [i % NUM_ADAPTERS for i in range(num_requests)]
    if pattern == "uniform":
        return draw([1.0] * NUM_ADAPTERS)
    if pattern == "zipf":
        return draw([1.0 / (k + 1) ** 1.2 for k in range(NUM_ADAPTERS)])
    if pattern == "identical":
        return [3] * num_requests
    if pattern == "skewed":
        return draw([0.85] + [0.15 / (NUM_ADAPTERS - 1)] * (NUM_ADAPTERS - 1))
    if pattern == "interleaved":
        return [(1, 4)[i % 2] for i in range(num_requests)]
    if pattern == "with_base":
        adapters = draw([1.0] * NUM_ADAPTERS)
        return [
            BASE if i % 3 == 0 else NOT_SCALED if i % 5 == 4 else a for i, a in enumerate(adapters)
        ]
    raise ValueError(pattern)


def tokens_per_request(mode: str, num_requests: int, gen: torch.Generator) -> List[int]:
    if mode == "decode":
        return [1] * num_requests
    return torch.randint(1, 24, (num_requests,), generator=gen).tolist()


def make_adapters(
    ranks: Sequence[int],
    stack: int,
    in_dim: int,
    out_dim: int,
    dtype: torch.dtype,
    gen: torch.Generator,
):
    """A_i: [stack * r_i, in], B_i: [out, r_i], rank r_i cycling through ``ranks``; scalings."""
    A, B, scalings = {}, {}, {}
    for i in range(NUM_ADAPTERS):
        r = ranks[i % len(ranks)]
        A[i] = (torch.randn(stack * r, in_dim, generator=gen) / in_dim**0.5).to(dtype)
        B[i] = (torch.randn(out_dim, r, generator=gen) / r**0.5).to(dtype)
        scalings[i] = 0.5 + 1.5 * float(torch.rand((), generator=gen))
    return A, B, scalings


def reference(x, adapters, counts, A, B, scalings, offsets, max_rank, stack):
    """float32 Punica reference: per request, a = s * x @ A.T and each slice's a_j @ B_j.T."""
    num_tokens = sum(counts)
    a_ref = torch.zeros(num_tokens, stack * max_rank)
    out_ref = torch.zeros(num_tokens, offsets[-1])
    live = torch.zeros(num_tokens, stack * max_rank, dtype=torch.bool)
    t = 0
    for adapter, count in zip(adapters, counts):
        rows = slice(t, t + count)
        t += count
        if adapter not in scalings or A.get(adapter) is None:
            continue
        a_w, b_w = A[adapter].float(), B[adapter].float()
        r = b_w.shape[1]
        a = scalings[adapter] * (x[rows].float() @ a_w.T)
        a_ref[rows, : stack * r] = a
        live[rows, : stack * r] = True
        for j in range(len(offsets) - 1):
            lo, hi = offsets[j], offsets[j + 1]
            out_ref[rows, lo:hi] += a[:, j * r : (j + 1) * r] @ b_w[lo:hi].T
    return a_ref, out_ref, live


def token_adapters(adapters, counts) -> List[Optional[int]]:
    return [a for a, c in zip(adapters, counts) for _ in range(c)]


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


# -- shrink + expand against the reference -----------------------------------------------------

PATTERNS = ["distinct", "uniform", "zipf", "identical", "skewed", "interleaved", "with_base"]
MODULES = [("o_proj", 64), ("qkv", 64), ("gate_up", 64), ("o_proj", 256), ("qkv", 256)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cases():
    """Every dtype x rank mix x module x sharing pattern for a decode and a prefill batch; the
    batch size also varies (1, 3, 32 requests) on the small qkv module."""
    for d, rank_mix, (kind, hidden), pattern in itertools.product(
        DTYPES, sorted(RANK_MIXES), MODULES, PATTERNS
    ):
        for mode, n in (("decode", 16), ("prefill", 5)):
            yield pytest.param(
                DTYPES[d],
                rank_mix,
                kind,
                hidden,
                mode,
                n,
                pattern,
                id=f"{d}-{rank_mix}-{kind}{hidden}-{mode}{n}-{pattern}",
            )
    for d, rank_mix, pattern in itertools.product(DTYPES, sorted(RANK_MIXES), PATTERNS):
        for mode, n in (("decode", 1), ("decode", 32), ("prefill", 1), ("prefill", 3)):
            yield pytest.param(
                DTYPES[d],
                rank_mix,
                "qkv",
                64,
                mode,
                n,
                pattern,
                id=f"{d}-{rank_mix}-qkv64-{mode}{n}-{pattern}",
            )


@pytest.mark.parametrize("dtype,rank_mix,kind,hidden,mode,num_requests,pattern", list(_cases()))
def test_shrink_and_expand_match_the_reference(
    dtype, rank_mix, kind, hidden, mode, num_requests, pattern
):
    """shrink gives s*x@A.T rank-exact (zeros elsewhere); expand adds each slice's a_j@B_j.T
    into base_output in place, only for tokens of adapters with a scaling."""
    gen = torch.Generator().manual_seed(
        seed_of(dtype, rank_mix, kind, hidden, mode, num_requests, pattern)
    )
    offsets = module_offsets(kind, hidden)
    stack = len(offsets) - 1
    ranks = RANK_MIXES[rank_mix]
    max_rank = max(ranks)
    A, B, scalings = make_adapters(ranks, stack, hidden, offsets[-1], dtype, gen)
    adapters = sharing(pattern, num_requests, gen)
    counts = tokens_per_request(mode, num_requests, gen)
    x = torch.randn(sum(counts), hidden, generator=gen).to(dtype)
    a_ref, out_ref, live = reference(x, adapters, counts, A, B, scalings, offsets, max_rank, stack)

    groups = group_tokens(adapters, counts, scalings)
    a = shrink(x, groups, A.get, stack, max_rank)
    assert a.shape == (x.shape[0], stack * max_rank) and a.dtype == dtype
    torch.testing.assert_close(a.float(), a_ref, **TOLERANCE[dtype])
    assert not a[~live].any()  # columns past stack * r and tokens without weights stay zero

    base = torch.randn(x.shape[0], offsets[-1], generator=gen).to(dtype)
    base_before = base.clone()
    out = expand(a, groups, B.get, offsets, base)
    assert out is base
    torch.testing.assert_close(out.float(), base_before.float() + out_ref, **TOLERANCE[dtype])
    untouched = [t for t, ad in enumerate(token_adapters(adapters, counts)) if ad not in scalings]
    assert torch.equal(out[untouched], base_before[untouched])

    fresh = expand(a, groups, B.get, offsets, None)
    assert fresh.shape == (x.shape[0], offsets[-1]) and fresh.dtype == dtype
    torch.testing.assert_close(fresh.float(), out_ref, **TOLERANCE[dtype])
    assert bool((fresh[untouched] == 0).all())


@pytest.mark.parametrize("kind", ["o_proj", "qkv", "gate_up"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_adapter_without_weights_for_the_module_adds_nothing(dtype, kind):
    """Tokens of an adapter whose weights_of is None (module not targeted) get zeros from
    shrink and nothing from expand; the other adapters are unaffected."""
    gen = torch.Generator().manual_seed(seed_of("untargeted", dtype, kind))
    hidden = 64
    offsets = module_offsets(kind, hidden)
    stack = len(offsets) - 1
    A, B, scalings = make_adapters(RANK_MIXES["mixed"], stack, hidden, offsets[-1], dtype, gen)
    untargeted = 2
    A_of = lambda i: None if i == untargeted else A[i]  # noqa: E731
    B_of = lambda i: None if i == untargeted else B[i]  # noqa: E731
    adapters = [untargeted, 0, untargeted, 1, BASE, untargeted, 0]
    counts = [3, 2, 1, 4, 2, 1, 1]
    x = torch.randn(sum(counts), hidden, generator=gen).to(dtype)
    A_ref = {i: A_of(i) for i in A}
    a_ref, out_ref, live = reference(x, adapters, counts, A_ref, B, scalings, offsets, 128, stack)
    groups = group_tokens(adapters, counts, scalings)
    assert untargeted in {g[2] for g in groups.groups}
    a = shrink(x, groups, A_of, stack, 128)
    torch.testing.assert_close(a.float(), a_ref, **TOLERANCE[dtype])
    silent = [
        t for t, ad in enumerate(token_adapters(adapters, counts)) if ad in (untargeted, BASE)
    ]
    assert bool((a[silent] == 0).all())
    base = torch.randn(x.shape[0], offsets[-1], generator=gen).to(dtype)
    before = base.clone()
    out = expand(a, groups, B_of, offsets, base)
    torch.testing.assert_close(out.float(), before.float() + out_ref, **TOLERANCE[dtype])
    assert torch.equal(out[silent], before[silent])


def test_empty_and_all_base_batches_cost_nothing():
    """A batch with no adapter tokens: no groups, zero shrink output, base_output unchanged."""
    for adapters, counts in (([], []), ([BASE, NOT_SCALED, BASE], [2, 3, 1])):
        groups = group_tokens(adapters, counts, {0: 1.0})
        assert groups.groups == () and groups.num_tokens == sum(counts)
        x = torch.randn(sum(counts), 16)
        boom = lambda i: pytest.fail("weights_of called without tokens")  # noqa: E731
        a = shrink(x, groups, boom, 2, 8)
        assert a.shape == (sum(counts), 16) and not a.any()
        base = torch.randn(sum(counts), 24)
        before = base.clone()
        assert torch.equal(expand(a, groups, boom, [0, 8, 24], base), before)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.lists(
        st.tuples(st.sampled_from([BASE, NOT_SCALED, 0, 1, 2, 3]), st.integers(0, 5)), max_size=12
    ),
    stack=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_random_batches_match_the_reference(batch, stack, seed):
    """Any batch (zero-token requests, repeats, base requests) matches the float32 reference."""
    gen = torch.Generator().manual_seed(seed)
    adapters = [a for a, _ in batch]
    counts = [c for _, c in batch]
    hidden = 32
    offsets = [0] + torch.cumsum(torch.randint(4, 40, (stack,), generator=gen), 0).tolist()
    A, B, scalings = make_adapters((4, 8, 16), stack, hidden, offsets[-1], torch.float32, gen)
    x = torch.randn(sum(counts), hidden, generator=gen)
    a_ref, out_ref, live = reference(x, adapters, counts, A, B, scalings, offsets, 16, stack)
    groups = group_tokens(adapters, counts, scalings)
    a = shrink(x, groups, A.get, stack, 16)
    torch.testing.assert_close(a, a_ref, **TOLERANCE[torch.float32])
    torch.testing.assert_close(
        expand(a, groups, B.get, offsets, None), out_ref, **TOLERANCE[torch.float32]
    )


# -- group_tokens ------------------------------------------------------------------------------


def group_members(groups: AdapterGroups) -> Dict[int, List[int]]:
    """Token indices (batch order) of each group, read through ``rows``."""
    members: Dict[int, List[int]] = {}
    for start, stop, adapter in groups.groups:
        index, span = groups.rows(start, stop)
        tokens = list(range(span.start, span.stop)) if index is None else index.tolist()
        assert len(tokens) == stop - start
        members.setdefault(adapter, []).extend(tokens)
    return members


requests_strategy = st.lists(
    st.tuples(st.one_of(st.none(), st.integers(0, 5)), st.integers(0, 6)), max_size=14
)


@settings(max_examples=200, deadline=None)
@given(requests=requests_strategy, scaled=st.sets(st.integers(0, 5)))
def test_group_tokens_partitions_the_scaled_tokens(requests, scaled):
    """Each token of an adapter with a scaling is in exactly one group (its adapter's, in
    batch order); tokens of other adapters are in none; one non-empty group per adapter."""
    adapters = [a for a, _ in requests]
    counts = [c for _, c in requests]
    scalings = {i: float(i + 1) for i in scaled}
    groups = group_tokens(adapters, counts, scalings)
    per_token = token_adapters(adapters, counts)
    assert groups.num_tokens == len(per_token)
    assert groups.scalings == scalings
    ids = [adapter for _, _, adapter in groups.groups]
    assert len(ids) == len(set(ids))
    assert all(stop > start for start, stop, _ in groups.groups)
    members = group_members(groups)
    expected = {}
    for t, adapter in enumerate(per_token):
        if adapter in scalings:
            expected.setdefault(adapter, []).append(t)
    assert members == expected
    spans = sorted((start, stop) for start, stop, _ in groups.groups)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    if groups.order is not None:
        assert sorted(groups.order.tolist()) == sorted(t for ts in expected.values() for t in ts)
        assert spans[0][0] == 0 and spans[-1][1] == groups.order.numel()
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


@settings(max_examples=200, deadline=None)
@given(requests=requests_strategy, scaled=st.sets(st.integers(0, 5)))
def test_group_tokens_permutes_only_when_an_adapter_is_split(requests, scaled):
    """order is None exactly when every scaled adapter's tokens are contiguous in the batch."""
    adapters = [a for a, _ in requests]
    counts = [c for _, c in requests]
    scalings = {i: 1.0 for i in scaled}
    per_token = token_adapters(adapters, counts)
    contiguous = True
    for adapter in scalings:
        positions = [t for t, a in enumerate(per_token) if a == adapter]
        if positions and positions[-1] - positions[0] + 1 != len(positions):
            contiguous = False
    groups = group_tokens(adapters, counts, scalings)
    assert (groups.order is None) == contiguous


@pytest.mark.parametrize(
    "adapters,counts,permuted",
    [
        ([1, 2, 1], [2, 1, 3], True),
        ([1, BASE, 1], [2, 1, 3], True),
        ([2, 1, 1, 2], [1, 1, 1, 1], True),
        ([1, 1, BASE, 2], [2, 0, 4, 1], False),
        ([1, 2, 2], [2, 0, 3], False),
        ([1, 2, 1], [2, 0, 3], False),
    ],
)
def test_interleaved_adapters_force_a_permutation(adapters, counts, permuted):
    """An adapter whose tokens are split by another adapter's or the base model's is gathered
    through ``order``; a zero-token request between two of its requests splits nothing."""
    scalings = {1: 0.5, 2: 2.0}
    groups = group_tokens(adapters, counts, scalings)
    assert (groups.order is not None) == permuted
    per_token = token_adapters(adapters, counts)
    assert group_members(groups) == {
        i: [t for t, a in enumerate(per_token) if a == i] for i in scalings if i in per_token
    }
