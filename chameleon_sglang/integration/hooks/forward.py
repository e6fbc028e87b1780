"""Hooks that only hand an SGLang event to one installed Chameleon component.

``call_after("cache", "settle_finished")`` is an AFTER hook that calls
``state.cache.settle_finished()`` where the scheduler has an adapter cache, and returns SGLang's
result unchanged; ``call_before("bridge", "apply_squashes", "batch")`` is a BEFORE hook that
passes the target's ``batch`` argument on. A scheduler without that component is left to SGLang.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from chameleon_sglang.integration.state import state_of


def _installed(owner: Any, component: str) -> Any:
    state = state_of(owner)
    return getattr(state, component) if state is not None else None


def call_after(
    component: str, method: str, *, result_as: Optional[str] = None, **fixed: Any
) -> Callable[..., Any]:
    """An AFTER hook: ``<component>.<method>(**fixed)``, with SGLang's result passed as the
    keyword ``result_as`` where given."""

    def hook(result: Any, owner: Any, *args: Any, **kwargs: Any) -> Any:
        target = _installed(owner, component)
        if target is not None:
            extra = {result_as: result} if result_as is not None else {}
            getattr(target, method)(**fixed, **extra)
        return result

    hook.__qualname__ = hook.__name__ = f"after_{component}_{method}"
    return hook


def call_before(component: str, method: str, argument: str) -> Callable[..., None]:
    """A BEFORE hook: ``<component>.<method>(value)``, ``value`` being the target's first
    argument after ``self`` (or its keyword ``argument``); the call itself is not changed."""

    def hook(owner: Any, *args: Any, **kwargs: Any) -> None:
        target = _installed(owner, component)
        if target is not None:
            getattr(target, method)(args[0] if args else kwargs.get(argument))
        return None

    hook.__qualname__ = hook.__name__ = f"before_{component}_{method}"
    return hook
