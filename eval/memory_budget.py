"""One memory budget for every arm: stock SGLang's LoRA slots are paid for out of its KV pool.

On a GPU, SGLang allocates its LoRA slot buffers (``--max-loras-per-batch`` slots, each padded to
``--max-lora-rank``, per target module and layer, in the model's dtype) right after the weights
load and *before* it sizes the KV cache from what is left: every slot a user adds is KV memory
taken away. Chameleon keeps adapters in the KV pool itself and allocates no slots. On this CPU
the KV pool is fixed by ``--max-total-tokens``, so the slots would cost stock nothing; under
``--memory-budget equal`` (the default of every comparison) an arm that allocates slots gets

    ``--max-total-tokens`` = budget - ceil(slot bytes / KV bytes per token)

and an arm that keeps adapters in KV memory gets the whole budget. ``KV bytes + slot bytes`` is
then the same for every arm. An arm whose remainder cannot hold the workload's longest request is
*infeasible*: recorded, never run. Slot bytes are those of SGLang's own ``LoRAMemoryPool``
at the pin, built on the ``meta`` device (:func:`slot_bytes`); target modules and rank are read
from the launch command as SGLang reads them. Tensor parallelism 1, dense models (what the
evaluation serves).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set

MEMORY_BUDGETS = ("equal", "as-is")
DTYPE_BYTES: Dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclasses.dataclass(frozen=True)
class ArmMemory:
    """One arm's share of the budget: KV tokens it runs with, bytes of LoRA slot buffers."""

    kv_tokens: int
    slot_bytes: int
    kv_bytes_per_token: int
    feasible: bool = True
    reason: str = ""

    @property
    def total_bytes(self) -> int:
        return self.kv_tokens * self.kv_bytes_per_token + self.slot_bytes

    def record(self) -> Dict[str, Any]:
        return dataclasses.asdict(self) | {"total_bytes": self.total_bytes}


def load_hf_config(model_dir: Path) -> Any:
    """The model's ``config.json`` as an attribute namespace (what SGLang's pool reads of it)."""
    return SimpleNamespace(**_config_json(str(model_dir)))


@functools.lru_cache(maxsize=16)
def _config_json(model_dir: str) -> Dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text())


def kv_bytes_per_token(config: Any, dtype: str) -> int:
    """Bytes one token slot takes in SGLang's MHA KV pool: a K and a V row in every layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * DTYPE_BYTES[dtype]


def adapter_target_modules(adapter_dirs: Iterable[Path]) -> Set[str]:
    """SGLang's normalized target modules of the adapters served at start (their union: what a
    stock server without ``--lora-target-modules`` allocates slots for)."""
    from sglang.srt.lora.utils import get_normalized_target_modules

    names: Set[str] = set()
    for path in adapter_dirs:
        cfg = json.loads((Path(path) / "adapter_config.json").read_text())
        names |= get_normalized_target_modules(cfg["target_modules"])
    return names


def slot_bytes(config: Any, target_modules: Set[str], max_rank: int, slots: int, dtype: str) -> int:
    """Bytes of the LoRA slot buffers SGLang allocates for ``slots`` slots of ``max_rank``: its own
    ``LoRAMemoryPool`` built on the ``meta`` device (shapes without memory) for a model of
    ``config``, tensor parallelism 1, its buffers' bytes summed. Exact at the pin, quirks
    included (embedding and LM-head buffers are each allocated twice there)."""
    import torch
    from sglang.srt.lora.mem_pool import LoRAMemoryPool
    from sglang.srt.runtime_context import get_parallel

    model = _meta_model(config)
    torch_dtype = getattr(torch, dtype)
    with get_parallel().override(tp_size=1, tp_rank=0, attn_tp_size=1):
        pool = LoRAMemoryPool(
            config, slots, torch_dtype, max_rank, set(target_modules), model, "lru", 0
        )
    total = 0
    for buffers in (pool.A_buffer, pool.B_buffer):
        total += sum(t.numel() for layers in buffers.values() for t in layers)
    for buffers in (
        pool.embedding_A_buffer,
        pool.embedding_B_buffer,
        pool.lm_head_A_buffer,
        pool.lm_head_B_buffer,
        pool.new_embeddings_buffer,
    ):
        total += sum(t.numel() for t in buffers.values())
    return total * DTYPE_BYTES[dtype]


def _meta_model(config: Any) -> Any:
    """What ``LoRAMemoryPool`` reads of a base model: its config, its parameters' device
    (``meta``: buffers get shapes, no memory) and its modules (none with layers: dims then come
    from the config, as for a Llama at tensor parallelism 1)."""
    import torch

    model = torch.nn.Module()
    model.config = config
    model.register_parameter("anchor", torch.nn.Parameter(torch.empty(0, device="meta")))
    return model


def allocates_slots(command: Sequence[str]) -> bool:
    """Whether a server launched with ``command`` keeps adapters in SGLang's slot buffers (stock,
    or Chameleon without its cache) rather than in KV memory (Chameleon's adapter cache)."""
    return "--chameleon" not in command or "--no-chameleon-cache" in command


def flag_value(command: Sequence[str], flag: str) -> Optional[str]:
    """The last value given to ``flag`` in ``command`` (``--flag v`` or ``--flag=v``)."""
    values = flag_values(command, flag)
    return values[-1] if values else None


def flag_values(command: Sequence[str], flag: str) -> Optional[List[str]]:
    """The values after the last ``flag`` in ``command`` up to the next ``--option`` (None: the
    flag is absent)."""
    found: Optional[List[str]] = None
    for i, arg in enumerate(command):
        if arg == flag:
            j = i + 1
            while j < len(command) and not command[j].startswith("--"):
                j += 1
            found = list(command[i + 1 : j])
        elif arg.startswith(flag + "="):
            found = [arg.split("=", 1)[1]]
    return found


def served_adapter_dirs(command: Sequence[str]) -> List[Path]:
    """The adapter directories of ``--lora-paths name=path ...``."""
    return [Path(v.split("=", 1)[-1]) for v in flag_values(command, "--lora-paths") or []]


def target_modules_of(command: Sequence[str], config: Any) -> Set[str]:
    """The target modules SGLang allocates slots for under ``command``: ``--lora-target-modules``
    normalized, ``all`` resolved as SGLang resolves it for a Llama (every linear LoRA layer plus
    the embedding and LM head), or without the flag the union of the served adapters'."""
    from sglang.srt.lora.utils import get_normalized_target_modules

    given = flag_values(command, "--lora-target-modules")
    if not given:
        return adapter_target_modules(served_adapter_dirs(command))
    if given == ["all"]:
        if list(getattr(config, "architectures", None) or []) != ["LlamaForCausalLM"]:
            raise ValueError("'--lora-target-modules all' is resolved here for Llama models only")
        return set(LLAMA_ALL_TARGETS)
    return set(get_normalized_target_modules(given))


LLAMA_ALL_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "lm_head")
"""What SGLang at the pin resolves ``--lora-target-modules all`` to for a Llama (its start-up log
says so: ``resolved to ['down_proj', 'embed_tokens', 'gate_up_proj', 'lm_head', ...]``)."""


def max_rank_of(command: Sequence[str]) -> int:
    """``--max-lora-rank``, else the largest rank of the served adapters (SGLang's inference)."""
    given = flag_value(command, "--max-lora-rank")
    if given is not None:
        return int(given)
    ranks = [
        int(json.loads((d / "adapter_config.json").read_text())["r"])
        for d in served_adapter_dirs(command)
    ]
    return max(ranks, default=0)


def arm_memory(command: Sequence[str], budget_tokens: int, min_kv_tokens: int) -> ArmMemory:
    """The memory-equal share of the server launched with ``command`` (see the module contract);
    ``min_kv_tokens``: the fewest KV tokens that serve the workload's longest request."""
    config = load_hf_config(Path(flag_value(command, "--model-path") or "."))
    dtype = flag_value(command, "--dtype") or "bfloat16"
    per_token = kv_bytes_per_token(config, dtype)
    if not allocates_slots(command) or "--enable-lora" not in command:
        return ArmMemory(budget_tokens, 0, per_token)
    slots = int(flag_value(command, "--max-loras-per-batch") or 8)
    rank = max_rank_of(command)
    used = slot_bytes(config, target_modules_of(command, config), rank, slots, dtype)
    kv_tokens = budget_tokens - -(-used // per_token)
    if kv_tokens < max(1, min_kv_tokens):
        return ArmMemory(
            max(kv_tokens, 0),
            used,
            per_token,
            feasible=False,
            reason=f"{slots} slots of rank {rank} take {used / 2**20:.1f} MiB, leaving "
            f"{kv_tokens} of {budget_tokens} KV tokens (the longest request needs {min_kv_tokens})",
        )
    return ArmMemory(kv_tokens, used, per_token)


def max_feasible_slots(command: Sequence[str], budget_tokens: int, min_kv_tokens: int) -> int:
    """The most ``--max-loras-per-batch`` slots ``command`` can have within the budget (slot
    bytes grow linearly with the slot count); 0 when not even one fits."""
    one = arm_memory(with_flag(command, "--max-loras-per-batch", "1"), budget_tokens, 0)
    if one.slot_bytes == 0:
        return 0
    spare_bytes = (budget_tokens - max(1, min_kv_tokens)) * one.kv_bytes_per_token
    return max(0, spare_bytes // one.slot_bytes)


def with_flag(command: Sequence[str], flag: str, value: str) -> List[str]:
    """``command`` with every ``flag`` (and its value) removed and ``flag value`` appended."""
    out: List[str] = []
    skip = False
    for arg in command:
        if skip:
            skip = False
            continue
        if arg == flag:
            skip = True
            continue
        if arg.startswith(flag + "="):
            continue
        out.append(arg)
    return out + [flag, value]


def with_kv_tokens(command: Sequence[str], kv_tokens: int) -> List[str]:
    """``command`` with ``--max-total-tokens kv_tokens`` (the only one)."""
    return with_flag(command, "--max-total-tokens", str(kv_tokens))
