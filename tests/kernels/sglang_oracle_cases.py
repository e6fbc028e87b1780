"""Our GPU path's LoRA kernels against SGLang's own, under the Triton interpreter.

Run by ``test_triton_interpreted.py`` in a fresh Python started with ``TRITON_INTERPRET=1``.
The same adapters (ranks 8 to 128, every target module of a Llama layer: stacked qkv with GQA
slices, o, stacked gate_up, down) and the same batches go through

- SGLang's ``csgmv`` kernels (``chunked_sgmv_lora_shrink_forward`` / ``..._expand_forward``,
  its default LoRA backend on GPUs) over SGLang's padded slot buffers (A ``[slots, stack x
  max_rank, in]``, B ``[slots, out, max_rank]``, slot 0 the base model with rank 0), the batch
  described as SGLang's ``prepare_lora_batch`` describes it (tokens sorted by slot, chunked);
- SGLang's ``torch_native`` ops (``sglang.srt.lora.torch_ops.lora_ops``, its CPU backend);
- ours (:mod:`chameleon_kernels.lora_table_triton`) over the cache's placement: rank-exact
  matrices at aligned offsets of one NaN-filled buffer, found through a device location table;

and the outputs, added to the layer's base output as both backends do, must agree within the
dtype's tolerance. Base-model rows must come out exactly as they went in.

What stands in for SGLang, and why (:mod:`chameleon_kernels.gpu_check_sglang`, shared with
``make gpu-check``): on a CPU SGLang's csgmv config loader stops on ``get_device_name()`` (None
without an accelerator), so it is given a device name that has no tuned file and uses its
default block sizes, as on any GPU without a tuned config; the batch description (sorting and
chunking) is SGLang's arithmetic redone, because its own helpers allocate pinned memory, which a
CPU-only torch refuses.

bf16: the interpreter of Triton 3.8 runs ``tl.dot`` on bf16 tiles as their raw 16-bit integers
(our kernels upcast tiles under the interpreter; SGLang's do not), so csgmv cannot be an oracle
in bf16 here (:func:`test_csgmv_bf16_is_not_an_oracle_under_this_interpreter` shows it and will
fail the day the interpreter computes it, to say so); the bf16 oracle is SGLang's torch backend.
"""

import os
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import pytest
import torch
import triton  # noqa: F401  - a missing Triton must fail loudly

from chameleon_kernels import lora_table_triton as ltt
from chameleon_kernels.lora_table import DeviceLocationTable, SegmentBuffers, alignment_for

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError(
        "run this module in a process started with TRITON_INTERPRET=1 "
        "(tests/kernels/test_triton_interpreted.py does)"
    )
assert ltt.HAS_TRITON and ltt.INTERPRETED

from sglang.srt.lora.torch_ops import lora_ops  # noqa: E402

from chameleon_kernels.gpu_check_sglang import describe_batch, load_csgmv  # noqa: E402

CSGMV, _why = load_csgmv()  # on a CPU it names a device with no tuned file: default blocks
assert CSGMV is not None, _why

HIDDEN, INTER, MAX_RANK = 64, 96, 128
# module -> (input features, output slice bounds); qkv with GQA (q 64, k 32, v 32)
MODULES = {
    "qkv_proj": (HIDDEN, [0, 64, 96, 128]),
    "o_proj": (HIDDEN, [0, HIDDEN]),
    "gate_up_proj": (HIDDEN, [0, INTER, 2 * INTER]),
    "down_proj": (INTER, [0, HIDDEN]),
}
KINDS = [(m, k) for m in MODULES for k in ("A", "B")]
RANKS = {1: 8, 2: 16, 3: 32, 4: 64, 5: 128, 6: 8, 7: 32}  # adapter id (= SGLang slot) -> rank
SCALINGS = {1: 2.0, 2: 0.5, 3: 1.0, 4: 0.25, 5: 1.5, 6: 4.0, 7: 0.125}
DEVICE = torch.device("cpu")
DTYPES = [torch.float32, torch.bfloat16]
MIXES = ["distinct", "zipf", "identical"]


class Adapters:
    """Random adapters, placed twice: in SGLang's padded slot buffers and, rank-exact, in one
    buffer with a location table (as the adapter cache keeps them in KV memory)."""

    def __init__(self, dtype: torch.dtype, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        slots = max(RANKS) + 1
        self.dtype = dtype
        self.mats: Dict[Tuple[int, str], Tuple[torch.Tensor, torch.Tensor]] = {}
        self.slot_a: Dict[str, torch.Tensor] = {}
        self.slot_b: Dict[str, torch.Tensor] = {}
        for module, (fan_in, bounds) in MODULES.items():
            stack = len(bounds) - 1
            self.slot_a[module] = torch.zeros(slots, stack * MAX_RANK, fan_in, dtype=dtype)
            self.slot_b[module] = torch.zeros(slots, bounds[-1], MAX_RANK, dtype=dtype)
            for adapter, rank in RANKS.items():
                a = (torch.randn(stack * rank, fan_in, generator=gen) / fan_in**0.5).to(dtype)
                b = (torch.randn(bounds[-1], rank, generator=gen) / rank**0.5).to(dtype)
                self.mats[(adapter, module)] = (a, b)
                self.slot_a[module][adapter, : stack * rank] = a
                self.slot_b[module][adapter, :, :rank] = b
        self.align = alignment_for(dtype, 64)
        self.table = DeviceLocationTable(KINDS, 1, slots, DEVICE, self.align)
        numel = sum(a.numel() + b.numel() + 4 * self.align for a, b in self.mats.values())
        self.base = torch.full((numel + 64,), float("nan"), dtype=dtype)  # stray reads show
        cursor = 3 * self.align  # an uneven, aligned start
        for adapter, rank in RANKS.items():
            entries = {}
            for module in MODULES:
                for kind, w in zip("AB", self.mats[(adapter, module)]):
                    self.base[cursor : cursor + w.numel()] = w.reshape(-1)
                    entries[((module, kind), 0)] = (cursor, rank)
                    cursor += -(-w.numel() // self.align) * self.align + self.align
            self.table.set_adapter(adapter, entries, SCALINGS[adapter])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """fp32: 1e-4. bf16: two bf16 ulps of the output's scale (its largest magnitude): one for
    the oracle's own rounding of the shrink output, one because this interpreter converts
    float32 to bf16 by truncation where GPUs round to nearest (its error up to an ulp)."""
    if expected.dtype == torch.float32 and actual.dtype == torch.float32:
        tol = dict(atol=1e-4, rtol=1e-4)
    else:
        tol = dict(atol=2**-6 * float(expected.float().abs().max()), rtol=2**-7)
    torch.testing.assert_close(
        actual.float(), expected.float(), **tol, msg=lambda m: f"{what}: {m}"
    )


def ranks_and_scalings() -> Tuple[torch.Tensor, torch.Tensor]:
    slots = max(RANKS) + 1
    ranks = torch.tensor([RANKS.get(s, 0) for s in range(slots)], dtype=torch.int32)
    scalings = torch.tensor([SCALINGS.get(s, 0.0) for s in range(slots)], dtype=torch.float32)
    return ranks, scalings


def csgmv_batch(adapters: Sequence[int], counts: Sequence[int]) -> Any:
    """The batch as SGLang's csgmv ``prepare_lora_batch`` describes it (eager; the chunk SGLang
    picks for its size: 16 tokens for the decode batches here, 32 for the prefills)."""
    ranks, scalings = ranks_and_scalings()
    return describe_batch(CSGMV, adapters, counts, ranks, scalings)


def run_csgmv(
    x: torch.Tensor, ad: Adapters, module: str, info: Any, base: torch.Tensor
) -> torch.Tensor:
    bounds = MODULES[module][1]
    a = CSGMV.shrink(x, ad.slot_a[module], info, num_slices=len(bounds) - 1)
    offsets = torch.tensor(bounds, dtype=torch.int32)
    return CSGMV.expand(
        a,
        ad.slot_b[module],
        info,
        slice_offsets=offsets,
        max_slice_size=max(hi - lo for lo, hi in zip(bounds, bounds[1:])),
        base_output=base,
        slice_offsets_cpu=offsets,
    )


def run_torch_native(
    x: torch.Tensor,
    ad: Adapters,
    module: str,
    adapters: Sequence[int],
    counts: Sequence[int],
    base: torch.Tensor,
) -> torch.Tensor:
    """SGLang's torch backend (eager): one segment per run of requests with the same slot."""
    weights, seg_lens = [], []
    for adapter, count in zip(adapters, counts):
        if weights and weights[-1] == adapter:
            seg_lens[-1] += count
        else:
            weights.append(adapter)
            seg_lens.append(count)
    ranks, scalings = ranks_and_scalings()
    bounds = MODULES[module][1]
    a = lora_ops.sgemm_lora_a_fwd(
        x,
        ad.slot_a[module],
        torch.tensor(weights),
        torch.tensor(seg_lens),
        ranks,
        scalings,
        num_slices=len(bounds) - 1,
    )
    return lora_ops.sgemm_lora_b_fwd(
        a,
        ad.slot_b[module],
        torch.tensor(weights),
        torch.tensor(seg_lens),
        ranks,
        torch.tensor(bounds),
        base_output=base,
    )


def run_ours(
    x: torch.Tensor,
    ad: Adapters,
    module: str,
    adapters: Sequence[int],
    counts: Sequence[int],
    base: torch.Tensor,
    graph: bool,
) -> torch.Tensor:
    bounds = MODULES[module][1]
    plan = SegmentBuffers(len(adapters), sum(counts), DEVICE).fill(adapters, counts, graph=graph)
    kinds = (module, "A"), (module, "B")
    a = ltt.table_shrink(x, plan, ad.table, kinds[0], 0, ad.base, len(bounds) - 1, MAX_RANK)
    return ltt.table_expand(a, plan, ad.table, kinds[1], 0, ad.base, bounds, base, MAX_RANK)


def reference(
    x: torch.Tensor, ad: Adapters, module: str, per_token: Sequence[int], base: torch.Tensor
) -> torch.Tensor:
    """float32, token by token."""
    bounds = MODULES[module][1]
    out = base.float().clone()
    for t, adapter in enumerate(per_token):
        if adapter == 0:
            continue
        a_w, b_w = (m.float() for m in ad.mats[(adapter, module)])
        r = RANKS[adapter]
        a = SCALINGS[adapter] * (x[t].float() @ a_w.T)
        for i in range(len(bounds) - 1):
            lo, hi = bounds[i], bounds[i + 1]
            out[t, lo:hi] += a[i * r : (i + 1) * r] @ b_w[lo:hi].T
    return out


def batch(mix: str, phase: str, seed: int) -> Tuple[List[int], List[int]]:
    """Adapter (0: base model) and token count of each request. decode: one token each;
    prefill: 1 to 32 tokens each. distinct: every adapter once; zipf: drawn with Zipf
    weights; identical: all of one adapter (rank 128); base-model requests in every mix."""
    rng = np.random.default_rng(seed)
    ids = sorted(RANKS)
    if mix == "distinct":
        adapters = [int(a) for a in rng.permutation(ids)] + [0, 0]
    elif mix == "zipf":
        weights = 1.0 / np.arange(1, len(ids) + 1) ** 1.1
        adapters = [int(a) for a in rng.choice(ids, size=14, p=weights / weights.sum())] + [0]
    else:
        adapters = [5] * 10 + [0]
    adapters = [int(a) for a in rng.permutation(adapters)]
    if phase == "decode":
        counts = [1] * len(adapters)
    else:
        counts = [int(c) for c in rng.integers(1, 33, size=len(adapters))]
    return adapters, counts


def inputs(module: str, tokens: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    fan_in, bounds = MODULES[module]
    x = torch.randn(tokens, fan_in, generator=gen).to(dtype)
    base = torch.randn(tokens, bounds[-1], generator=gen).to(dtype)
    return x, base


@pytest.fixture(scope="module", params=DTYPES, ids=["fp32", "bf16"])
def adapters(request) -> Adapters:
    return Adapters(request.param)


@pytest.mark.parametrize("phase", ["decode", "prefill"])
@pytest.mark.parametrize("mix", MIXES)
def test_ours_equal_sglangs_kernels_on_every_module(adapters: Adapters, mix: str, phase: str):
    """Every module, the batch's own grid and (decode) a graph-sized grid: ours equal
    SGLang's torch backend, and in fp32 SGLang's csgmv kernels (the chunk SGLang picks), and
    all of them the float32 reference; base-model rows stay untouched."""
    dtype = adapters.dtype
    seed = 2 * MIXES.index(mix) + (phase == "prefill")
    ids, counts = batch(mix, phase, seed)
    per_token = [a for a, c in zip(ids, counts) for _ in range(c)]
    untouched = [t for t, a in enumerate(per_token) if a == 0]
    for module in MODULES:
        x, base = inputs(module, len(per_token), dtype, seed)
        expected = reference(x, adapters, module, per_token, base)
        native = run_torch_native(x, adapters, module, ids, counts, base.clone())
        assert_close(native.to(dtype), expected.to(dtype), f"{module}: torch_native")
        oracles = {"torch_native": native}
        if dtype == torch.float32:
            csgmv = run_csgmv(x, adapters, module, csgmv_batch(ids, counts), base.clone())
            assert_close(csgmv, expected, f"{module}: csgmv")
            oracles["csgmv"] = csgmv
        for graph in (False, True) if phase == "decode" else (False,):
            ours = run_ours(x, adapters, module, ids, counts, base.clone(), graph)
            assert torch.equal(ours[untouched], base[untouched]), (module, graph)
            for name, oracle in oracles.items():
                assert_close(ours, oracle, f"{module} vs {name} (graph grid: {graph})")


def test_csgmv_bf16_is_not_an_oracle_under_this_interpreter():
    """Why bf16 compares with SGLang's torch backend, not csgmv: under this Triton's
    interpreter csgmv's bf16 output is far off (``tl.dot`` on raw bits). When this fails, the
    interpreter computes bf16 dots and csgmv should join the bf16 oracles."""
    ad = Adapters(torch.bfloat16)
    ids, counts = [1, 5, 0], [3, 2, 1]
    per_token = [a for a, c in zip(ids, counts) for _ in range(c)]
    x, base = inputs("o_proj", len(per_token), torch.bfloat16, 1)
    expected = reference(x, ad, "o_proj", per_token, base)
    csgmv = run_csgmv(x, ad, "o_proj", csgmv_batch(ids, counts), base.clone())
    with pytest.raises(AssertionError):
        assert_close(csgmv, expected.to(torch.bfloat16), "csgmv bf16")
