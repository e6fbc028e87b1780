"""A PEFT LoRA adapter directory, checked from its small files before its weights are read."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import FrozenSet, Optional, Sequence

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MAX_CONFIG_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """What ``adapter_config.json`` says of an adapter, and where its weights are."""

    path: Path
    rank: int
    target_modules: FrozenSet[str]
    base_model: Optional[str]
    weights: Path


class AdapterRefused(ValueError):
    """An adapter that must not be served, and why (a client error: HTTP 400)."""


def read_adapter_spec(path: Path) -> AdapterSpec:
    """The spec of the adapter in directory ``path``; ``AdapterRefused`` where it is not a PEFT
    LoRA adapter with its weights: config missing, too large, not JSON, ``peft_type`` not
    ``LORA``, no positive integer rank, no target modules, or no weight file."""
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterRefused(f"{path.name}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterRefused(f"{path.name}: {CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterRefused(f"{path.name}: {CONFIG_FILE} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterRefused(f"{path.name}: peft_type is not LORA")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise AdapterRefused(f"{path.name}: rank r={rank!r} is not a positive integer")
    modules = config.get("target_modules")
    if isinstance(modules, str):
        modules = [modules]
    if not modules or not all(isinstance(m, str) for m in modules):
        raise AdapterRefused(f"{path.name}: no target_modules")
    weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if weights is None:
        raise AdapterRefused(f"{path.name}: no weight file ({' or '.join(WEIGHT_FILES)})")
    base = config.get("base_model_name_or_path")
    return AdapterSpec(
        path, rank, frozenset(modules), base if isinstance(base, str) else None, weights
    )


def refusal_for(spec: AdapterSpec, max_rank: int, served_modules: Sequence[str]) -> Optional[str]:
    """Why a server of ``max_rank`` and LoRA on ``served_modules`` cannot serve ``spec`` (None:
    it can). Module names are compared as PEFT writes them (``q_proj``...) and as SGLang merges
    them (``qkv_proj``, ``gate_up_proj``)."""
    if spec.rank > max_rank:
        return (
            f"{spec.path.name}: rank {spec.rank} is above the server's --max-lora-rank {max_rank}"
        )
    served = set(served_modules)
    if "all" in served:
        return None
    merged = {
        "q_proj": "qkv_proj",
        "k_proj": "qkv_proj",
        "v_proj": "qkv_proj",
        "gate_proj": "gate_up_proj",
        "up_proj": "gate_up_proj",
    }
    missing = sorted(
        m for m in spec.target_modules if m not in served and merged.get(m) not in served
    )
    if missing:
        return f"{spec.path.name}: LoRA on {missing}, not served here (only {sorted(served)})"
    return None
