"""The adapter cache's GPU side: the device location table of resident adapters and
asynchronous host-to-cache copies.

Used by :class:`~chameleon_sglang.integration.lora_pool.ChameleonLoRAPool` when its KV buffers are
on a CUDA device (and Triton is there for the table kernels):

- :func:`table_entries` turns an adapter's layout in its run of KV slots into the table's
  ``(offset, rank)`` per ``((module, kind), layer)``, offsets against each layer's K buffer
  (the address difference of the V buffer folded in), so one base pointer per layer serves;
- :class:`AdapterCopier` copies an adapter's matrices from pinned host memory on a side stream,
  after the work already queued on the current stream (the slots were free KV memory that an
  in-flight kernel may still read), and returns an event; a batch waits on the events of its
  own adapters only (:meth:`AdapterCopier.wait_for`), on the device, never the host; a
  prefetch never blocks a forward. An adapter evicted before its copy finished makes the
  current stream wait for that copy before its slots are reused as KV.

CPU tensors take the synchronous path (no stream, no event). Pure torch, no SGLang.
"""

from __future__ import annotations

from typing import Dict, Hashable, Iterable, List, Optional, Sequence, Tuple

import torch

from chameleon_sglang.cache.kv_layout import K_PART, AdapterLayout

TableEntries = Dict[Tuple[Hashable, int], Tuple[int, int]]


def table_entries(
    layout: AdapterLayout,
    piece_starts: Sequence[int],
    k_rows: Sequence[int],
    v_rows: Sequence[int],
    v_minus_k: Sequence[int],
) -> TableEntries:
    """``{((module, "A"|"B"), layer): (offset, rank)}`` of an adapter placed by ``layout`` with
    its pieces' runs starting at slots ``piece_starts``: offsets in elements from layer ``l``'s K
    buffer start (``k_rows[l]``/ ``v_rows[l]`` elements a slot; the V buffer starts ``v_minus_k[l]``
    elements after the K buffer, possibly negative). Keys are ``(module, kind)``; A is ``[stack * r,
    in]``, B ``[out, r]`` (stored untransposed): a module's rank is its B's column count."""
    entries: TableEntries = {}
    for layer, placement in enumerate(layout.layers):
        ranks = {key[0]: int(where.shape[1]) for key, where in placement.items() if key[1] == "B"}
        for key, where in placement.items():
            module = key[0]
            if module not in ranks:
                continue
            run_start = piece_starts[where.piece]
            if where.part == K_PART:
                offset = run_start * k_rows[layer] + where.offset
            else:
                offset = v_minus_k[layer] + run_start * v_rows[layer] + where.offset
            entries[(key, layer)] = (offset, ranks[module])
    return entries


class AdapterCopier:
    """Host-to-cache copies of adapters: asynchronous on CUDA (module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.stream: Optional[torch.cuda.Stream] = (
            torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        )
        self._pending: Dict[int, torch.cuda.Event] = {}  # adapter id -> copy done

    @property
    def asynchronous(self) -> bool:
        return self.stream is not None

    def copy(self, adapter_id: int, pairs: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """``dst.copy_(src)`` for every pair; on CUDA queued on the side stream behind the
        current stream's work, with an event recorded for ``adapter_id``."""
        if self.stream is None:
            for dst, src in pairs:
                dst.copy_(src)
            return
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self._pending[adapter_id] = event

    def wait_for(self, adapter_ids: Iterable[int]) -> None:
        """The current stream waits (on the device) for the copies of these adapters."""
        if not self._pending:
            return
        current = None
        for adapter_id in adapter_ids:
            event = self._pending.pop(adapter_id, None)
            if event is not None:
                current = current or torch.cuda.current_stream(self.device)
                current.wait_event(event)

    def forget(self, adapter_id: int) -> None:
        """The adapter's slots go back to the KV cache: later work waits for its copy."""
        self.wait_for((adapter_id,))


def pinned(
    pairs: Sequence[Tuple[Hashable, torch.Tensor]], enabled: bool
) -> List[Tuple[Hashable, torch.Tensor]]:
    """Contiguous, pinned host copies of ``(key, weight)`` pairs (as given where not
    ``enabled``): what an asynchronous copy reads from."""
    if not enabled:
        return list(pairs)
    return [(key, w.detach().contiguous().pin_memory()) for key, w in pairs]


def device_table_capacity(initial: int, loaded_limit: Optional[int]) -> int:
    """Adapter ids the device table has room for, fixed for the server's life (captured
    graphs read it in place): twice the adapters that may be loaded, at least 256."""
    return max(256, 2 * int(loaded_limit or 0), 2 * int(initial)) + 1
