"""A request as the scheduler holds it (its ticket), how it ends (its outcome), and the ways
admission refuses it, each with the wait after which trying again makes sense (Retry-After)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from parallama.core.backends import Backend
from parallama.core.prefixes import Blocks


class Outcome(enum.Enum):
    COMPLETED = "completed"
    REJECTED = "rejected"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    FAILED = "failed"


class QueueFullError(Exception):
    """Admission refused: the queue (global or the model's) is full."""

    def __init__(self, scope: str, retry_after: float) -> None:
        super().__init__(f"{scope} queue is full")
        self.scope = scope
        self.retry_after = retry_after


class DeadlineError(Exception):
    """The wait expected for the request already exceeds the deadline it came with."""

    def __init__(self, expected: float, deadline: float, retry_after: float) -> None:
        wait = f"{expected:.1f} s"
        super().__init__(
            f"the expected wait of {wait} exceeds the request's deadline of {deadline:g} s"
        )
        self.retry_after = retry_after


class NoBackendError(Exception):
    """No backend has or may serve the model: waiting would never end."""


class UnavailableError(Exception):
    """Backends serve the model, but none is healthy and taking work now."""

    def __init__(self, model: str, retry_after: float) -> None:
        super().__init__(f"no healthy backend serves model '{model}'")
        self.retry_after = retry_after


@dataclass(eq=False, slots=True)
class Ticket:
    model: str
    client: str
    priority: int
    arrived_at: float
    seq: int
    session: str = ""  # for session affinity
    prefix: Blocks = ()  # its prompt's block hashes, for prefix affinity
    weight: float = 1.0  # its client's share in the fair discipline (an API key's priority)
    backend: Backend | None = None
    dispatched_at: float | None = None
    outcome: Outcome | None = None
    avoid: frozenset[str] = frozenset()  # backends it failed on
    waited: float = 0.0  # seconds in the queue before its latest wait, summed over requeues
    queued_since: float | None = None  # when its current wait began; None while bound
    skipped: int = 0  # times a later request was bound before it (prefix affinity)
    concurrency: int = 0  # requests of its model on its backend once it was sent there
    prefix_slot: int = -1  # prefix affinity: its slot in its backend's memory, until released
    size: int = 0  # bytes it holds while it waits: its body

    def __post_init__(self) -> None:
        self.queued_since = self.arrived_at

    @property
    def queued(self) -> bool:
        return self.backend is None and self.outcome is None

    @property
    def queue_key(self) -> float:
        """When it would have arrived had it waited all its queue time in one go: its queue
        timeout falls `queue_timeout` after this, whatever it spent on backends that failed."""
        assert self.queued_since is not None
        return self.queued_since - self.waited

    def queue_seconds(self, now: float) -> float:
        """Time spent waiting in the gateway's queue, over all its waits: not the time spent
        on a backend that failed before it was requeued."""
        current = 0.0 if self.queued_since is None else now - self.queued_since
        return self.waited + current

    def stop_waiting(self, now: float) -> None:
        if self.queued_since is not None:
            self.waited += now - self.queued_since
            self.queued_since = None
