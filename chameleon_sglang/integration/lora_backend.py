"""The ``chameleon`` LoRA backend: LoRA compute that reads adapters in the adapter cache.

Registered in SGLang's LoRA backend registry; ``--chameleon`` selects it (with the cache on).
SGLang's LoRA layers call it with the pool's handle tensors; the backend reads the (module,
layer) tag of each handle and finds each adapter's rank-exact matrices in
:class:`~chameleon_sglang.integration.lora_pool.ChameleonLoRAPool`. Two paths:

- **table path** (the pool keeps a device location table: CUDA with Triton): per batch,
  :meth:`ChameleonLoRABackend.prepare_lora_batch` groups the tokens by adapter id into device
  buffers of fixed address with one host-to-device copy (graph buffers sized at
  :meth:`~ChameleonLoRABackend.init_decode_cuda_graph_batch_info` for captured decode batches,
  eager ones otherwise) and makes the stream wait for the batch's own adapter copies; every
  shrink/expand is then one Triton launch reading the table
  (:mod:`chameleon_kernels.lora_table_triton`): no host work per call but the launch, nothing
  a captured CUDA graph could not replay with another adapter mix;
- **host path** (CPU, or CUDA without Triton, where CUDA graphs are then off): tokens grouped
  on the host, adapters located through the pool's views; the arithmetic lives in
  ``chameleon_kernels.lora_cached`` (compiled decode kernels and BLAS on CPU, torch elsewhere).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence

import torch
from sglang.srt.lora.backend.base_backend import BaseLoRABackend
from sglang.srt.lora.utils import LoRABatchInfo

from chameleon_kernels import lora_cached_numba
from chameleon_kernels.lora_cached import AdapterGroups, SmallPlanOf, expand, group_tokens, shrink
from chameleon_kernels.lora_locations import SmallBatch
from chameleon_kernels.lora_table import BatchPlan, SegmentBuffers
from chameleon_sglang.integration.capability import CHAMELEON_LORA_BACKEND, EMBEDDING_MODULES

EAGER_TOKENS = 16384
"""Tokens the eager batch buffers hold at first (they grow for a larger batch)."""


@dataclasses.dataclass
class CachedLoRABatchInfo(LoRABatchInfo):
    """SGLang's batch info plus the batch's tokens grouped by adapter (host path) or the
    batch's device plan (table path)."""

    groups: Optional[AdapterGroups] = None
    plan: Optional[BatchPlan] = None


def tokens_per_request(forward_batch: Any) -> List[int]:
    """Tokens of each request in the batch, from host-side fields only (no device read)."""
    mode = forward_batch.forward_mode
    bs = int(forward_batch.batch_size)
    if mode.is_idle():
        return []
    if mode.is_extend() and not mode.is_target_verify():
        return [int(n) for n in forward_batch.extend_seq_lens_cpu]
    if mode.is_target_verify():
        return [int(forward_batch.spec_info.draft_token_num)] * bs
    return [1] * bs


class ChameleonLoRABackend(BaseLoRABackend):
    """LoRA kernels over the adapter cache (see the module docstring)."""

    name = CHAMELEON_LORA_BACKEND

    def __init__(self, max_loras_per_batch: int, device: torch.device, **kwargs: Any) -> None:
        super().__init__(max_loras_per_batch, device)
        self.pool: Any = None
        self.max_rank = 0
        self._eager: Optional[SegmentBuffers] = None
        self._graph: Optional[SegmentBuffers] = None
        self._slice_offsets: Dict[Any, List[int]] = {}
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
    @property
    def table(self) -> Any:
        """The pool's device location table (None: the host path serves)."""
        return getattr(self.pool, "device_table", None) if self.pool is not None else None

    def prepare_lora_batch(
        self,
        forward_batch: Any,
        weight_indices: Sequence[int],
        lora_ranks: Sequence[int],
        scalings: Sequence[float],
        use_cuda_graph: bool,
        use_prefill_cuda_graph: bool = False,
    ) -> None:
        counts = tokens_per_request(forward_batch)
        active = {int(i): float(scalings[i]) for i in set(weight_indices) if lora_ranks[i] > 0}
        self._count(len(active))
        num = len(counts)
        info = CachedLoRABatchInfo(
            use_cuda_graph=bool(use_cuda_graph and self.table is not None),
            bs=forward_batch.batch_size,
            num_segments=num,
            seg_indptr=torch.zeros(num + 1, dtype=torch.int32),
            weight_indices=torch.tensor(list(weight_indices), dtype=torch.int32),
            lora_ranks=torch.tensor(list(lora_ranks), dtype=torch.int32),
            scalings=torch.tensor(list(scalings), dtype=torch.float32),
            max_len=max(counts) if counts else 0,
            seg_lens=torch.tensor(counts, dtype=torch.int32),
        )
        if self.table is not None:
            ids = [int(i) if int(i) in active else 0 for i in weight_indices]
            self.pool.wait_ready(active)
            info.plan = self._buffers(use_cuda_graph, sum(counts), num).fill(
                ids, counts, graph=use_cuda_graph
            )
        else:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "the chameleon LoRA backend's host path does not run under "
                    "CUDA graphs (no device location table)"
                )
            info.groups = group_tokens([int(i) for i in weight_indices], counts, active)
        self.batch_info = info

    def _buffers(self, graph: bool, num_tokens: int, num_requests: int) -> SegmentBuffers:
        """The graph buffers (fixed since capture) or the eager ones (grown as needed)."""
        if graph:
            if self._graph is None:
                raise RuntimeError("CUDA-graph batch before init_decode_cuda_graph_batch_info")
            return self._graph
        eager = self._eager
        if eager is None or num_tokens > eager.max_tokens or num_requests > eager.max_segments:
            tokens = max(EAGER_TOKENS, num_tokens)
            eager = self._eager = SegmentBuffers(
                max(tokens // 4, num_requests, 1), tokens, self.table.device
            )
        return eager

    def init_decode_cuda_graph_batch_info(
        self, max_bs_in_cuda_graph: int, num_tokens_per_req: int = 1, *args: Any, **kwargs: Any
    ) -> None:
        """Batch buffers for captured decode graphs: a segment per request, every token."""
        if self.table is None:
            raise RuntimeError(
                "the chameleon LoRA backend captures CUDA graphs only with the adapter cache's "
                "device location table (CUDA + Triton); start with --disable-cuda-graph"
            )
        self._graph = SegmentBuffers(
            max_bs_in_cuda_graph,
            max_bs_in_cuda_graph * max(1, num_tokens_per_req),
            self.table.device,
        )

    def _count(self, distinct: int) -> None:
        if distinct:
            self.num_batches += 1
            self.sum_distinct_adapters += distinct
            self.max_distinct_adapters = max(self.max_distinct_adapters, distinct)

    def batch_stats(self) -> Dict[str, float]:
        """Distinct adapters per forward batch that used any adapter."""
        mean = self.sum_distinct_adapters / self.num_batches if self.num_batches else 0.0
        return {
            "batches_with_adapters": self.num_batches,
            "mean_distinct_adapters_per_batch": round(mean, 3),
            "max_distinct_adapters_per_batch": self.max_distinct_adapters,
        }

    # -- kernels -------------------------------------------------------------------------------
    def forward_with_base(
        self,
        layer: Any,
        x: torch.Tensor,
        base_fn: Any,
        lora_a: Any,
        lora_b: Any,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The base layer alone when no adapter of the batch has weights for this module
        (decided on the host; under a CUDA graph the LoRA kernels always run: a replay may
        bring adapters the captured batch did not have)."""
        info = self.batch_info
        module, layer_id, _ = lora_a.chameleon_key
        if info is not None and info.plan is not None:
            # the table has no embedding/LM-head rows: no cached adapter has such weights
            if module in EMBEDDING_MODULES or not (info.use_cuda_graph or info.plan.active):
                return base_fn()
            return super().forward_with_base(layer, x, base_fn, lora_a, lora_b, *args, **kwargs)
        groups = info.groups if info is not None else None
        by_id = self.pool.by_id
        if groups is None or not any(
            module in by_id[adapter].views[layer_id] for _, _, adapter in groups.groups
        ):
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

    def _offsets(
        self, handle: torch.Tensor, output_offset_cpu: Optional[torch.Tensor]
    ) -> List[int]:
        """A module's output slice bounds, read from SGLang's CPU tensor once per module."""
        key = handle.chameleon_key[0]
        offsets = self._slice_offsets.get(key)
        if offsets is None:
            offsets = (
                output_offset_cpu.tolist()
                if output_offset_cpu is not None
                else [0, int(handle.shape[-2])]
            )
            self._slice_offsets[key] = offsets
        return offsets

    def _table_shrink(self, x: torch.Tensor, handle: torch.Tensor, stack: int) -> torch.Tensor:
        from chameleon_kernels.lora_table_triton import table_shrink

        module, layer, kind = handle.chameleon_key
        plan, base = self.batch_info.plan, self.pool.layer_base(layer)
        return table_shrink(x, plan, self.table, (module, kind), layer, base, stack, self.max_rank)

    def _table_expand(
        self,
        a: torch.Tensor,
        handle: torch.Tensor,
        offsets: List[int],
        base_output: Optional[torch.Tensor],
    ) -> torch.Tensor:
        from chameleon_kernels.lora_table_triton import table_expand

        module, layer, kind = handle.chameleon_key
        plan, base = self.batch_info.plan, self.pool.layer_base(layer)
        rank = self.max_rank
        return table_expand(
            a, plan, self.table, (module, kind), layer, base, offsets, base_output, rank
        )

    def _a(self, x: torch.Tensor, handle: torch.Tensor, stack: int) -> torch.Tensor:
        if self.batch_info.plan is not None:
            return self._table_shrink(x, handle, stack)
        return shrink(
            x,
            self._groups(),
            self._weights_of(handle),
            stack,
            self.max_rank,
            self._small_plan(handle),
        )

    def run_lora_a_sgemm(
        self, x: torch.Tensor, weights: torch.Tensor, stack_num: int = 1, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        return self._a(x, weights, stack_num)

    def run_lora_b_sgemm(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        output_offset_cpu: Optional[torch.Tensor] = None,
        base_output: Optional[torch.Tensor] = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        offsets = self._offsets(weights, output_offset_cpu)
        if self.batch_info.plan is not None:
            return self._table_expand(x, weights, offsets, base_output)
        return expand(
            x,
            self._groups(),
            self._weights_of(weights),
            offsets,
            base_output,
            self._small_plan(weights),
        )

    def run_qkv_lora(
        self,
        x: torch.Tensor,
        qkv_lora_a: torch.Tensor,
        qkv_lora_b: torch.Tensor,
        output_offset: Any = None,
        output_offset_cpu: Optional[torch.Tensor] = None,
        max_qkv_out_dim: int = 0,
        base_output: Optional[torch.Tensor] = None,
        n_slices: int = 3,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        a = self._a(x, qkv_lora_a, n_slices)
        return self.run_lora_b_sgemm(a, qkv_lora_b, output_offset_cpu, base_output)

    def run_gate_up_lora(
        self,
        x: torch.Tensor,
        gate_up_lora_a: torch.Tensor,
        gate_up_lora_b: torch.Tensor,
        output_offset: Any = None,
        output_offset_cpu: Optional[torch.Tensor] = None,
        base_output: Optional[torch.Tensor] = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        num_slices = len(self._offsets(gate_up_lora_b, output_offset_cpu)) - 1
        a = self._a(x, gate_up_lora_a, num_slices)
        return self.run_lora_b_sgemm(a, gate_up_lora_b, output_offset_cpu, base_output)
