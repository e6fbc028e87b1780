"""LoRA shrink/expand over adapters stored rank-exact where the adapter cache keeps them (torch).

Contract shared by every implementation of these ops:

- a batch's tokens are described by :class:`AdapterGroups`: per adapter id, the tokens that use
  it (tokens of the base model, or of an adapter without weights for a module, cost nothing);
- ``weights_of(adapter_id)`` returns that adapter's matrix for the module being run, read in
  place (A: ``[stack * r, in]``, B: ``[out, r]``, each adapter at its own rank ``r``), or None;
- :func:`shrink` returns ``[tokens, stack * max_rank]`` holding, for each token, its adapter's
  ``scaling * x @ A.T`` in the first ``stack * r`` columns (slice ``i`` at ``[i*r, (i+1)*r)``)
  and zeros elsewhere; :func:`expand` adds each slice's ``a_i @ B_i.T`` into the output columns
  ``[offsets[i], offsets[i+1])``.

This module is the CPU path (also the fallback on any device). Groups of few tokens (decode) go to
the compiled loop of :mod:`chameleon_kernels.lora_cached_numba` when it can take them (CPU, float32,
bf16 or fp16): one call for all of them, no per-adapter Python work. The other groups (prefill) are
brought into adapter order once per call, then one ``addmm`` per adapter (shrink) and per adapter
and slice (expand) writes straight into the output.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from chameleon_kernels import lora_cached_numba
from chameleon_kernels.lora_locations import SmallBatch

WeightsOf = Callable[[int], Optional[torch.Tensor]]
SmallPlanOf = Callable[[SmallBatch], lora_cached_numba.SmallGroupPlan]


@dataclasses.dataclass(frozen=True)
class AdapterGroups:
    """Tokens of a batch grouped by adapter.

    ``groups`` holds ``(start, stop, adapter_id)`` over the token order ``order`` (None: the
    batch's own order, groups contiguous); only adapters with a scaling entry appear.
    """

    num_tokens: int
    order: Optional[torch.Tensor]
    groups: Tuple[Tuple[int, int, int], ...]
    scalings: Dict[int, float]

    def rows(self, start: int, stop: int) -> Tuple[Optional[torch.Tensor], slice]:
        """Index tensor (or None) and slice of the tokens ``[start, stop)`` of the order."""
        if self.order is None:
            return None, slice(start, stop)
        return self.order[start:stop], slice(start, stop)

    @functools.cached_property
    def row_index(self) -> np.ndarray:
        """The batch row of every position of the order (int64)."""
        if self.order is None:
            return np.arange(self.num_tokens, dtype=np.int64)
        return self.order.numpy().astype(np.int64, copy=False)

    @functools.cached_property
    def by_size(self) -> Tuple[Tuple[Tuple[int, int, int], ...], AdapterGroups]:
        """``(small groups, the rest as AdapterGroups)``: groups of fewer than
        ``SMALL_GROUP_TOKENS`` tokens, and the others with an order of their own."""
        limit = lora_cached_numba.SMALL_GROUP_TOKENS
        small = tuple(g for g in self.groups if g[1] - g[0] < limit)
        large = [g for g in self.groups if g[1] - g[0] >= limit]
        return small, self.restricted(large)

    @functools.cached_property
    def small_batch(self) -> SmallBatch:
        """The small groups (see :attr:`by_size`) as the compiled kernels' arrays."""
        return SmallBatch.of(self.by_size[0], self.row_index, self.scalings)

    def restricted(self, groups: Sequence[Tuple[int, int, int]]) -> AdapterGroups:
        """The same batch with only ``groups`` (which must be groups of this one)."""
        if self.order is None or len(groups) == len(self.groups):
            return AdapterGroups(self.num_tokens, self.order, tuple(groups), self.scalings)
        pieces, renumbered, cursor = [], [], 0
        for start, stop, adapter in groups:
            pieces.append(self.order[start:stop])
            renumbered.append((cursor, cursor + stop - start, adapter))
            cursor += stop - start
        order = torch.cat(pieces) if pieces else self.order[:0]
        return AdapterGroups(self.num_tokens, order, tuple(renumbered), self.scalings)


def group_tokens(
    adapter_per_request: Sequence[int],
    tokens_per_request: Sequence[int],
    scalings: Dict[int, float],
) -> AdapterGroups:
    """Group the tokens of requests (in batch order) by adapter; adapters not in ``scalings``
    (the base model) are left out. Stable: tokens keep their order within a group."""
    runs: List[Tuple[int, int, int]] = []
    position = 0
    for adapter, count in zip(adapter_per_request, tokens_per_request):
        count = int(count)
        if count and adapter in scalings:
            if runs and runs[-1][2] == adapter and runs[-1][1] == position:
                runs[-1] = (runs[-1][0], position + count, adapter)
            else:
                runs.append((position, position + count, adapter))
        position += count
    adapters = [run[2] for run in runs]
    if len(set(adapters)) == len(adapters):
        return AdapterGroups(position, None, tuple(runs), dict(scalings))
    by_adapter: Dict[int, List[Tuple[int, int]]] = {}
    for start, stop, adapter in runs:
        by_adapter.setdefault(adapter, []).append((start, stop))
    pieces: List[torch.Tensor] = []
    groups: List[Tuple[int, int, int]] = []
    cursor = 0
    for adapter in sorted(by_adapter):
        size = 0
        for start, stop in by_adapter[adapter]:
            pieces.append(torch.arange(start, stop, dtype=torch.int64))
            size += stop - start
        groups.append((cursor, cursor + size, adapter))
        cursor += size
    return AdapterGroups(position, torch.cat(pieces), tuple(groups), dict(scalings))


def _small_plan(
    t: torch.Tensor,
    small: Sequence[Tuple[int, int, int]],
    groups: AdapterGroups,
    weights_of: WeightsOf,
    small_plan: Optional[SmallPlanOf],
    for_expand: bool,
) -> Optional[lora_cached_numba.SmallGroupPlan]:
    """The compiled path's plan for the small groups, or None (the torch path serves them)."""
    if not small or not lora_cached_numba.accepts(t):
        return None
    if small_plan is not None:
        return small_plan(groups.small_batch)
    return lora_cached_numba.plan_small_groups(
        t, small, groups.row_index, weights_of, groups.scalings, for_expand=for_expand
    )


def shrink(
    x: torch.Tensor,
    groups: AdapterGroups,
    weights_of: WeightsOf,
    stack: int,
    max_rank: int,
    small_plan: Optional[SmallPlanOf] = None,
) -> torch.Tensor:
    """``scaling * x @ A.T`` per token, rank-exact columns first (see the module docstring).

    Small groups: the compiled loop (``small_plan``, when given, builds its plan from the
    batch's :class:`~chameleon_kernels.lora_locations.SmallBatch`, e.g. through a
    ``MatrixLocations`` table; else the weights are located one by one). Other groups: one
    ``addmm`` per adapter, written straight into its rows of the output (tokens gathered into
    adapter order first when the batch interleaves adapters).
    """
    width = stack * max_rank
    out = torch.zeros((x.shape[0], width), dtype=x.dtype, device=x.device)
    if not groups.groups:
        return out
    small, large = groups.by_size
    if small:
        plan = _small_plan(x, small, groups, weights_of, small_plan, for_expand=False)
        if plan is not None:
            lora_cached_numba.shrink_small(x, out, plan)
            groups = large
    _shrink_blas(x, out, groups, weights_of)
    return out


def _shrink_blas(
    x: torch.Tensor, out: torch.Tensor, groups: AdapterGroups, weights_of: WeightsOf
) -> None:
    if not groups.groups:
        return
    width = out.shape[1]
    order = groups.order
    src = x if order is None else x.index_select(0, order)
    dst = (
        out if order is None else torch.zeros((src.shape[0], width), dtype=x.dtype, device=x.device)
    )
    scalings = groups.scalings
    for start, stop, adapter in groups.groups:
        a_weight = weights_of(adapter)
        if a_weight is None:
            continue
        view = dst[start:stop, : a_weight.shape[0]]
        torch.addmm(view, src[start:stop], a_weight.t(), beta=0, alpha=scalings[adapter], out=view)
    if order is not None:
        out.index_copy_(0, order, dst)


def expand(
    a: torch.Tensor,
    groups: AdapterGroups,
    weights_of: WeightsOf,
    offsets: Sequence[int],
    base_output: Optional[torch.Tensor],
    small_plan: Optional[SmallPlanOf] = None,
) -> torch.Tensor:
    """Add ``a_i @ B_i.T`` of every slice into ``base_output`` (a new zero tensor if None).

    Small groups as in :func:`shrink`; other groups one in-place ``addmm_`` per adapter and
    slice, into the output's rows and columns.
    """
    total = int(offsets[-1])
    out = (
        base_output
        if base_output is not None
        else torch.zeros((a.shape[0], total), dtype=a.dtype, device=a.device)
    )
    if not groups.groups:
        return out
    small, large = groups.by_size
    if small and out.is_contiguous():
        plan = _small_plan(a, small, groups, weights_of, small_plan, for_expand=True)
        if plan is not None:
            bounds = np.asarray([int(v) for v in offsets], dtype=np.int64)
            lora_cached_numba.expand_small(a, out, plan, bounds)
            groups = large
    _expand_blas(a, out, groups, weights_of, offsets)
    return out


def _expand_blas(
    a: torch.Tensor,
    out: torch.Tensor,
    groups: AdapterGroups,
    weights_of: WeightsOf,
    offsets: Sequence[int],
) -> None:
    if not groups.groups:
        return
    order = groups.order
    src = a if order is None else a.index_select(0, order)
    dst = (
        out
        if order is None
        else torch.zeros((src.shape[0], out.shape[1]), dtype=out.dtype, device=out.device)
    )
    bounds = [(int(offsets[i]), int(offsets[i + 1])) for i in range(len(offsets) - 1)]
    for start, stop, adapter in groups.groups:
        b_weight = weights_of(adapter)
        if b_weight is None:
            continue
        rank = b_weight.shape[1]
        rows = src[start:stop]
        target = dst[start:stop]
        for i, (lo, hi) in enumerate(bounds):
            target[:, lo:hi].addmm_(rows[:, i * rank : (i + 1) * rank], b_weight[lo:hi].t())
    if order is not None:  # rows are distinct: gather, add, put back (no scatter-add)
        out.index_copy_(0, order, out.index_select(0, order).add_(dst))
