"""The adapter catalog in SGLang (launcher process): adapters served from ``--chameleon-adapter-
dir`` on their first request, without a restart and without ``--lora-paths``.

- At argument resolution (:func:`catalog_defaults`): the directories must exist; LoRA is turned
  on and what the directories need is filled in where the user left it unset: ``--max-lora-rank``
  (the largest rank found there; 64 for an empty directory) and ``--lora-target-modules all``.
- Per request (:func:`resolve_unregistered_adapters`, around SGLang's
  ``TokenizerManager._resolve_lora_path``): a name SGLang has never loaded is resolved
  (:mod:`chameleon_sglang.catalog`: the name checked, nothing outside the directory read, the
  adapter's config checked against the server's rank and modules) and handed to SGLang as an adapter
  to load, which its own path then loads, registers and serves (the disk read off the scheduler
  loop: ``hooks/adapter_loads.py``). Requests for a name that is not registered wait in turn
  (:class:`~chameleon_sglang.catalog.name_locks.NameLocks`): concurrent first requests cause one
  load. A name whose load failed is refused, naming the error, until its backoff ends (1 s,
  doubling, at most 60 s). A name no directory has, or an adapter that must not be served, is a
  ``ValueError``: HTTP 400 with the reason, nothing else affected. With ``--dp-size > 1`` the
  adapter is loaded on every replica (``hooks/replica_loads.py``) and dispatched like any other.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Tuple

from chameleon_sglang.catalog import AdapterRefused, DirectoryResolver, refusal_for, resolve, survey
from chameleon_sglang.integration import capability
from chameleon_sglang.integration.hooks.host_tier import NO_ROOM, catalog_state, publish_host_tier

logger = logging.getLogger(__name__)

DEFAULT_MAX_RANK = 64
"""``--max-lora-rank`` for an adapter directory that holds no adapter yet."""


def catalog_defaults(server_args: Any, previous: Callable[[Any], None]) -> None:
    """Resolution step: the settings ``--chameleon-adapter-dir`` needs (module docstring)."""
    from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view

    cfg = resolving_view(server_args)
    dirs = list(getattr(cfg, "chameleon_adapter_dir", None) or ())
    if dirs and not getattr(cfg, "chameleon", False):
        logger.warning("--chameleon-adapter-dir needs --chameleon: the directories are not served")
    elif dirs:
        DirectoryResolver([Path(d) for d in dirs])  # a missing directory fails the launch here
        found = survey([Path(d) for d in dirs])
        picks: Dict[str, Any] = {}
        if cfg.enable_lora is None:
            picks["enable_lora"] = True
        if cfg.max_lora_rank is None:
            picks["max_lora_rank"] = found.max_rank or DEFAULT_MAX_RANK
        if cfg.lora_target_modules is None:
            picks["lora_target_modules"] = ["all"]
        if picks:
            declare_resolution(server_args, "chameleon_sglang.catalog_defaults", **picks)
        logger.info(
            "Chameleon adapter catalog: %d adapters in %s (%d entries not PEFT LoRA adapters), "
            "served on first request; %s",
            found.num_adapters,
            dirs,
            found.num_refused,
            picks or "flags as given",
        )
    previous(server_args)


_resolvers: Dict[Tuple[str, ...], DirectoryResolver] = {}


def _resolver(dirs: Tuple[str, ...]) -> DirectoryResolver:
    if dirs not in _resolvers:
        _resolvers[dirs] = DirectoryResolver([Path(d) for d in dirs])
    return _resolvers[dirs]


async def resolve_unregistered_adapters(
    original: Callable, manager: Any, obj: Any, *args: Any, **kwargs: Any
) -> Any:
    """Around ``TokenizerManager._resolve_lora_path``, with ``--chameleon``: host-tier hits and
    misses are counted; requests for an adapter that is not registered wait in turn, so
    concurrent first requests cause one load (SGLang alone loads it once per request); a name
    whose last load failed is refused until its backoff ends; names SGLang has never loaded are
    resolved in the adapter directories first (module docstring)."""
    state = catalog_state(manager)
    names = _requested(obj.lora_path)
    if state is None or not names:
        return await original(manager, obj, *args, **kwargs)
    cold = await manager.lora_registry.get_unregistered_loras(names)
    now = time.monotonic()
    state.host_tier.on_request(names, now)
    publish_host_tier(manager, state)
    if not cold:
        return await original(manager, obj, *args, **kwargs)
    for name in sorted(cold):
        refusal = state.load_failures.refusal(name, now)
        if refusal is not None:
            raise ValueError(f"LoRA adapter {name!r} is not loaded: {refusal}")
    dirs = tuple(getattr(manager.server_args, "chameleon_adapter_dir", None) or ())
    async with state.loading.hold(sorted(cold)):
        offered: List[str] = []
        loading = False
        try:
            for name in sorted(set(cold) - set(manager.lora_ref_cache)) if dirs else ():
                await _offer(manager, _resolver(dirs), name, dirs)
                offered.append(name)
            loading = True
            return await original(manager, obj, *args, **kwargs)
        except Exception as exc:
            for name in offered:  # not loaded: the next request resolves it afresh
                manager.lora_ref_cache.pop(name, None)
            if loading and NO_ROOM not in str(exc):  # no room: not the adapter's failure
                registered = manager.lora_registry.get_all_adapters()
                for name in set(cold) - set(registered):
                    state.load_failures.record(name, str(exc)[:500], time.monotonic())
            raise


def _requested(lora_path: Any) -> set:
    names: Iterable[Any] = [lora_path] if isinstance(lora_path, str) else (lora_path or ())
    return {name for name in names if name is not None}


async def _offer(
    manager: Any, resolver: DirectoryResolver, name: str, dirs: Tuple[str, ...]
) -> None:
    """Make ``name`` an adapter SGLang will load from its directory, or raise ``ValueError``."""
    from sglang.srt.lora.lora_registry import LoRARef

    spec = await asyncio.to_thread(resolve, [resolver], name)
    if spec is None:
        raise ValueError(
            f"LoRA adapter {name!r} is not loaded and is in none of the adapter directories "
            f"{list(dirs)}"
        )
    server_args = capability.resolved(manager.server_args)
    reason = refusal_for(
        spec, int(server_args.max_lora_rank or 0), list(server_args.lora_target_modules or ["all"])
    )
    if reason is not None:
        raise AdapterRefused(f"LoRA adapter {name!r} refused: {reason}")
    ref = LoRARef(lora_name=name, lora_path=str(spec.path), pinned=False)
    manager.lora_ref_cache.setdefault(name, ref)
    logger.info("Chameleon adapter catalog: %s resolved to %s", name, spec.path)
