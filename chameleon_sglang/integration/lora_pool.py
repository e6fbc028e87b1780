"""SGLang's LoRA memory pool under ``--chameleon``: the adapter cache, in free KV memory.

:class:`ChameleonLoRAPool` replaces ``LoRAMemoryPool``'s fixed slots (``max_loras_per_batch``
of them, each padded to ``--max-lora-rank``). It allocates no adapter buffers of its own:

- an adapter is made resident by the :class:`~chameleon_sglang.cache.AdapterCache`, which takes
  a run of free KV-cache token slots from SGLang's allocator
  (:class:`~chameleon_sglang.memory.kv_store.KVSlotStore`), or, where free memory is fragmented,
  one run per piece of its split layout; its weights are copied there once per residency,
  rank-exact, laid out by :mod:`~chameleon_sglang.cache.kv_layout` (every matrix whole in one
  run), and read in place by the ``chameleon`` LoRA backend
  (:mod:`chameleon_sglang.integration.lora_backend`). On CPU each B matrix is stored transposed (a
  contiguous ``[r, out]`` block; the view handed out is still ``[out, r]``) so that the decode
  kernels stream whole rows, and every matrix's place is recorded in a
  :class:`~chameleon_kernels.lora_locations.MatrixLocations` table the kernels' plans gather;
- a resident adapter gets a small integer id (the "buffer id" SGLang's LoRA manager and backend
  index ``lora_ranks``/``scalings`` by); the base model is id 0. Any number of resident adapters
  may share a batch;
- the LoRA layers receive zero-storage *handle* tensors of the shapes SGLang expects, tagged with
  their (module, layer), instead of stacked slot buffers.

The pool is built with the model (before the KV cache exists) and bound to the KV cache by
:meth:`bind_kv_cache` once SGLang has sized it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Dict, Hashable, Iterable, List, Optional, Set, Tuple

import torch
from sglang.srt.lora.mem_pool import LoRAMemoryPool

from chameleon_kernels import lora_cached_numba
from chameleon_kernels.lora_locations import MatrixLocations
from chameleon_kernels.lora_table import DeviceLocationTable, alignment_for
from chameleon_sglang.cache import AdapterCache, CacheFullError
from chameleon_sglang.cache.kv_layout import K_PART, AdapterLayout
from chameleon_sglang.config import ChameleonConfig
from chameleon_sglang.integration.adapter_layouts import AdapterLayouts, host_matrices
from chameleon_sglang.integration.capability import EMBEDDING_MODULES
from chameleon_sglang.memory.adapter_ids import AdapterIds
from chameleon_sglang.memory.device_residency import (
    AdapterCopier,
    device_table_capacity,
    pinned,
    table_entries,
)
from chameleon_sglang.memory.host_link import HostLink
from chameleon_sglang.memory.kv_store import KVAllocation, KVSlotStore

logger = logging.getLogger(__name__)

HANDLE_ATTR = "chameleon_key"


@dataclasses.dataclass
class ResidentAdapter:
    """An adapter held in KV memory: its id, slots and per-layer ``{module: (A, B)}`` views."""

    uid: str
    buffer_id: int
    allocation: KVAllocation
    rank: int
    scaling: float
    views: List[Dict[str, Tuple[torch.Tensor, torch.Tensor]]]


def table_kernels_available() -> bool:
    """Whether the GPU table kernels can run here (Triton importable)."""
    from chameleon_kernels import lora_table_triton

    return lora_table_triton.HAS_TRITON


TABLE_PATH_ON_CPU_ENV = "CHAMELEON_TABLE_PATH_ON_CPU"
"""Set (with ``TRITON_INTERPRET=1``): a CPU server serves LoRA through the GPU path -- GPU
layouts, the device location table, the Triton table kernels interpreted. For checking the GPU
path end to end without a GPU; slow (every kernel interpreted), never for serving."""


def table_path_on_cpu() -> bool:
    """Whether :data:`TABLE_PATH_ON_CPU_ENV` asks for the GPU path here and it can run (Triton
    interpreted); asked where it cannot, logs why and answers False."""
    if os.environ.get(TABLE_PATH_ON_CPU_ENV, "") in ("", "0"):
        return False
    from chameleon_kernels import lora_table_triton

    if not lora_table_triton.INTERPRETED:
        logger.warning(
            "%s is set but Triton is not interpreted (TRITON_INTERPRET=1 before start): "
            "the CPU path serves",
            TABLE_PATH_ON_CPU_ENV,
        )
        return False
    return True


POOL_ARGUMENTS: Tuple[Tuple[str, str], ...] = (
    ("base_hf_config", "base_hf_config"),
    ("max_loras_per_batch", "max_loras_per_batch"),
    ("dtype", "dtype"),
    ("max_lora_rank", "max_lora_rank"),
    ("target_modules", "target_modules"),
    ("base_model", "base_model"),
    ("eviction_policy", "eviction_policy"),
    ("lora_added_tokens_size", "lora_added_tokens_size"),
    ("experts_shared_outer_loras", "experts_shared_outer_loras"),
    ("strict_loading", "lora_strict_loading"),
    ("enable_lora_overlap_loading", "enable_lora_overlap_loading"),
)
"""``LoRAMemoryPool``'s arguments and the ``LoRAManager`` attribute each comes from, as SGLang's
``LoRAManager.init_memory_pool`` passes them (``tests/integration/test_seams.py`` pins both)."""


class UnsupportedModelError(ValueError):
    """The model or adapter uses LoRA features the adapter cache does not store."""


class ChameleonLoRAPool(LoRAMemoryPool):
    """The LoRA pool as an elastic adapter cache in free KV memory (see the module docstring)."""

    def __init__(self, *args: Any, manager: Any, config: ChameleonConfig, **kwargs: Any) -> None:
        self.manager = manager
        self.config = config
        super().__init__(*args, **kwargs)
        if self.lora_added_tokens_size:
            raise UnsupportedModelError("adapters with added tokens are not cached")
        self.ids = AdapterIds()
        self.uid_to_buffer_id = self.ids.id_of  # what SGLang's LoRA manager reads
        self.buffer_id_to_uid = self.ids.uid_of
        self.max_loras_per_batch = self.ids.capacity
        self.resident: Dict[str, ResidentAdapter] = {}
        self.by_id: Dict[int, ResidentAdapter] = {}
        self.layouts: Optional[AdapterLayouts] = None  # once bound to the KV buffers
        self.cache: Optional[AdapterCache] = None
        self.store: Optional[KVSlotStore] = None
        self._k_buffers: List[torch.Tensor] = []
        self._v_buffers: List[torch.Tensor] = []
        self.transposed_b = False  # B matrices stored as [r, out] blocks (on CPU)
        self.locations: Optional[MatrixLocations] = None  # CPU: the compiled kernels' table
        self.device_table: Optional[DeviceLocationTable] = None  # GPU: the table kernels'
        self._k_flat: List[torch.Tensor] = []  # per layer: the device table's base buffer
        self._copier: Optional[AdapterCopier] = None
        self._pinned: Dict[str, List[List[Tuple[Hashable, torch.Tensor]]]] = {}
        self.host_link = HostLink(config.host_link_gbps)
        self.num_loads = 0
        self._last_now = 0.0  # the scheduler clock's latest value seen
        self.load_seconds = 0.0
        self.weight_bytes_loaded = 0

    @classmethod
    def for_manager(cls, manager: Any, config: ChameleonConfig) -> ChameleonLoRAPool:
        """The pool ``manager`` (SGLang's ``LoRAManager``) would build, as the adapter cache."""
        arguments = {name: getattr(manager, attribute) for name, attribute in POOL_ARGUMENTS}
        return cls(**arguments, manager=manager, config=config)

    # -- SGLang's pool interface -------------------------------------------------------------
    def init_buffers(self, base_model: torch.nn.Module) -> None:
        """Zero-storage handles of the stock buffer shapes, tagged ``(module, layer, A|B)``."""
        self.base_model = base_model
        if self._has_moe_module(base_model):
            raise UnsupportedModelError("the adapter cache stores dense (non-MoE) LoRA modules")
        device = next(base_model.parameters()).device
        point = torch.zeros((1, 1, 1), dtype=self.dtype, device=device)
        # Embedding and LM-head LoRA are not cached (adapters with such weights are refused at
        # load); their layers get handles that no adapter has weights for, so they run the base.
        for buffers, shape_of, kind in (
            (self.embedding_A_buffer, self.get_embedding_lora_A_shape, "A"),
            (self.embedding_B_buffer, self.get_embedding_lora_B_shape, "B"),
            (self.lm_head_A_buffer, self.get_embedding_lora_A_shape, "A"),
            (self.lm_head_B_buffer, self.get_embedding_lora_B_shape, "B"),
        ):
            module = (
                "embed_tokens"
                if buffers in (self.embedding_A_buffer, self.embedding_B_buffer)
                else "lm_head"
            )
            if module in self.target_modules:
                shape = (1, *shape_of(module, base_model, self.max_lora_rank, 0)[1:])
                handle = point.expand(shape)
                setattr(handle, HANDLE_ATTR, (module, 0, kind))
                buffers[module] = handle
        for buffers, shape_of, kind in (
            (self.A_buffer, self.get_lora_A_shape, "A"),
            (self.B_buffer, self.get_lora_B_shape, "B"),
        ):
            for module in sorted(set(self.target_modules) - EMBEDDING_MODULES):
                handles = []
                for layer_id in range(self.num_layer):
                    shape = (1, *shape_of(module, base_model, self.max_lora_rank, layer_id)[1:])
                    handle = point.expand(shape)
                    setattr(handle, HANDLE_ATTR, (module, layer_id, kind))
                    handles.append(handle)
                buffers[module] = handles

    def prepare_lora_batch(
        self, cur_uids: Set[Optional[str]], lora_adapters: Dict[str, Any], *args: Any, **kwargs: Any
    ) -> None:
        """Make every adapter of the batch resident (the scheduler normally already has)."""
        for uid in sorted(u for u in cur_uids if u is not None):
            if uid not in self.resident and not self.make_resident(
                uid, self._last_now, frozenset()
            ):
                raise CacheFullError(
                    f"adapter {uid!r} cannot be made resident: KV memory "
                    f"is held by running requests and adapters in use"
                )

    def remove_lora(self, uid: str) -> Optional[int]:
        """Unload: drop the cached copy now if idle, else when its last request releases it."""
        if self.cache is not None:
            self.cache.drop(uid)
        if self.layouts is not None:
            self.layouts.forget(uid)
        self._pinned.pop(uid, None)
        return None

    def get_buffer_id(self, lora_uid: Optional[str]) -> int:
        return self.uid_to_buffer_id[lora_uid]

    # -- binding to the KV cache -------------------------------------------------------------
    def bind_kv_buffers(self, kv_pool: Any, device_table: Optional[bool] = None) -> None:
        """Read and write adapters in ``kv_pool``'s K/V buffers (before CUDA graphs are
        captured: the GPU kernels read the device table and these buffers in place).
        ``device_table``: keep the GPU location table (None: on CUDA with Triton). Idempotent."""
        if self._k_buffers:
            return
        if getattr(kv_pool, "kv_cache_layout", "nhd") != "nhd":
            raise UnsupportedModelError("the adapter cache needs an NHD KV layout")
        k_buffers, v_buffers = list(kv_pool.k_buffer), list(kv_pool.v_buffer)
        if len(k_buffers) != self.num_layer:
            raise UnsupportedModelError("the adapter cache needs one KV buffer per model layer")
        if any(b.dtype != self.dtype for b in k_buffers + v_buffers):
            raise UnsupportedModelError(
                f"the adapter cache needs KV cache dtype {self.dtype} (the LoRA dtype)"
            )
        self._k_buffers = [b.view(b.shape[0], -1) for b in k_buffers]
        self._v_buffers = [b.view(b.shape[0], -1) for b in v_buffers]
        device = self._k_buffers[0].device
        gpu_path = device.type == "cuda" or (device.type == "cpu" and table_path_on_cpu())
        self.transposed_b = not gpu_path
        modules = sorted(set(self.target_modules) - EMBEDDING_MODULES)
        kinds = [(module, kind) for module in modules for kind in ("A", "B")]
        if (
            self.transposed_b
            and self.dtype in lora_cached_numba.DTYPES
            and lora_cached_numba.available()
        ):
            self.locations = MatrixLocations(
                [
                    (lora_cached_numba.as_array(k.view(-1)), lora_cached_numba.as_array(v.view(-1)))
                    for k, v in zip(self._k_buffers, self._v_buffers)
                ],
                kinds,
            )
        if device_table is None:
            device_table = gpu_path and table_kernels_available()
        if device_table:
            self._make_device_table(kinds, device)
        self._copier = AdapterCopier(device)
        self.layouts = AdapterLayouts(
            self.manager,
            self.target_modules,
            self.num_layer,
            self._k_buffers[0].shape[1],
            self._v_buffers[0].shape[1],
            self.transposed_b,
        )

    def _make_device_table(self, kinds: List[Tuple[str, str]], device: torch.device) -> None:
        rows = {b.shape[1] for b in self._k_buffers + self._v_buffers}
        align = min(alignment_for(self.dtype, row) for row in rows)
        capacity = device_table_capacity(
            len(self.manager.loras), getattr(self.manager, "max_loaded_loras", None)
        )
        self.device_table = DeviceLocationTable(kinds, self.num_layer, capacity, device, align)
        self.ids.limit = self.device_table.capacity
        self._k_flat = [k.view(-1) for k in self._k_buffers]
        logger.info(
            "Chameleon adapter cache: device location table for %d adapter ids "
            "(%d kinds x %d layers, %d-element alignment)",
            capacity - 1,
            len(kinds),
            self.num_layer,
            align,
        )

    def bind_kv_cache(self, allocator: Any, kv_pool: Any) -> None:
        """Store adapters in ``kv_pool``'s free token slots, taken through ``allocator``."""
        if allocator.page_size != 1:
            raise UnsupportedModelError("the adapter cache needs page size 1")
        self.bind_kv_buffers(kv_pool)
        bytes_per_slot = sum(
            b.shape[1] * b.element_size() for b in self._k_buffers + self._v_buffers
        )
        self.store = KVSlotStore(allocator, bytes_per_slot, on_free=self._on_run_freed)
        self.cache = AdapterCache.from_config(self.store, self.config)

    def layer_base(self, layer_id: int) -> torch.Tensor:
        """Layer ``layer_id``'s flat K buffer: the device table's offsets count from it."""
        return self._k_flat[layer_id]

    def wait_ready(self, buffer_ids: Iterable[int]) -> None:
        """The current stream waits for the copies of these adapters (device-side, GPU)."""
        if self._copier is not None:
            self._copier.wait_for(buffer_ids)

    # -- residency ---------------------------------------------------------------------------
    def footprint_slots(self, uid: str) -> int:
        """The most KV slots a load of the adapter may take (its split layout, where memory is
        fragmented, may take a few more than its one run)."""
        return self._layouts().footprint_slots(uid)

    def footprint_bytes(self, uid: str) -> int:
        """KV memory the adapter occupies in one run of slots, in bytes (the cache's size of
        it; a split residency holds the pieces' slots)."""
        assert self.store is not None
        return self._layouts().one_run(uid).num_slots * self.store.bytes_per_slot

    def is_resident(self, uid: Optional[str]) -> bool:
        return uid is None or (self.cache is not None and self.cache.is_resident(uid))

    def make_resident(
        self,
        uid: str,
        now: float,
        queued: Iterable[str],
        prefetch: bool = False,
        count_lookup: bool = True,
    ) -> bool:
        """Resident already (a hit), or loaded now into KV memory (evicting idle adapters,
        those of queued requests only when needed and not for a prefetch). False when the
        memory cannot be found; nothing changes then. ``count_lookup=False``: a repeated
        lookup for the same request, not counted as a hit again."""
        cache = self.cache
        if cache is None:
            raise RuntimeError("the adapter cache is not bound to the KV cache yet")
        self._last_now = max(self._last_now, now)
        if uid not in self.manager.loras:
            return False
        num_bytes = self.footprint_bytes(uid)
        if cache.is_resident(uid):
            if not prefetch and count_lookup:
                cache.admit(uid, num_bytes, self._rank(uid), now)
            return True
        queued_set = frozenset(queued)
        if not self.ids.can_take():
            return False
        split = self._layouts().split(uid)
        pieces = split.pieces if split is not None else ()
        if not cache.can_admit(uid, num_bytes, now, queued_set, prefetch=prefetch, pieces=pieces):
            return False
        try:
            entry = cache.admit(
                uid, num_bytes, self._rank(uid), now, queued_set, prefetch=prefetch, pieces=pieces
            )
        except CacheFullError:
            return False
        self._load(uid, entry.handle)
        return True

    def _load(self, uid: str, allocation: KVAllocation) -> None:
        started = time.perf_counter()
        layouts = self._layouts()
        layout = layouts.split(uid) if allocation.split else layouts.one_run(uid)
        assert layout is not None and layout.pieces == tuple(r.length for r in allocation.runs)
        views: List[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = []
        copies: List[Tuple[torch.Tensor, torch.Tensor]] = []
        weight_bytes = 0
        for layer_id, (matrices, placement) in enumerate(
            zip(self._copy_sources(uid), layout.layers)
        ):
            layer_views: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
            placed = {
                key: self._view(layer_id, allocation, placement[key], key[1] == "B")
                for key, _ in matrices
            }
            for key, weight in matrices:
                copies.append((placed[key], weight))
                weight_bytes += weight.numel() * weight.element_size()
            for module in sorted({module for module, _ in placed}):
                layer_views[module] = (placed[(module, "A")], placed[(module, "B")])
            views.append(layer_views)
        buffer_id = self.ids.take(uid)
        if self.ids.capacity != self.max_loras_per_batch:  # more ids: SGLang sizes by this
            self.max_loras_per_batch = self.manager.max_loras_per_batch = self.ids.capacity
        assert self._copier is not None
        self._copier.copy(buffer_id, copies)
        scaling = float(self.manager.loras[uid].scaling)
        if self.locations is not None:
            self._record_locations(buffer_id, allocation, layout)
        if self.device_table is not None:
            self._record_device_table(buffer_id, allocation, layout, scaling)
        adapter = ResidentAdapter(uid, buffer_id, allocation, self._rank(uid), scaling, views)
        self.resident[uid] = adapter
        self.by_id[buffer_id] = adapter
        self.host_link.hold(weight_bytes, started)
        self.num_loads += 1
        self.weight_bytes_loaded += weight_bytes
        self.load_seconds += time.perf_counter() - started

    def _copy_sources(self, uid: str) -> List[List[Tuple[Hashable, torch.Tensor]]]:
        """The host matrices a load copies from: pinned copies kept per adapter where the copy
        is asynchronous (GPU), else the adapter's host weights as they are."""
        assert self._copier is not None
        if not self._copier.asynchronous:
            return self._layouts().host_matrices(uid)
        sources = self._pinned.get(uid)
        if sources is None:
            sources = self._pinned[uid] = [
                pinned(layer, True) for layer in self._layouts().host_matrices(uid)
            ]
        return sources

    def _record_device_table(
        self, buffer_id: int, allocation: KVAllocation, layout: AdapterLayout, scaling: float
    ) -> None:
        assert self.device_table is not None
        element = self._k_buffers[0].element_size()
        v_minus_k = [
            (v.data_ptr() - k.data_ptr()) // element
            for k, v in zip(self._k_buffers, self._v_buffers)
        ]
        entries = table_entries(
            layout,
            [r.start for r in allocation.runs],
            [k.shape[1] for k in self._k_buffers],
            [v.shape[1] for v in self._v_buffers],
            v_minus_k,
        )
        self.device_table.set_adapter(buffer_id, entries, scaling)

    def _record_locations(
        self, buffer_id: int, allocation: KVAllocation, layout: AdapterLayout
    ) -> None:
        assert self.locations is not None
        for layer_id, placement in enumerate(layout.layers):
            for (module, kind), where in placement.items():
                row = (self._k_buffers if where.part == K_PART else self._v_buffers)[layer_id]
                # A: [stack * r, in] -> its rows; B stored as [r, out] -> its rank
                start = allocation.runs[where.piece].start
                self.locations.set(
                    buffer_id,
                    (module, kind),
                    layer_id,
                    where.part,
                    start * row.shape[1] + where.offset,
                    where.shape[0],
                )

    def _on_run_freed(self, allocation: KVAllocation) -> None:
        """The cache gave slots back to the KV allocator: forget the adapter's views and id."""
        for uid, adapter in list(self.resident.items()):
            if adapter.allocation is allocation:
                del self.resident[uid]
                del self.by_id[adapter.buffer_id]
                self.ids.release(uid)
                if self.locations is not None:
                    self.locations.clear(adapter.buffer_id)
                if self.device_table is not None:
                    self.device_table.clear(adapter.buffer_id)
                if self._copier is not None:
                    self._copier.forget(adapter.buffer_id)
                return

    def shape_problem(self, uid: str) -> Optional[str]:
        """Why the adapter's matrices do not fit the model's LoRA layers (an adapter of another
        base model), or None: A must be ``[stack * r, in]`` and B ``[out, r]`` for the layer's
        ``in``, ``out`` and stacking, ``r`` the adapter's rank."""
        rank = self._rank(uid)
        for layer_id, layer in enumerate(host_matrices(self.manager, self.target_modules, uid)):
            for (module, kind), weight in layer:
                handle = (self.A_buffer if kind == "A" else self.B_buffer)[module][layer_id]
                if kind == "A":
                    expected = (handle.shape[1] // self.max_lora_rank * rank, handle.shape[2])
                else:
                    expected = (handle.shape[1], rank)
                if tuple(weight.shape) != expected:
                    return (
                        f"layer {layer_id} {module} {kind} is {list(weight.shape)}, the "
                        f"model's needs {list(expected)}"
                    )
        return None

    # -- placement ----------------------------------------------------------------------------
    def _layouts(self) -> AdapterLayouts:
        if self.layouts is None:
            raise RuntimeError("the adapter cache is not bound to the KV cache yet")
        return self.layouts

    def _rank(self, uid: str) -> int:
        return int(self.manager.configs[uid].r)

    def _view(
        self, layer_id: int, allocation: KVAllocation, placement: Any, is_b: bool
    ) -> torch.Tensor:
        """The matrix as SGLang's shape (A ``[stack * r, in]``, B ``[out, r]``), in place."""
        buffer = (self._k_buffers if placement.part == K_PART else self._v_buffers)[layer_id]
        run = allocation.runs[placement.piece]
        flat = buffer[run.start : run.stop].view(-1)
        block = flat[placement.offset : placement.offset + placement.numel].view(placement.shape)
        return block.t() if is_b and self.transposed_b else block

    # -- reporting ---------------------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        stats: Dict[str, Any] = dict(self.cache.stats()) if self.cache is not None else {}
        stats.update(
            num_loads=self.num_loads,
            weight_bytes_loaded=self.weight_bytes_loaded,
            load_seconds=round(self.load_seconds, 6),
            host_link_gbps=self.config.host_link_gbps,
            store_refused_runs=(
                self.store.num_refused_for_fragmentation if self.store is not None else 0
            ),
            split_loads=self.store.num_split_allocations if self.store is not None else 0,
            kv_bytes_per_slot=self.store.bytes_per_slot if self.store is not None else 0,
        )
        return stats
