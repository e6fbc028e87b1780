"""SGLang's own LoRA kernels (``csgmv``, its default GPU backend) as a second reference for the
device check, where SGLang is importable.

Nothing of SGLang is copied here: :func:`load_csgmv` imports its chunked SGMV shrink/expand and
``LoRABatchInfo`` from the installed package, or says why it cannot. :class:`CsgmvStep` keeps
the check's adapters as SGLang's memory pool keeps them -- per module a padded slot buffer, A
``[slots, stack x max_rank, in]`` (an adapter's ``stack x r`` rows first), B ``[slots, out,
max_rank]`` (its ``r`` columns first), the scaling applied by the expand kernel -- and runs the
LoRA part of a step (every module of every layer) as SGLang's csgmv backend runs it, the batch
described as its ``prepare_lora_batch`` describes it: tokens stably sorted by slot, runs cut into
chunks of 16/32/128 tokens by batch size.
"""

from __future__ import annotations

import types
from typing import Any, Dict, List, Optional, Sequence, Tuple


def load_csgmv() -> Tuple[Optional[types.SimpleNamespace], str]:
    """``(kernels, "")`` or ``(None, why not)``."""
    try:
        from sglang.kernels.ops.lora.dense import lora_tuning_config as tuning
        from sglang.kernels.ops.lora.dense.chunked_sgmv_expand import (
            chunked_sgmv_lora_expand_forward as expand,
        )
        from sglang.kernels.ops.lora.dense.chunked_sgmv_shrink import (
            chunked_sgmv_lora_shrink_forward as shrink,
        )
        from sglang.srt.lora.utils import LoRABatchInfo
    except Exception as exc:  # any import failure means "not here"
        return None, f"SGLang's csgmv kernels are not importable: {type(exc).__name__}: {exc}"
    if tuning.get_device_name() is None:  # a CPU: its config loader needs a device name
        tuning.get_device_name = lambda: "cpu-interpreter"  # no tuned file: default blocks
    return types.SimpleNamespace(shrink=shrink, expand=expand, BatchInfo=LoRABatchInfo), ""


def chunk_size(num_tokens: int) -> int:
    """SGLang's csgmv chunk (BLOCK_M) for a batch of ``num_tokens`` tokens."""
    return 128 if num_tokens >= 256 else 32 if num_tokens >= 64 else 16


def describe_batch(
    kernels: types.SimpleNamespace,
    adapter_per_request: Sequence[int],
    tokens_per_request: Sequence[int],
    ranks: Any,
    scalings: Any,
    graph: bool = False,
    chunk: Optional[int] = None,
) -> Any:
    """The batch as SGLang's csgmv ``prepare_lora_batch`` describes it: every token's slot
    (``adapter_per_request``: slot ids, 0 the base model), tokens stably sorted by slot
    (``permutation``), each slot's run cut into segments of at most ``chunk`` tokens (default:
    SGLang's choice for the batch's size), on the device of ``ranks`` (int32 per slot; with
    ``scalings``, float32 per slot)."""
    import torch

    per_token = torch.repeat_interleave(
        torch.tensor(list(adapter_per_request), dtype=torch.int32),
        torch.tensor(list(tokens_per_request), dtype=torch.int64),
    )
    chunk = chunk or chunk_size(len(per_token))
    permutation = torch.argsort(per_token, stable=True)
    weights: List[int] = []
    bounds = [0]
    slots, runs = torch.unique_consecutive(per_token[permutation], return_counts=True)
    for slot, run in zip(slots.tolist(), runs.tolist()):
        for start in range(0, run, chunk):
            weights.append(slot)
            bounds.append(bounds[-1] + min(chunk, run - start))
    device = ranks.device
    return kernels.BatchInfo(
        use_cuda_graph=graph,
        bs=len(adapter_per_request),
        num_segments=len(weights),
        seg_indptr=torch.tensor(bounds, dtype=torch.int32, device=device),
        weight_indices=torch.tensor(weights, dtype=torch.int32, device=device),
        lora_ranks=ranks,
        scalings=scalings,
        max_len=chunk,
        seg_lens=None,
        permutation=permutation.to(device=device, dtype=torch.int32),
    )


class CsgmvStep:
    """The check's resident adapters in SGLang's slot layout, for ``num_layers`` layers (cycled
    over the model's layers, like the dense references)."""

    def __init__(self, kernels: types.SimpleNamespace, storage: Any, layers: Sequence[int]):
        import torch

        self.kernels, self.storage = kernels, storage
        self.max_rank = max(storage.shapes.ranks)
        self.slots = storage.table.capacity
        self.layers = list(layers)
        device, dtype = storage.device, storage.dtype
        self.buffers: List[Dict[str, Tuple[Any, Any]]] = []
        for layer in self.layers:
            per_module = {}
            for module, (fan_in, bounds) in storage.modules.items():
                stack = len(bounds) - 1
                a_pad = torch.zeros(
                    self.slots, stack * self.max_rank, fan_in, device=device, dtype=dtype
                )
                b_pad = torch.zeros(
                    self.slots, bounds[-1], self.max_rank, device=device, dtype=dtype
                )
                for adapter, weights in storage.weights.items():
                    a_w, b_w = weights[(module, layer)]
                    r = storage.ranks[adapter]
                    a_pad[adapter, : stack * r] = a_w
                    b_pad[adapter, :, :r] = b_w
                per_module[module] = (a_pad, b_pad)
            self.buffers.append(per_module)
        ranks = [storage.ranks.get(s, 0) for s in range(self.slots)]
        scalings = [storage.scalings.get(s, 0.0) for s in range(self.slots)]
        self.ranks = torch.tensor(ranks, dtype=torch.int32, device=device)
        self.scalings = torch.tensor(scalings, dtype=torch.float32, device=device)
        self.offsets = {
            m: torch.tensor(b, dtype=torch.int32, device=device)
            for m, (_, b) in storage.modules.items()
        }
        self.offsets_cpu = {
            m: torch.tensor(b, dtype=torch.int32) for m, (_, b) in storage.modules.items()
        }

    def batch_info(
        self, adapter_per_request: Sequence[int], tokens_per_request: Sequence[int], graph: bool
    ) -> Any:
        """SGLang's description of the batch (built on the host, copied once)."""
        return describe_batch(
            self.kernels,
            adapter_per_request,
            tokens_per_request,
            self.ranks,
            self.scalings,
            graph=graph,
        )

    def step(self, info: Any, xs: Dict[str, Any], outs: Dict[str, Any], layers: Sequence[int]):
        """``outs[module][layer] += LoRA(x)`` through SGLang's csgmv, every module of ``layers``
        (the weights of ``self.layers[i % len]`` for model layer ``i``)."""
        for layer in layers:
            own = self.layers.index(layer) if layer in self.layers else layer % len(self.layers)
            weights = self.buffers[own]
            for module, (_, bounds) in self.storage.modules.items():
                a_pad, b_pad = weights[module]
                a = self.kernels.shrink(xs[module], a_pad, info, num_slices=len(bounds) - 1)
                self.kernels.expand(
                    a,
                    b_pad,
                    info,
                    slice_offsets=self.offsets[module],
                    max_slice_size=max(hi - lo for lo, hi in zip(bounds, bounds[1:])),
                    base_output=outs[module][layer],
                    slice_offsets_cpu=self.offsets_cpu[module],
                )
