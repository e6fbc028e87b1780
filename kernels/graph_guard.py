"""A guard for CUDA-graph discipline of a forward path, usable on a CPU.

A forward that is captured into a CUDA graph must not synchronise with the host (a device value
read on the host, a copy between devices, a tensor built from Python data: each either fails
under capture or bakes one batch's values into every replay), and its kernels must read
metadata at addresses that stay fixed from capture to replay. :class:`GraphDisciplineGuard`
checks both while active:

- a torch function mode and a torch dispatch mode refuse ``.item()``/``.tolist()``/``.cpu()``/
  ``.numpy()``, ``torch.tensor``/``torch.as_tensor`` and Python number conversions of tensors,
  ``aten._local_scalar_dense``, ``aten.lift_fresh`` and copies between devices, raising
  :class:`GraphDisciplineError` at the offending call;
- kernel launchers announce each launch with :func:`launch` and the tensors of fixed address it
  reads (tables, batch metadata, weight storages); the guard records their addresses per launch
  site, and :meth:`GraphDisciplineGuard.addresses` is compared across batches by the caller.
  Inside :func:`launch` the checks pause (a Triton launch, interpreted or not, is opaque).

Outside a guard, :func:`launch` costs one global read.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Set, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

FORBIDDEN_FUNCTIONS = frozenset(
    {
        "item",
        "tolist",
        "cpu",
        "numpy",
        "tensor",
        "as_tensor",
        "__int__",
        "__float__",
        "__bool__",
        "__index__",
        "nonzero",
        "unique",
        "masked_select",
    }
)
FORBIDDEN_OPS = frozenset(
    {
        "aten._local_scalar_dense.default",
        "aten.lift_fresh.default",
        "aten.lift_fresh_copy.default",
        "aten.nonzero.default",
        "aten.masked_select.default",
    }
)


class GraphDisciplineError(RuntimeError):
    """The guarded forward did something a CUDA graph cannot replay."""


class _Functions(TorchFunctionMode):
    def __init__(self, guard: GraphDisciplineGuard) -> None:
        super().__init__()
        self.guard = guard

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if not self.guard.paused and name in FORBIDDEN_FUNCTIONS:
            self.guard.fail(f"{name}() in the forward path")
        return func(*args, **(kwargs or {}))


class _Dispatch(TorchDispatchMode):
    def __init__(self, guard: GraphDisciplineGuard) -> None:
        super().__init__()
        self.guard = guard

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.guard.paused:
            name = str(func)
            if name in FORBIDDEN_OPS:
                self.guard.fail(f"{name} in the forward path")
            if name.startswith(("aten._to_copy", "aten.copy_")):
                devices = {
                    a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)
                }
                target = kwargs.get("device")
                if len(devices) > 1 or (target is not None and {torch.device(target)} != devices):
                    self.guard.fail(f"{name} between devices in the forward path")
        return func(*args, **kwargs)


class GraphDisciplineGuard:
    """Active between ``__enter__`` and ``__exit__`` (see the module docstring)."""

    def __init__(self) -> None:
        self.paused = False
        self.launches: List[Tuple[str, FrozenSet[int]]] = []
        self._modes: List[Any] = []

    def fail(self, what: str) -> None:
        raise GraphDisciplineError(what)

    def __enter__(self) -> GraphDisciplineGuard:
        global _ACTIVE
        if _ACTIVE is not None:
            raise RuntimeError("graph discipline guards do not nest")
        self._modes = [_Functions(self), _Dispatch(self)]
        for mode in self._modes:
            mode.__enter__()
        _ACTIVE = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _ACTIVE
        _ACTIVE = None
        for mode in reversed(self._modes):
            mode.__exit__(None, None, None)
        self._modes = []

    def addresses(self) -> Dict[str, Set[int]]:
        """Per launch site, every fixed-tensor address its launches read."""
        seen: Dict[str, Set[int]] = {}
        for site, pointers in self.launches:
            seen.setdefault(site, set()).update(pointers)
        return seen


_ACTIVE: Optional[GraphDisciplineGuard] = None


@contextlib.contextmanager
def _paused(
    guard: GraphDisciplineGuard, site: str, fixed: Tuple[torch.Tensor, ...]
) -> Iterator[None]:
    guard.launches.append((site, frozenset(t.data_ptr() for t in fixed)))
    guard.paused = True
    try:
        yield
    finally:
        guard.paused = False


def launch(site: str, *fixed: torch.Tensor) -> Any:
    """Context of one kernel launch reading the tensors ``fixed`` (see the module docstring)."""
    guard = _ACTIVE
    if guard is None:
        return contextlib.nullcontext()
    return _paused(guard, site, fixed)
