"""Adapter resolvers: a name to a local PEFT LoRA adapter directory.

:class:`AdapterResolver` is the whole interface (an object-store resolver downloads into a local
directory and returns it); :class:`DirectoryResolver` serves ``DIR/<name>/`` of each root, and
never a path outside its root: the name is one plain path component and the directory's real
path (symlinks followed) must stay inside the root's real path.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from chameleon_sglang.catalog.adapter_config import AdapterRefused, AdapterSpec, read_adapter_spec
from chameleon_sglang.catalog.names import check_adapter_name


class AdapterResolver(abc.ABC):
    """Finds adapters by name. Contract: :meth:`resolve` returns a local directory holding a
    PEFT LoRA adapter, or None when this resolver does not know ``name``; it raises
    :class:`AdapterRefused` for a name it knows but must not serve (the reason is shown to the
    client). It is called with a name that :func:`check_adapter_name` accepted."""

    @abc.abstractmethod
    def resolve(self, name: str) -> Optional[Path]:
        """The adapter directory of ``name``, or None."""


class DirectoryResolver(AdapterResolver):
    """``<root>/<name>/`` of the first root that has it (module docstring)."""

    def __init__(self, roots: Sequence[Path]) -> None:
        self.roots = [Path(r) for r in roots]
        for root in self.roots:
            if not root.is_dir():
                raise ValueError(f"adapter directory {root} does not exist")

    def resolve(self, name: str) -> Optional[Path]:
        for root in self.roots:
            candidate = root / name
            if not candidate.exists() and not candidate.is_symlink():
                continue
            real_root, real = root.resolve(), candidate.resolve()
            if not real.is_relative_to(real_root) or real == real_root:
                raise AdapterRefused(f"{name}: its directory leads outside {root}")
            if not real.is_dir():
                raise AdapterRefused(f"{name}: {candidate} is not a directory")
            return real
        return None

    def names(self) -> List[str]:
        """Every entry of the roots that could name an adapter (for listings; unchecked)."""
        return sorted(
            {p.name for root in self.roots for p in root.iterdir() if not p.name.startswith(".")}
        )


def resolve(resolvers: Iterable[AdapterResolver], name: str) -> Optional[AdapterSpec]:
    """The spec of ``name`` from the first resolver that knows it; None when none does.
    ``AdapterRefused`` (a ``ValueError``) for a bad name or an adapter that must not be served."""
    try:
        check_adapter_name(name)
    except ValueError as exc:
        raise AdapterRefused(str(exc)) from exc
    for resolver in resolvers:
        path = resolver.resolve(name)
        if path is not None:
            return read_adapter_spec(Path(path))
    return None


@dataclasses.dataclass(frozen=True)
class Survey:
    """What the adapter directories hold, read from their configs at start-up."""

    num_adapters: int
    max_rank: int
    num_refused: int


def survey(roots: Sequence[Path]) -> Survey:
    """Count the adapters under ``roots`` and their largest rank (configs only: no weights are
    read; entries that are not PEFT LoRA adapters are counted as refused)."""
    ranks, refused = [], 0
    for root in roots:
        for entry in sorted(Path(root).iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                ranks.append(read_adapter_spec(entry).rank)
            except AdapterRefused:
                refused += 1
    return Survey(len(ranks), max(ranks, default=0), refused)
