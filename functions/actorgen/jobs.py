"""Small pure helpers shared by dispatch, reconcile and admin (no I/O here)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from actorgen import schema
from actorgen.schema import AttemptField, Field, JobStatus

if TYPE_CHECKING:
    from google.cloud.firestore import Client as FirestoreClient

    from actorgen.config import Settings


def as_datetime(value: Any) -> datetime | None:
    """A Firestore timestamp (or datetime, or ISO string) as an aware UTC datetime."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        try:
            return as_datetime(datetime.fromisoformat(value))
        except ValueError:
            return None
    return None


def backoff_seconds(failures: int, settings: Settings) -> int:
    """Delay before the next try after ``failures`` consecutive failures (1, 2, ...)."""
    exponent = max(0, failures - 1)
    if exponent > 30:  # 2**30 base-seconds is beyond any sane cap already
        return settings.backoff_max_seconds
    return min(settings.backoff_max_seconds, settings.backoff_base_seconds * 2**exponent)


def next_attempt_at(failures: int, settings: Settings, now: datetime) -> datetime:
    return now + timedelta(seconds=backoff_seconds(failures, settings))


def history_entry(
    attempt: int, outcome: str, error: str | None, executor_job_name: str | None, now: datetime
) -> dict[str, Any]:
    """One ``attemptHistory`` element."""
    return {
        AttemptField.ATTEMPT: attempt,
        AttemptField.EXECUTOR_JOB_NAME: executor_job_name,
        AttemptField.OUTCOME: outcome,
        AttemptField.ERROR: error,
        AttemptField.ENDED_AT: now,
    }


def history(job: Mapping[str, Any]) -> list[dict[str, Any]]:
    raw = job.get(Field.ATTEMPT_HISTORY)
    return [dict(e) for e in raw if isinstance(e, Mapping)] if isinstance(raw, list) else []


def as_int(value: Any, default: int = 0) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return default


def actor_update_for(
    actor: Mapping[str, Any] | None,
    job: Mapping[str, Any],
    job_id: str,
    status: str,
    error: str | None,
) -> dict[str, Any] | None:
    """How the actor follows its job entering ``status``; None when it must not be touched.

    Untouched when the actor is missing, belongs to someone other than the job's
    user, or a newer job is its latest (an old job must not overwrite a new one's
    state).
    """
    if actor is None or actor.get(Field.USER_ID) != job.get(Field.USER_ID):
        return None
    latest = actor.get(Field.LATEST_JOB_ID)
    if latest not in (None, job_id):
        return None
    has_model = schema.actor_has_model(actor)
    update: dict[str, Any] = {
        Field.MODEL_STATUS: schema.model_status_for_job(status, actor_has_model=has_model),
        Field.MODEL_ERROR: (
            schema.clip_error(error) if status in (JobStatus.FAILED, JobStatus.REJECTED) else None
        ),
    }
    if all(actor.get(k) == v for k, v in update.items()):
        return None  # nothing changes: spare the write
    return update


def read_actor(
    db: FirestoreClient, transaction: Any, job: Mapping[str, Any]
) -> tuple[Any, dict[str, Any] | None]:
    """The job's actor (ref, data) read in ``transaction``; (None, None) when unusable."""
    actor_id = job.get(Field.ACTOR_ID)
    if not isinstance(actor_id, str) or not actor_id or "/" in actor_id:
        return None, None
    ref = db.collection(schema.ACTORS).document(actor_id)
    snap = ref.get(transaction=transaction)
    return ref, (snap.to_dict() if snap.exists else None)


def follow_on_actor(
    transaction: Any,
    actor_ref: Any,
    actor: Mapping[str, Any] | None,
    job: Mapping[str, Any],
    job_id: str,
    status: str,
    error: str | None,
) -> None:
    """Write :func:`actor_update_for` to the actor in ``transaction``, when there is one."""
    update = actor_update_for(actor, job, job_id, status, error)
    if actor_ref is not None and update:
        transaction.update(actor_ref, update)
