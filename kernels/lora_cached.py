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

This module is the reference CPU path: one matmul pair per adapter present in the batch.
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
    """``scaling * x @ A.T`` per token, rank-exact columns first (see the module docstring)."""
    out = torch.zeros((x.shape[0], stack * max_rank), dtype=x.dtype, device=x.device)
    for start, stop, adapter in groups.groups:
        a_weight = weights_of(adapter)
        if a_weight is None:
            continue
        index, span = groups.rows(start, stop)
        rows = x[span] if index is None else x.index_select(0, index)
        width = a_weight.shape[0]
        result = torch.matmul(rows, a_weight.t())
        result.mul_(groups.scalings[adapter])
        if index is None:
            out[span, :width] = result
        else:
            out[index, :width] = result
    return out


def expand(a: torch.Tensor, groups: AdapterGroups, weights_of: WeightsOf,
           offsets: Sequence[int], base_output: Optional[torch.Tensor]) -> torch.Tensor:
    """Add ``a_i @ B_i.T`` of every slice into ``base_output`` (a new zero tensor if None)."""
    out = base_output if base_output is not None else torch.zeros(
        (a.shape[0], int(offsets[-1])), dtype=a.dtype, device=a.device)
    num_slices = len(offsets) - 1
    for start, stop, adapter in groups.groups:
        b_weight = weights_of(adapter)
        if b_weight is None:
            continue
        rank = b_weight.shape[1]
        index, span = groups.rows(start, stop)
        rows = a[span] if index is None else a.index_select(0, index)
        if num_slices == 1:
            delta = torch.matmul(rows[:, :rank], b_weight.t())
        else:
            delta = torch.empty((rows.shape[0], b_weight.shape[0]), dtype=a.dtype,
                                device=a.device)
            for i in range(num_slices):
                lo, hi = int(offsets[i]), int(offsets[i + 1])
                torch.matmul(rows[:, i * rank:(i + 1) * rank], b_weight[lo:hi].t(),
                             out=delta[:, lo:hi])
        if index is None:
            out[span, : delta.shape[1]] += delta
        else:
            out.index_add_(0, index, delta)
    return out
