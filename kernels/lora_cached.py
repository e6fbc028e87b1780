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

This module is the CPU path (also the fallback on any device): tokens are brought into adapter
order once per call, then one ``addmm`` per adapter (shrink) and per adapter and slice (expand)
writes straight into the output, so the Python loop does one cheap call per adapter present.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

WeightsOf = Callable[[int], Optional[torch.Tensor]]


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


def group_tokens(adapter_per_request: Sequence[int], tokens_per_request: Sequence[int],
                 scalings: Dict[int, float]) -> AdapterGroups:
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


def shrink(x: torch.Tensor, groups: AdapterGroups, weights_of: WeightsOf, stack: int,
           max_rank: int) -> torch.Tensor:
    """``scaling * x @ A.T`` per token, rank-exact columns first (see the module docstring).

    One ``addmm`` per adapter present, written straight into its rows of the output (tokens
    gathered into adapter order first when the batch interleaves adapters).
    """
    width = stack * max_rank
    out = torch.zeros((x.shape[0], width), dtype=x.dtype, device=x.device)
    if not groups.groups:
        return out
    order = groups.order
    src = x if order is None else x.index_select(0, order)
    dst = out if order is None else torch.zeros((src.shape[0], width), dtype=x.dtype,
                                                 device=x.device)
    scalings = groups.scalings
    for start, stop, adapter in groups.groups:
        a_weight = weights_of(adapter)
        if a_weight is None:
            continue
        view = dst[start:stop, : a_weight.shape[0]]
        torch.addmm(view, src[start:stop], a_weight.t(), beta=0, alpha=scalings[adapter],
                    out=view)
    if order is not None:
        out.index_copy_(0, order, dst)
    return out


def expand(a: torch.Tensor, groups: AdapterGroups, weights_of: WeightsOf,
           offsets: Sequence[int], base_output: Optional[torch.Tensor]) -> torch.Tensor:
    """Add ``a_i @ B_i.T`` of every slice into ``base_output`` (a new zero tensor if None).

    One in-place ``addmm_`` per adapter and slice, into the output's rows and columns.
    """
    total = int(offsets[-1])
    out = base_output if base_output is not None else torch.zeros(
        (a.shape[0], total), dtype=a.dtype, device=a.device)
    if not groups.groups:
        return out
    order = groups.order
    src = a if order is None else a.index_select(0, order)
    dst = out if order is None else torch.zeros((src.shape[0], out.shape[1]), dtype=out.dtype,
                                                 device=out.device)
    bounds = [(int(offsets[i]), int(offsets[i + 1])) for i in range(len(offsets) - 1)]
    for start, stop, adapter in groups.groups:
        b_weight = weights_of(adapter)
        if b_weight is None:
            continue
        rank = b_weight.shape[1]
        rows = src[start:stop]
        target = dst[start:stop]
        for i, (lo, hi) in enumerate(bounds):
            target[:, lo:hi].addmm_(rows[:, i * rank:(i + 1) * rank], b_weight[lo:hi].t())
    if order is not None:
        out.index_add_(0, order, dst)
    return out
