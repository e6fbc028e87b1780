"""Adapter names a request may use to reach a file: one plain path component."""

from __future__ import annotations

MAX_NAME_LENGTH = 255


def check_adapter_name(name: object) -> str:
    """``name`` if it can name an adapter directory inside an adapter root, else ``ValueError``
    saying why: a non-empty string of at most 255 characters, one path component (no ``/`` or
    ``\\``), not ``.``/``..`` and not hidden (no leading dot), no NUL or other control
    character."""
    if not isinstance(name, str) or not name:
        raise ValueError("an adapter name must be a non-empty string")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"adapter name longer than {MAX_NAME_LENGTH} characters")
    if "/" in name or "\\" in name:
        raise ValueError(f"adapter name {name!r} is not one path component")
    if name.startswith("."):
        raise ValueError(f"adapter name {name!r} starts with a dot")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError("adapter name holds a control character")
    return name
