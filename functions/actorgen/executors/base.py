"""The executor interface the dispatcher and the reconciler code against.

An executor runs one attempt of a training job (``python -m lora_trainer
--job-id ID --attempt N``) somewhere with a GPU and reports its state. Every
executor job is labelled with the job id and the attempt, so that
:meth:`Executor.submit` can look before it creates: a retried or duplicated
dispatch never starts a second GPU job for the same attempt.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol, runtime_checkable


class ExecutorState(str, enum.Enum):
    """Executor-neutral state of one executor job."""

    QUEUED = "queued"  # accepted, waiting for a machine / process not started yet
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # e.g. FLEX_START capacity never arrived, or the job timed out queued
    UNKNOWN = "unknown"  # a state we do not model (paused, unspecified): not terminal

    def __str__(self) -> str:
        # The plain value, so f-strings and Firestore writes never see "ExecutorState.X".
        return self.value

    @property
    def is_terminal(self) -> bool:
        """The executor job will not change any more."""
        return self in _TERMINAL

    @property
    def is_failure(self) -> bool:
        """Terminal without success: the reconciler counts a failed attempt."""
        return self in _FAILURES

    @property
    def is_active(self) -> bool:
        """Not terminal: the job may still occupy (or be about to occupy) a GPU."""
        return not self.is_terminal


_FAILURES = frozenset({ExecutorState.FAILED, ExecutorState.CANCELLED, ExecutorState.EXPIRED})
_TERMINAL = _FAILURES | {ExecutorState.SUCCEEDED}


@dataclass(frozen=True)
class ExecutorJob:
    """A snapshot of one executor job.

    ``name`` is what :meth:`Executor.get` and :meth:`Executor.cancel` take (for
    Vertex the full resource name); store it on the job document.
    """

    name: str
    state: ExecutorState
    error: str | None = None  # human-readable, set for failures when the executor says why
    raw_state: str = ""  # the executor's own state name, for logs and the job document


@dataclass(frozen=True)
class SubmitRequest:
    """One attempt to run. The trainer's arguments come from ``schema.trainer_args``."""

    job_id: str
    attempt: int
    user_id: str
    #: Extra environment for this attempt; schema ENV_* values always win.
    env: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not self.job_id:
            raise ValueError("SubmitRequest.job_id must not be empty")
        if isinstance(self.attempt, bool) or not isinstance(self.attempt, int) or self.attempt < 1:
            raise ValueError(f"SubmitRequest.attempt must be an int >= 1, got {self.attempt!r}")
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))


class ExecutorError(Exception):
    """An executor call failed.

    ``retryable`` is True for transient trouble (API unavailable, timeouts,
    quota): try again later, nothing needs fixing. False means a configuration
    or permission problem that the message names: retrying will not help.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable

    def __str__(self) -> str:
        return self.message


class ExecutorNotFound(ExecutorError):
    """The executor job does not exist (any more)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


@runtime_checkable
class Executor(Protocol):
    """What the dispatcher and reconciler need from a place that runs trainers."""

    kind: str  # "vertex" | "local"

    def find(self, job_id: str, attempt: int) -> ExecutorJob | None:
        """The executor job of this attempt, looked up by its labels; None if there is none."""
        ...

    def submit(self, request: SubmitRequest) -> ExecutorJob:
        """Start the attempt unless it already exists (idempotent: find() first)."""
        ...

    def get(self, name: str) -> ExecutorJob:
        """The current state; raises :class:`ExecutorNotFound` if the job is gone."""
        ...

    def cancel(self, name: str) -> None:
        """Stop the job. Idempotent: cancelling a finished or missing job is a no-op."""
        ...
