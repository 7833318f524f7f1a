"""Admin re-dispatch and cancellation (``on_document_updated`` of ``training_jobs``).

Re-dispatch from the Firebase console: open the failed job and change ONE field,
``status``, from ``failed`` to ``queued``. This trigger accepts exactly that change:
it gives the job a fresh budget of attempts (``maxAttempts = attempt +
MAX_ATTEMPTS``; attempt numbers keep counting up so each attempt's executor labels
stay unique), clears ``error``, keeps ``attemptHistory`` (adding a marker), and
releases the job to the dispatcher (``nextAttemptAt`` = now). While another job of
the same actor is queued or running (intake's one-active-job-per-actor rule), the
re-dispatch is refused: ``failed`` is put back and the reason logged.

A change from ``failed`` to ``queued`` is always an admin's (no pipeline path
writes it), so it is a re-dispatch with a fresh budget even when the failed job
still carries a ``nextAttemptAt`` from before (the pipeline clears it whenever it
writes ``failed``, older documents may not).

The dispatcher only takes queued jobs that carry ``nextAttemptAt``; every pipeline
path into ``queued`` sets it, a hand edit does not. So any other hand-made change
of ``status`` to ``queued`` (from completed, rejected, cancelled...) is never
dispatched: this trigger puts the previous status back and logs why. Other edits
are ignored.

``cancelRequested`` set to true cancels the job at once (see
:func:`actorgen.reconcile.cancel_job`); the reconciler retries if this fails.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from actorgen import intake, jobs, schema
from actorgen.schema import AttemptOutcome, Field, JobStatus
from actorgen.txn import run_in_transaction

if TYPE_CHECKING:
    from google.cloud.firestore import Client as FirestoreClient

    from actorgen.config import Settings
    from actorgen.executors import Executor

log = logging.getLogger(__name__)


class AdminAction:
    IGNORE = "ignore"
    REDISPATCH = "redispatch"
    REVERT = "revert"  # a hand-made change to queued that is not allowed
    CANCEL = "cancel"
    REFUSE = "refuse"  # a re-dispatch while the actor has another job in progress


def review_update(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> str:
    """What one update of a job document asks for (pure; most updates ask for nothing)."""
    if not before or not after:
        return AdminAction.IGNORE
    old = before.get(Field.STATUS) or JobStatus.PENDING
    new = after.get(Field.STATUS) or JobStatus.PENDING
    if (
        after.get(Field.CANCEL_REQUESTED)
        and not before.get(Field.CANCEL_REQUESTED)
        and new not in schema.FINAL_JOB_STATUSES
        and new != JobStatus.FAILED
    ):
        return AdminAction.CANCEL
    if new == JobStatus.QUEUED and old == JobStatus.FAILED:
        # Only an admin moves failed -> queued: a re-dispatch, whatever nextAttemptAt says.
        return AdminAction.REDISPATCH
    released = after.get(Field.NEXT_ATTEMPT_AT) is not None
    if new == JobStatus.QUEUED and old != JobStatus.QUEUED and not released:
        return AdminAction.REVERT
    return AdminAction.IGNORE


def redispatch_update(
    job: Mapping[str, Any], settings: Settings, now: datetime
) -> dict[str, Any]:
    """The fields an accepted re-dispatch writes (pure)."""
    attempt = jobs.as_int(job.get(Field.ATTEMPT))
    marker = jobs.history_entry(attempt, AttemptOutcome.ADMIN_REDISPATCH, None, None, now)
    return {
        **schema.status_fields(job, JobStatus.QUEUED, now),
        Field.MAX_ATTEMPTS: attempt + settings.max_attempts,
        Field.ERROR: None,
        Field.NEXT_ATTEMPT_AT: now,
        Field.QUEUED_AT: now,
        Field.ATTEMPT_HISTORY: [*jobs.history(job), marker],
        Field.PROGRESS: 0,
        Field.EXECUTOR_JOB_NAME: None,
        Field.EXECUTOR_STATE: None,
        Field.EXECUTOR_STATE_AT: None,
        Field.HEARTBEAT_AT: None,
        Field.LEASE_OWNER: None,
        Field.LEASE_EXPIRES_AT: None,
        Field.FINISHED_AT: None,
        Field.UPDATED_AT: now,
    }


def handle_job_update(
    job_id: str,
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any] | None,
    settings: Settings,
    *,
    db: FirestoreClient | None = None,
    executor: Executor | None = None,
    now: datetime | None = None,
) -> str:
    """Act on one update event of ``training_jobs/{job_id}``; returns the AdminAction taken."""
    action = review_update(before, after)
    if action == AdminAction.IGNORE:
        return action  # the common case (progress, heartbeats): no I/O at all
    from actorgen import clients, reconcile

    db = db or clients.firestore_client()
    now = now or datetime.now(UTC)
    if action == AdminAction.CANCEL:
        if executor is None and (after or {}).get(Field.STATUS) in reconcile.RECONCILED_STATUSES:
            from actorgen.executors import build_executor

            executor = build_executor(settings.executor_settings())
        done = reconcile.cancel_job(db, executor, job_id, settings, now)
        log.info("cancel of job %s requested: %s", job_id, "done" if done else "deferred")
        return action if done else AdminAction.IGNORE
    return _apply(db, job_id, action, before or {}, after or {}, settings, now)


def _apply(
    db: FirestoreClient,
    job_id: str,
    action: str,
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    settings: Settings,
    now: datetime,
) -> str:
    job_ref = db.collection(schema.TRAINING_JOBS).document(job_id)
    previous_status = before.get(Field.STATUS)
    refused: list[str] = []  # why a re-dispatch was refused (the last try's reason)

    def apply(transaction: Any) -> str:
        snap = job_ref.get(transaction=transaction)
        job = snap.to_dict() if snap.exists else None
        # Only while the hand edit is still what the document says: nothing released
        # the job since (no nextAttemptAt), or nothing at all was written since the
        # edit (updatedAt as in the event; a leftover nextAttemptAt of the failed job
        # does not count). A redelivered event finds the re-dispatch's own write.
        if job is None or job.get(Field.STATUS) != JobStatus.QUEUED:
            return AdminAction.IGNORE
        unreleased = job.get(Field.NEXT_ATTEMPT_AT) is None
        unwritten = (
            action == AdminAction.REDISPATCH
            and job.get(Field.UPDATED_AT) == after.get(Field.UPDATED_AT)
            and job.get(Field.NEXT_ATTEMPT_AT) == after.get(Field.NEXT_ATTEMPT_AT)
        )
        if not (unreleased or unwritten):
            return AdminAction.IGNORE
        if action == AdminAction.REVERT:
            transaction.update(job_ref, {Field.STATUS: previous_status, Field.UPDATED_AT: now})
            return action
        schema.check_transition(JobStatus.FAILED, JobStatus.QUEUED)
        actor_ref, actor = jobs.read_actor(db, transaction, job)
        busy = (intake.blocking_jobs(db, transaction, job[Field.ACTOR_ID], job_id)
                if actor_ref is not None else [])
        if busy:  # intake's one-active-job-per-actor rule: two GPU jobs for one actor
            refused.append(intake.busy_actor_problem(job[Field.ACTOR_ID], busy))
            transaction.update(job_ref, {Field.STATUS: JobStatus.FAILED, Field.UPDATED_AT: now})
            return AdminAction.REFUSE
        transaction.update(job_ref, redispatch_update(job, settings, now))
        jobs.follow_on_actor(transaction, actor_ref, actor, job, job_id, JobStatus.QUEUED, None)
        return action

    result = run_in_transaction(db, apply)
    if result == AdminAction.REVERT:
        log.warning(
            "job %s: status was set to queued by hand from %r; only failed jobs can be "
            "re-dispatched, so %r was restored", job_id, previous_status, previous_status,
        )
    elif result == AdminAction.REFUSE:
        log.warning("job %s: re-dispatch refused, the job stays failed: %s", job_id, refused[-1])
    elif result == AdminAction.REDISPATCH:
        log.info("job %s re-dispatched by an admin", job_id)
        from actorgen import tasks

        tasks.nudge_dispatcher(job_id, settings)
    return result
