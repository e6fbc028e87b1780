"""The ``chameleon`` LoRA backend: LoRA compute that reads adapters in the adapter cache.

Registered in SGLang's LoRA backend registry; ``--chameleon`` selects it (with the cache on).
SGLang's LoRA layers call it with the pool's handle tensors; the backend reads the (module,
layer) tag of each handle and fetches each adapter's rank-exact matrices from
:class:`~chameleon_sglang.lora_pool.ChameleonLoRAPool`. The arithmetic lives in
``chameleon_kernels.lora_cached``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence

import torch
from sglang.srt.lora.backend.base_backend import BaseLoRABackend
from sglang.srt.lora.utils import LoRABatchInfo, generate_sequence_lengths

from chameleon_kernels import lora_cached_numba
from chameleon_kernels.lora_cached import AdapterGroups, SmallPlanOf, expand, group_tokens, shrink
from chameleon_kernels.lora_locations import SmallBatch

BACKEND_NAME = "chameleon"


def _shrink(x: torch.Tensor, groups: AdapterGroups, weights_of: Any, stack: int,
            max_rank: int, small_plan: Optional[SmallPlanOf]) -> torch.Tensor:
    """One call site for both devices: Triton on CUDA tensors, torch elsewhere."""
    if x.is_cuda:
        from chameleon_kernels.lora_cached_triton import lora_shrink

        return lora_shrink(x, groups, weights_of, stack, max_rank)
    return shrink(x, groups, weights_of, stack, max_rank, small_plan)


def _expand(a: torch.Tensor, groups: AdapterGroups, weights_of: Any, offsets: Sequence[int],
            base_output: Optional[torch.Tensor], small_plan: Optional[SmallPlanOf]
            ) -> torch.Tensor:
    if a.is_cuda:
        from chameleon_kernels.lora_cached_triton import lora_expand

        return lora_expand(a, groups, weights_of, offsets, base_output)
    return expand(a, groups, weights_of, offsets, base_output, small_plan)


@dataclasses.dataclass
class CachedLoRABatchInfo(LoRABatchInfo):
    """SGLang's batch info plus the batch's tokens grouped by adapter."""

    groups: Optional[AdapterGroups] = None


class ChameleonLoRABackend(BaseLoRABackend):
    """LoRA kernels over the adapter cache (see the module docstring). No CUDA graphs."""

    name = BACKEND_NAME

    def __init__(self, max_loras_per_batch: int, device: torch.device, **kwargs: Any) -> None:
        super().__init__(max_loras_per_batch, device)
        self.pool: Any = None
        self.max_rank = 0
        self.num_batches = 0
        self.sum_distinct_adapters = 0
        self.max_distinct_adapters = 0
        if torch.device(device).type == "cpu":
            lora_cached_numba.warm_up()  # compile (or load) the decode kernels before serving

    def attach(self, pool: Any) -> None:
        """Read adapters from ``pool`` (a ``ChameleonLoRAPool``)."""
        self.pool = pool
        self.max_rank = int(pool.max_lora_rank)

    # -- per batch -----------------------------------------------------------------------------
    def prepare_lora_batch(self, forward_batch: Any, weight_indices: Sequence[int],
                           lora_ranks: Sequence[int], scalings: Sequence[float],
                           use_cuda_graph: bool, use_prefill_cuda_graph: bool = False) -> None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the chameleon LoRA backend does not run under CUDA graphs")
        seq_lens = generate_sequence_lengths(forward_batch, device="cpu").tolist()
        active = {int(i): float(scalings[i]) for i in set(weight_indices) if lora_ranks[i] > 0}
        groups = group_tokens([int(i) for i in weight_indices], seq_lens, active)
        self._count(len(active))
        num = len(seq_lens)
        self.batch_info = CachedLoRABatchInfo(
            use_cuda_graph=False,
            bs=forward_batch.batch_size,
            num_segments=num,
            seg_indptr=torch.zeros(num + 1, dtype=torch.int32),
            weight_indices=torch.tensor(list(weight_indices), dtype=torch.int32),
            lora_ranks=torch.tensor(list(lora_ranks), dtype=torch.int32),
            scalings=torch.tensor(list(scalings), dtype=torch.float32),
            max_len=max(seq_lens) if seq_lens else 0,
            seg_lens=torch.tensor(seq_lens, dtype=torch.int32),
            groups=groups,
        )

    def _count(self, distinct: int) -> None:
        if distinct:
            self.num_batches += 1
            self.sum_distinct_adapters += distinct
            self.max_distinct_adapters = max(self.max_distinct_adapters, distinct)

    def batch_stats(self) -> Dict[str, float]:
        """Distinct adapters per forward batch that used any adapter."""
        mean = self.sum_distinct_adapters / self.num_batches if self.num_batches else 0.0
        return {"batches_with_adapters": self.num_batches,
                "mean_distinct_adapters_per_batch": round(mean, 3),
                "max_distinct_adapters_per_batch": self.max_distinct_adapters}

    # -- kernels -------------------------------------------------------------------------------
    def forward_with_base(self, layer: Any, x: torch.Tensor, base_fn: Any, lora_a: Any,
                          lora_b: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer alone when no adapter of the batch has weights for this module."""
        module, layer_id, _ = lora_a.chameleon_key
        groups = self.batch_info.groups if self.batch_info is not None else None
        by_id = self.pool.by_id
        if groups is None or not any(module in by_id[adapter].views[layer_id]
                                     for _, _, adapter in groups.groups):
            return base_fn()
        return super().forward_with_base(layer, x, base_fn, lora_a, lora_b, *args, **kwargs)

    def _weights_of(self, handle: torch.Tensor):
        module, layer, kind = handle.chameleon_key
        column = 0 if kind == "A" else 1
        by_id = self.pool.by_id

        def weights_of(adapter_id: int) -> Optional[torch.Tensor]:
            pair = by_id[adapter_id].views[layer].get(module)
            return None if pair is None else pair[column]

        return weights_of

    def _small_plan(self, handle: torch.Tensor) -> Optional[SmallPlanOf]:
        """Plans for the compiled decode kernels from the pool's location table (if it keeps
        one); None: the kernels locate each matrix themselves."""
        locations = self.pool.locations
        if locations is None:
            return None
        module, layer, kind = handle.chameleon_key
        key = (module, kind)

        def plan(batch: SmallBatch):
            return locations.plan(key, layer, batch)

        return plan

    def _groups(self) -> AdapterGroups:
        assert self.batch_info is not None and self.batch_info.groups is not None
        return self.batch_info.groups

    def run_lora_a_sgemm(self, x: torch.Tensor, weights: torch.Tensor, stack_num: int = 1,
                         *args: Any, **kwargs: Any) -> torch.Tensor:
        return _shrink(x, self._groups(), self._weights_of(weights), stack_num, self.max_rank,
                       self._small_plan(weights))

    def run_lora_b_sgemm(self, x: torch.Tensor, weights: torch.Tensor,
                         output_offset_cpu: Optional[torch.Tensor] = None,
                         base_output: Optional[torch.Tensor] = None, *args: Any,
                         **kwargs: Any) -> torch.Tensor:
        offsets = (output_offset_cpu.tolist() if output_offset_cpu is not None
                   else [0, weights.shape[-2]])
        return _expand(x, self._groups(), self._weights_of(weights), offsets, base_output,
                       self._small_plan(weights))

    def run_qkv_lora(self, x: torch.Tensor, qkv_lora_a: torch.Tensor, qkv_lora_b: torch.Tensor,
                     output_offset: Any = None, output_offset_cpu: Optional[torch.Tensor] = None,
                     max_qkv_out_dim: int = 0, base_output: Optional[torch.Tensor] = None,
                     n_slices: int = 3, *args: Any, **kwargs: Any) -> torch.Tensor:
        a = _shrink(x, self._groups(), self._weights_of(qkv_lora_a), n_slices, self.max_rank,
                    self._small_plan(qkv_lora_a))
        return self.run_lora_b_sgemm(a, qkv_lora_b, output_offset_cpu, base_output)

    def run_gate_up_lora(self, x: torch.Tensor, gate_up_lora_a: torch.Tensor,
                         gate_up_lora_b: torch.Tensor, output_offset: Any = None,
                         output_offset_cpu: Optional[torch.Tensor] = None,
                         base_output: Optional[torch.Tensor] = None, *args: Any,
                         **kwargs: Any) -> torch.Tensor:
        num_slices = len(output_offset_cpu) - 1 if output_offset_cpu is not None else 2
        a = _shrink(x, self._groups(), self._weights_of(gate_up_lora_a), num_slices,
                    self.max_rank, self._small_plan(gate_up_lora_a))
        return self.run_lora_b_sgemm(a, gate_up_lora_b, output_offset_cpu, base_output)

    def init_decode_cuda_graph_batch_info(self, *args: Any, **kwargs: Any) -> None:
        """No CUDA graphs: the batch's adapters change with what the cache holds."""


def register_backend() -> None:
    """Add ``chameleon`` to SGLang's LoRA backend registry (idempotent)."""
    from sglang.srt.lora.backend.lora_registry import LORA_SUPPORTED_BACKENDS

    LORA_SUPPORTED_BACKENDS.setdefault(BACKEND_NAME, lambda: ChameleonLoRABackend)
