"""Where an adapter's matrices go in KV memory, planned from its host weights in SGLang.

For each adapter SGLang has loaded, :class:`AdapterLayouts` gives this rank's slices of its
host weights (rank-exact: A ``[stack * r, in]``, B ``[out, r]``, in module order, as SGLang's
LoRA layers slice them) and the two ways the cache can place them in KV token slots
(:mod:`chameleon_sglang.cache.kv_layout`): one run, or pieces for fragmented memory. Plans are
kept until the adapter is unloaded (:meth:`AdapterLayouts.forget`).
"""

from __future__ import annotations

from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from sglang.srt.lora.utils import get_target_module_name

from chameleon_sglang.cache.kv_layout import AdapterLayout, plan_layout, plan_split_layout

HostMatrices = List[List[Tuple[Hashable, torch.Tensor]]]
"""Per layer, ``((module, "A"|"B"), weight)`` in module order."""


class AdapterLayouts:
    """Host weights and KV-slot layouts of the adapters a LoRA manager holds."""

    def __init__(
        self,
        manager: Any,
        target_modules: Sequence[str],
        num_layers: int,
        k_row: int,
        v_row: int,
        transposed_b: bool,
    ) -> None:
        self.manager = manager
        self.target_modules = target_modules
        self.num_layers = num_layers
        self.k_row, self.v_row = k_row, v_row  # elements one KV token slot holds in K, in V
        self.transposed_b = transposed_b  # B stored as an [r, out] block (CPU)
        self._one_run: Dict[str, AdapterLayout] = {}
        self._split: Dict[str, Optional[AdapterLayout]] = {}  # None: one piece only

    def one_run(self, uid: str) -> AdapterLayout:
        """The adapter in one run of slots."""
        layout = self._one_run.get(uid)
        if layout is None:
            layout = self._one_run[uid] = plan_layout(
                self._stored_shapes(uid), self.k_row, self.v_row
            )
        return layout

    def split(self, uid: str) -> Optional[AdapterLayout]:
        """The adapter in several runs (for fragmented memory); None when it is one piece."""
        if uid not in self._split:
            layout = plan_split_layout(self._stored_shapes(uid), self.k_row, self.v_row)
            self._split[uid] = layout if len(layout.pieces) > 1 else None
        return self._split[uid]

    def footprint_slots(self, uid: str) -> int:
        """The most KV slots a load of the adapter may take (its split layout, where memory is
        fragmented, may take a few more than its one run)."""
        split = self.split(uid)
        return max(self.one_run(uid).num_slots, split.num_slots if split else 0)

    def forget(self, uid: str) -> None:
        """The adapter was unloaded: a later adapter of that name is planned afresh."""
        self._one_run.pop(uid, None)
        self._split.pop(uid, None)

    def host_matrices(self, uid: str) -> HostMatrices:
        """This rank's slices of the adapter's host weights, rank-exact, per layer."""
        return host_matrices(self.manager, self.target_modules, uid, self.num_layers)

    def _stored_shapes(self, uid: str) -> List[List[Tuple[Hashable, Tuple[int, ...]]]]:
        """The block each matrix takes: B as ``[r, out]`` where stored transposed."""
        return [
            [(key, self._stored_shape(key, w)) for key, w in layer]
            for layer in self.host_matrices(uid)
        ]

    def _stored_shape(self, key: Tuple[str, str], weight: torch.Tensor) -> Tuple[int, ...]:
        if key[1] == "B" and self.transposed_b:
            return tuple(reversed(weight.shape))
        return tuple(weight.shape)


def host_matrices(
    manager: Any, target_modules: Sequence[str], uid: str, num_layers: Optional[int] = None
) -> HostMatrices:
    """This rank's slices of the host weights SGLang's ``manager`` holds for adapter ``uid``,
    rank-exact (A ``[stack * r, in]``, B ``[out, r]``), per layer, in module order, as SGLang's
    LoRA layers slice them; modules without both matrices are left out."""
    adapter = manager.loras[uid]
    layers = num_layers if num_layers is not None else len(manager.lora_modules)
    return [
        _layer_matrices(manager, target_modules, adapter.layers[layer_id].weights, layer_id)
        for layer_id in range(layers)
    ]


def _layer_matrices(
    manager: Any, target_modules: Sequence[str], weights: Dict[str, torch.Tensor], layer_id: int
) -> List[Tuple[Hashable, torch.Tensor]]:
    modules = {
        get_target_module_name(name, target_modules): module
        for name, module in manager.lora_modules[layer_id].items()
    }
    by_module: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, weight in weights.items():
        try:
            module = get_target_module_name(name, target_modules)
        except ValueError:
            continue  # not a target module (SGLang's pool skips it too)
        by_module.setdefault(module, {})["A" if "lora_A" in name else "B"] = weight
    layer: List[Tuple[Hashable, torch.Tensor]] = []
    for module in sorted(by_module):
        pair = by_module[module]
        if module not in modules or set(pair) != {"A", "B"}:
            continue
        layer.append(((module, "A"), modules[module].slice_lora_a_weights(pair["A"])))
        layer.append(((module, "B"), modules[module].slice_lora_b_weights(pair["B"])))
    return layer
