"""One request as the scheduler sees it, and the engine's answer when asked to admit one."""

from __future__ import annotations

import dataclasses
import enum


class AdmitResult(enum.Enum):
    """The engine's verdict on one admission attempt (its memory and batch-budget check)."""

    ADMITTED = "admitted"
    """The request joined the batch; the scheduler charges its quota."""
    QUEUE_MISFIT = "queue_misfit"
    """This request does not fit memory or the batch budget now: stop its queue for this pass."""
    ADAPTER_MISFIT = "adapter_misfit"
    """Its adapter cannot be given a place, even after evicting every idle adapter."""
    STOP = "stop"
    """The batch is full: end the whole pass."""


@dataclasses.dataclass(eq=False)
class RequestEntry:
    """A request known to the scheduler, waiting or running. Compared by identity.

    The scheduler owns and mutates ``queue``, ``order``, ``charged_output``, ``admitted_s``,
    ``is_running`` and ``is_bypass``; callers read them.
    """

    request_id: str
    adapter_id: str | None
    """``None`` for the base model."""
    input_len: int
    max_new_tokens: int
    predicted_output: int
    rank: int
    """The rank WRS used (the smallest served rank for the base model)."""
    wrs: float
    arrival_s: float
    adapter_tokens: int = 0
    """Adapter memory in KV-token units (0 for the base model), charged to the quota."""
    queue: int = 0
    order: int = 0
    """Position key inside a queue: every waiting queue is sorted by it, ascending."""
    charged_output: int = dataclasses.field(init=False)
    """Output tokens the charge counts: the prediction, raised as the request outgrows it."""
    admitted_s: float | None = None
    is_running: bool = False
    is_bypass: bool = False
    """Admitted ahead of its queue's head by opportunistic bypass (may be squashed)."""

    def __post_init__(self) -> None:
        self.charged_output = self.predicted_output

    @property
    def charge(self) -> int:
        """Tokens this request holds from its queue's quota while running."""
        return self.input_len + self.charged_output + self.adapter_tokens
