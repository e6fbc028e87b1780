"""Small stand-ins that let SGLang import on machines without optional GPU-side packages."""

from __future__ import annotations

from typing import Any, NoReturn


class MissingModule:
    """Placeholder for an optional module that is not installed.

    Importing the SGLang module that refers to it succeeds; touching any attribute raises an
    ``ImportError`` that names the module and what needs it.
    """

    def __init__(self, name: str, needed_for: str) -> None:
        self._name = name
        self._needed_for = needed_for

    def __getattr__(self, attr: str) -> NoReturn:
        raise ImportError(
            f"{self._name} is not installed ({self._needed_for} needs it); "
            f"install {self._name} to use this feature"
        )

    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        self.__getattr__("__call__")

    def __repr__(self) -> str:
        return f"<missing module {self._name}>"
