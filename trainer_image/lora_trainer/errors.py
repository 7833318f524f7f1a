"""Exceptions that carry a message a user can act on, and control-flow signals.

``str(TrainerError)`` is written to the job's and actor's ``error`` field as-is;
anything else that escapes is turned into a message by :func:`describe`.
"""

from __future__ import annotations

import errno
from typing import Final

from actorgen import schema

DISK_FULL_MESSAGE: Final = (
    "the trainer ran out of disk space{where}; free space or give the training "
    "machine a larger disk, then retry the job"
)


class TrainerError(Exception):
    """A failure whose message is fit for the job document."""


class TransientError(TrainerError):
    """A readable failure that another attempt may not meet (e.g. a service was down).

    Its message reaches the job as-is, but :func:`is_permanent` is False, so the
    reconciler retries within the job's attempt budget.
    """


class DataError(TrainerError):
    """The actor's photos cannot be used (missing, corrupt, none accepted)."""


class ModelLoadError(TrainerError):
    """The base model could not be found, read or is of an unsupported kind."""


class DiskFullError(TrainerError):
    """Too little disk space for the run (checked up front, or ENOSPC on a write)."""


class StopTraining(Exception):  # noqa: N818 - a signal, not an error
    """Base of the reasons to stop early that are not failures."""


class Cancelled(StopTraining):
    """The job's ``cancelRequested`` was set: stop and record ``cancelled``."""


class Superseded(StopTraining):
    """Another attempt or the orchestrator owns the job now: stop without writing."""


class AlreadyCompleted(StopTraining):
    """The job is already ``completed`` (a restart after the final write)."""


class Preempted(BaseException):  # noqa: N818 - a signal, not an error
    """SIGTERM arrived (the VM is being taken away): checkpoint, exit, resume later.

    A BaseException, like KeyboardInterrupt: the SIGTERM handler raises it in the
    middle of any phase, and no ``except Exception`` on the way (a model-load error
    wrapper, a best-effort clean-up) may swallow it or turn it into a failure.
    """


def describe(exc: BaseException) -> str:
    """A one-line, readable message for any exception (never raises)."""
    try:
        if isinstance(exc, TrainerError):
            return str(exc)
        full = _disk_full(exc)
        if full is not None:
            where = f" while writing {full.filename}" if getattr(full, "filename", None) else ""
            return DISK_FULL_MESSAGE.format(where=where)
        name = type(exc).__name__
        if name == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
            return (
                f"the GPU ran out of memory; lower {schema.Field.TRAINING_BATCH_SIZE} or "
                f"{schema.Field.RESOLUTION}, or use a GPU with more memory"
            )
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"internal trainer error: {name}: {text}"[:1000] if text else (
            f"internal trainer error: {name}"
        )
    except Exception:  # noqa: BLE001 - the error path must not fail
        return "internal trainer error"


def _disk_full(exc: BaseException) -> BaseException | None:
    """The ENOSPC error in ``exc``'s chain (libraries wrap OSError), or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return current
        if "No space left on device" in str(current):
            return current
        current = current.__cause__ or current.__context__
    return None


def is_permanent(exc: BaseException) -> bool:
    """True when running the same job again would fail the same way.

    Bad photos, an unloadable base model, a full disk and GPU memory are
    problems of the job or of the configuration: the job ends ``failed`` at
    once. Anything else (a network error, a crash) may pass, so the attempt
    fails and the reconciler retries it within the job's attempt budget.
    """
    try:
        if isinstance(exc, TransientError):
            return False
        if isinstance(exc, (TrainerError, KeyboardInterrupt)):
            return True
        return _disk_full(exc) is not None or type(exc).__name__ == "OutOfMemoryError"
    except Exception:  # noqa: BLE001 - the error path must not fail
        return True
