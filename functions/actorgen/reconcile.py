"""The reconciler and the sweepers (run every minute with the dispatcher).

:func:`run_maintenance` reconciles first, then dispatches, then sweeps: the upload
sweep lists Storage and may decode photos, so it runs last and under a time and
object budget (``upload_sweep_max_seconds``, ``upload_sweep_max_objects``), and a
large bucket can never starve reconciliation or dispatch.

Firestore and Storage triggers of the Python SDK cannot be retried, so a trigger
that failed would lose work. The sweeper therefore takes in job documents still
``pending`` a while after creation, and validates uploads that have no verdict a
while after upload.

The reconciler compares each active job with its executor job. :func:`decide` is
the pure decision; :func:`reconcile_job` applies it in a transaction that re-reads
the job and decides again, so a trainer's ``completed`` (or a fresh heartbeat)
written meanwhile always wins. The transaction acts only while the job is still on
the attempt and executor job the executor's state was read for: if another pass
retried it, an admin re-dispatched it or a new attempt was submitted meanwhile, the
state read belongs to an attempt that is over, and nothing is written. A decision
re-made in the transaction that needs the executor job stopped (a stale heartbeat,
a cancel request written meanwhile) is recorded only after it was stopped. A failed attempt (executor failed, cancelled,
expired or lost; executor succeeded without the trainer writing ``completed``; or
the trainer's heartbeat went stale while the executor still runs it) is recorded
in ``attemptHistory`` and re-queued with exponential backoff (``nextAttemptAt``)
while attempts remain; then the job is ``failed``. The executor's own text (log
tails, resource paths) stays in ``attemptHistory`` for admins; the job's ``error``
and the actor's ``modelError`` get the trainer's own message when it wrote one,
else a short sentence (:data:`USER_REASONS`). A stale attempt's executor job is
cancelled first, so a zombie never holds a GPU.

Liveness: a running attempt is stale when nothing happened for
``heartbeat_timeout_seconds`` since the latest of the trainer's heartbeat, its
start, the dispatch and ``executorStateAt`` (when the executor state last
changed). So a job that waited in the executor's queue (Vertex PENDING, FLEX_START
or SPOT provisioning), or whose worker was restarted after a preemption, gets a
full timeout from the moment it is seen running.

A ``completed`` job whose executor job is still active well after ``finishedAt``
(an older attempt finished while a newer one was already submitted) has that
executor job cancelled (:func:`stop_leftover_executor_jobs`).

``cancelRequested`` ends a job as ``cancelled``: directly while it is pending or
queued; after the executor job is cancelled once it has one. A ``dispatching`` job
is cancelled on the next pass, once its submission is recorded (or by the
dispatcher, instead of re-driving it, once its lease expired).
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from actorgen import jobs, logs, schema
from actorgen.schema import AttemptOutcome, Field, JobStatus
from actorgen.txn import run_in_transaction

if TYPE_CHECKING:
    from google.cloud.firestore import Client as FirestoreClient
    from google.cloud.storage import Bucket

    from actorgen.config import Settings
    from actorgen.executors import Executor, ExecutorJob

log = logging.getLogger(__name__)

#: Jobs the reconciler checks against the executor (``dispatching`` is the dispatcher's).
RECONCILED_STATUSES: Final = schema.ACTIVE_JOB_STATUSES - {JobStatus.DISPATCHING}
#: Statuses that end directly on cancelRequested (no executor job exists).
CANCEL_DIRECTLY: Final = frozenset({JobStatus.PENDING, JobStatus.QUEUED})
#: Uploads validated per sweep at most (each costs a download, a decode, a detection).
MAX_SWEPT_UPLOADS: Final = 20
#: Server-side filter of the upload sweep's listing (Cloud Storage ``matchGlob``): uploads
#: only, never the models and samples under ``.../models/``. Emulators may ignore it; the
#: sweep filters by :func:`schema.parse_upload_path` as well.
UPLOAD_GLOB: Final = "users/*/actors/*/images/*"
#: A completed job's executor job may still run this long after ``finishedAt`` (the
#: trainer is exiting); after that it is a leftover and is cancelled.
COMPLETED_GRACE_SECONDS: Final = 600
#: Completed jobs checked for a leftover executor job: finished within this window...
COMPLETED_WINDOW_SECONDS: Final = 3600
#: ...at most this many per pass, oldest first from where the last pass stopped.
COMPLETED_CHECK_LIMIT: Final = 50
#: Pending jobs taken in by one sweep at most, of at most this many read (shuffled, so
#: a job that keeps failing cannot hold the others back), within this many seconds.
MAX_SWEPT_JOBS: Final = 20
PENDING_SCAN_LIMIT: Final = 200
PENDING_SWEEP_SECONDS: Final = 30
#: Longest the reconcile step of the scheduled pass runs; the rest is dispatch's, the
#: sweeps' and a margin under the function's timeout (run_maintenance).
RECONCILE_SECONDS: Final = 90
MAINTENANCE_MARGIN_SECONDS: Final = 30

#: What the app shows (job ``error``, actor ``modelError``) when a failed attempt ends a
#: job and the trainer left no message of its own; the raw text is in ``attemptHistory``.
USER_REASONS: Final = {
    AttemptOutcome.EXECUTOR_FAILED: "the training machine stopped unexpectedly",
    AttemptOutcome.LOST: "the training job disappeared from the training service",
    AttemptOutcome.NO_COMPLETION: "the training machine finished without producing a model",
    AttemptOutcome.STALE: "the trainer stopped responding",
}
#: Sharper wording for some executor endings (``ExecutorState`` values).
EXECUTOR_STATE_REASONS: Final = {
    "expired": "no training machine became available in time",
    "cancelled": "the training machine was stopped by the training service",
}
USER_ADVICE: Final = "Start the training again or contact support."


class Action:
    NONE = "none"
    OBSERVE = "observe"  # only the executor's state changed: record it
    RETRY = "retry"  # failed attempt, attempts remain: re-queue with backoff
    FAIL = "fail"  # failed attempt, none remain
    CANCEL = "cancel"


@dataclass(frozen=True)
class Decision:
    action: str
    outcome: str | None = None  # AttemptOutcome of a failed attempt
    error: str | None = None  # the attempt's error (executor's message where it gave one)
    cancel_executor: bool = False  # stop the executor job before recording
    #: What the job and actor show if this attempt ends the job (short; never raw executor text).
    message: str | None = None


NOTHING: Final = Decision(Action.NONE)


def heartbeat_reference(job: Mapping[str, Any]) -> datetime | None:
    """Latest sign of life: the trainer's heartbeat or start, the dispatch, or the last
    change of the executor's state (a job that waited in the executor's queue, or a
    restarted worker, is counted from when it was seen running)."""
    times = [
        jobs.as_datetime(job.get(name))
        for name in (
            Field.HEARTBEAT_AT, Field.STARTED_AT, Field.DISPATCHED_AT, Field.EXECUTOR_STATE_AT
        )
    ]
    present = [t for t in times if t is not None]
    return max(present) if present else None


def decide(
    job: Mapping[str, Any],
    executor_job: ExecutorJob | None,
    settings: Settings,
    now: datetime,
) -> Decision:
    """What to do with an active job given its executor job (None: the executor has none)."""
    from actorgen.executors import ExecutorState

    status = job.get(Field.STATUS)
    if status not in RECONCILED_STATUSES:
        return NOTHING  # completed (the trainer's word wins), final, or not dispatched yet
    if job.get(Field.CANCEL_REQUESTED):
        return Decision(Action.CANCEL, AttemptOutcome.CANCELLED, "cancelled on request",
                        cancel_executor=executor_job is not None)
    name = job.get(Field.EXECUTOR_JOB_NAME)
    if executor_job is None:
        error = (
            f"the executor no longer knows the training job {name}"
            if name
            else "the training job was not found at the executor"
        )
        return _failed_attempt(job, AttemptOutcome.LOST, error)
    state = executor_job.state
    if state == ExecutorState.SUCCEEDED:
        return _failed_attempt(
            job,
            AttemptOutcome.NO_COMPLETION,
            "the training job ended without the trainer reporting completion"
            + (f" ({executor_job.error})" if executor_job.error else ""),
        )
    if state.is_failure:
        # The trainer records why it crashed on the job before exiting non-zero;
        # that says more than the executor's "exited with status 1", and it is
        # written for the user, so it is also what the job shows if it fails.
        trainer_error = job.get(Field.ERROR) or None
        error = (
            trainer_error
            or executor_job.error
            or f"the executor reported {executor_job.raw_state or state}"
        )
        reason = EXECUTOR_STATE_REASONS.get(state.value)
        return _failed_attempt(
            job,
            AttemptOutcome.EXECUTOR_FAILED,
            error,
            message=str(trainer_error) if trainer_error else None,
            reason=reason,
        )
    observed = executor_job.raw_state or state.value
    if job.get(Field.EXECUTOR_STATE) != observed:
        # First seen running after waiting in the executor's queue, or running again
        # after a preemption: record it (executorStateAt), which restarts the liveness
        # clock. Never stale on the pass that first sees the new state.
        return Decision(Action.OBSERVE)
    if state != ExecutorState.QUEUED:  # running (or unknown): the trainer must be alive
        reference = heartbeat_reference(job)
        if reference is not None:
            silent = (now - reference).total_seconds()
            if silent > settings.heartbeat_timeout_seconds:
                return _failed_attempt(
                    job,
                    AttemptOutcome.STALE,
                    f"the trainer stopped reporting (no heartbeat for {silent / 60:.0f} "
                    f"minutes, limit {settings.heartbeat_timeout_seconds / 60:.0f})",
                    cancel_executor=True,
                )
    if not name and executor_job.name:
        return Decision(Action.OBSERVE)
    return NOTHING


def _failed_attempt(
    job: Mapping[str, Any],
    outcome: str,
    error: str,
    *,
    cancel_executor: bool = False,
    message: str | None = None,
    reason: str | None = None,
) -> Decision:
    """A failed attempt: ``error`` is kept for admins; ``message`` (the trainer's own
    words) or ``reason`` (a short sentence) is what the user sees if the job fails."""
    attempt = jobs.as_int(job.get(Field.ATTEMPT))
    max_attempts = jobs.as_int(job.get(Field.MAX_ATTEMPTS), 1)
    action = Action.RETRY if attempt < max_attempts else Action.FAIL
    if message is None:
        message = f"{reason or USER_REASONS.get(outcome, 'the training failed')}. {USER_ADVICE}"
    return Decision(action, outcome, error, cancel_executor, message)


def failure_message(job: Mapping[str, Any], error: str) -> str:
    """The job's (and actor's) error when it fails for good."""
    attempts = jobs.as_int(job.get(Field.ATTEMPT))
    tries = f"after {attempts} attempts" if attempts > 1 else "in its only attempt"
    return f"Training failed {tries}: {error}"


def apply_update(
    job: Mapping[str, Any],
    decision: Decision,
    executor_job: ExecutorJob | None,
    settings: Settings,
    now: datetime,
) -> tuple[str | None, dict[str, Any]]:
    """The new status (None: unchanged) and the job fields to write for ``decision``."""
    observed = (executor_job.raw_state or executor_job.state.value) if executor_job else None
    name = job.get(Field.EXECUTOR_JOB_NAME) or (executor_job.name if executor_job else None)
    # When the executor's state changes, remember when: the liveness clock restarts there.
    stamp = {Field.EXECUTOR_STATE_AT: now} if observed != job.get(Field.EXECUTOR_STATE) else {}
    if decision.action == Action.OBSERVE:
        return None, {
            Field.EXECUTOR_STATE: observed,
            **stamp,
            Field.EXECUTOR_JOB_NAME: name,
            Field.UPDATED_AT: now,
        }
    if decision.action == Action.NONE:
        return None, {}
    attempt = jobs.as_int(job.get(Field.ATTEMPT))
    entry = jobs.history_entry(attempt, decision.outcome or "", decision.error, name, now)
    common = {
        Field.ATTEMPT_HISTORY: [*jobs.history(job), entry],
        Field.EXECUTOR_STATE: observed,
        **stamp,
        Field.UPDATED_AT: now,
    }
    if decision.action == Action.CANCEL:
        return JobStatus.CANCELLED, {
            **common,
            **schema.status_fields(job, JobStatus.CANCELLED, now),
            Field.FINISHED_AT: now,
        }
    if decision.action == Action.RETRY:
        return JobStatus.QUEUED, {
            **common,
            **schema.status_fields(job, JobStatus.QUEUED, now),
            Field.NEXT_ATTEMPT_AT: jobs.next_attempt_at(attempt, settings, now),
            # The next attempt starts afresh: its executor job, progress and heartbeat.
            Field.EXECUTOR_JOB_NAME: None,
            Field.PROGRESS: 0,
            Field.HEARTBEAT_AT: None,
            Field.ERROR: None,
        }
    # The raw error is in the history entry; the job and actor get the short message.
    error = schema.clip_error(
        failure_message(job, decision.message or decision.error or "unknown error")
    )
    return JobStatus.FAILED, {
        **common,
        **schema.status_fields(job, JobStatus.FAILED, now),
        Field.ERROR: error,
        Field.NEXT_ATTEMPT_AT: None,  # failed is never due; a re-dispatch releases it again
        Field.FINISHED_AT: now,
    }


# --------------------------------------------------------------------------- I/O
@dataclass
class MaintenanceReport:
    taken_in: list[str] = field(default_factory=list)
    validated: list[str] = field(default_factory=list)
    reconciled: dict[str, str] = field(default_factory=dict)  # job id -> action
    cancelled: list[str] = field(default_factory=list)
    dispatched: list[str] = field(default_factory=list)
    #: Completed jobs whose leftover executor job (a newer attempt) was cancelled.
    stopped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def executor_job_of(executor: Executor, job_id: str, job: Mapping[str, Any]) -> ExecutorJob | None:
    """The job's executor job by name, else by its labels; None when there is none.

    Raises ExecutorError (other than not-found) when the executor cannot be asked.
    """
    from actorgen.executors import ExecutorNotFound

    name = job.get(Field.EXECUTOR_JOB_NAME)
    try:
        if name:
            return executor.get(name)
        attempt = jobs.as_int(job.get(Field.ATTEMPT))
        return executor.find(job_id, attempt) if attempt >= 1 else None
    except ExecutorNotFound:
        return None


def reconcile_job(
    db: FirestoreClient,
    executor: Executor,
    job_id: str,
    settings: Settings,
    now: datetime,
) -> str:
    """Check one job against its executor job and record the outcome; returns the Action."""
    from actorgen.executors import ExecutorError

    job_ref = db.collection(schema.TRAINING_JOBS).document(job_id)
    snap = job_ref.get()
    if not snap.exists:
        return Action.NONE
    job = snap.to_dict() or {}
    if job.get(Field.STATUS) not in RECONCILED_STATUSES:
        return Action.NONE
    try:
        executor_job = executor_job_of(executor, job_id, job)
    except ExecutorError as err:
        log.warning("job %s: cannot read executor state (%s); retrying next pass", job_id, err)
        return Action.NONE
    decision = decide(job, executor_job, settings, now)
    if decision.action == Action.NONE:
        return Action.NONE
    seen = _Seen(jobs.as_int(job.get(Field.ATTEMPT)), job.get(Field.EXECUTOR_JOB_NAME))
    cancelled = False
    while True:
        if decision.cancel_executor and executor_job is not None and not cancelled:
            # Stop it before recording: if cancel fails we retry next pass, never leak a GPU.
            try:
                executor.cancel(executor_job.name)
            except ExecutorError as err:
                log.warning("job %s: cancelling %s failed (%s); retrying next pass",
                            job_id, executor_job.name, err)
                return Action.NONE
            cancelled = True
        action, decision = _record(db, job_id, executor_job, settings, now, seen, cancelled)
        if action != _CANCEL_FIRST:
            return action
        # The decision re-made on the fresh document needs the executor job stopped
        # (a stale heartbeat or a cancel request written meanwhile): stop it, record again.


#: _record: the fresh decision needs the executor job cancelled, which has not happened.
_CANCEL_FIRST: Final = "cancel-first"


@dataclass(frozen=True)
class _Seen:
    """The attempt and executor job a reconcile decision was made about."""

    attempt: int
    executor_job_name: str | None

    def still_current(self, job: Mapping[str, Any], executor_job: ExecutorJob | None) -> bool:
        """Whether ``job`` (re-read in the transaction) is still on that attempt and
        executor job: a retry, a re-dispatch or a new submission since makes the
        executor state read outside the transaction someone else's."""
        if jobs.as_int(job.get(Field.ATTEMPT)) != self.attempt:
            return False
        recorded = job.get(Field.EXECUTOR_JOB_NAME)
        if recorded == self.executor_job_name:
            return True
        # Found by its labels before the dispatcher recorded its name: the same job.
        return (
            self.executor_job_name is None
            and executor_job is not None
            and recorded == executor_job.name
        )


def _record(
    db: FirestoreClient,
    job_id: str,
    executor_job: ExecutorJob | None,
    settings: Settings,
    now: datetime,
    seen: _Seen,
    executor_cancelled: bool,
) -> tuple[str, Decision]:
    """Apply the decision, re-made on the fresh document, in a transaction.

    Returns (Action, decision); :data:`_CANCEL_FIRST` (nothing written) when the fresh
    decision needs the executor job cancelled and ``executor_cancelled`` is False.
    """
    job_ref = db.collection(schema.TRAINING_JOBS).document(job_id)

    def record(transaction: Any) -> tuple[str, Decision]:
        snap = job_ref.get(transaction=transaction)
        job = snap.to_dict() if snap.exists else None
        if job is None or not seen.still_current(job, executor_job):
            return Action.NONE, NOTHING  # moved on to another attempt: not ours to judge
        # Decide again on the fresh document: completed or a new heartbeat wins.
        decision = decide(job, executor_job, settings, now)
        if decision.cancel_executor and executor_job is not None and not executor_cancelled:
            return _CANCEL_FIRST, decision
        status, update = apply_update(job, decision, executor_job, settings, now)
        if not update:
            return Action.NONE, decision
        actor_ref, actor = jobs.read_actor(db, transaction, job)
        if status is not None:
            schema.check_transition(job.get(Field.STATUS), status)
        transaction.update(job_ref, update)
        if status is not None:
            jobs.follow_on_actor(transaction, actor_ref, actor, job, job_id, status,
                                 update.get(Field.ERROR))
        return decision.action, decision

    action, decision = run_in_transaction(db, record)
    if action not in (Action.NONE, Action.OBSERVE, _CANCEL_FIRST):
        log.info("job %s reconciled: %s", job_id, action)
    return action, decision


def cancel_job(
    db: FirestoreClient,
    executor: Executor | None,
    job_id: str,
    settings: Settings,
    now: datetime,
) -> bool:
    """Act on ``cancelRequested``; True when the job is now ``cancelled``."""
    job_ref = db.collection(schema.TRAINING_JOBS).document(job_id)
    snap = job_ref.get()
    job = snap.to_dict() if snap.exists else None
    if job is None or not job.get(Field.CANCEL_REQUESTED):
        return False
    status = job.get(Field.STATUS) or JobStatus.PENDING
    if status in RECONCILED_STATUSES:
        if executor is None:
            return False
        return reconcile_job(db, executor, job_id, settings, now) == Action.CANCEL
    if status not in CANCEL_DIRECTLY:
        return False  # dispatching: next pass; final or failed: nothing to cancel

    def cancel(transaction: Any) -> bool:
        fresh_snap = job_ref.get(transaction=transaction)
        fresh = fresh_snap.to_dict() if fresh_snap.exists else None
        if fresh is None or (fresh.get(Field.STATUS) or JobStatus.PENDING) not in CANCEL_DIRECTLY:
            return False
        actor_ref, actor = jobs.read_actor(db, transaction, fresh)
        schema.check_transition(fresh.get(Field.STATUS), JobStatus.CANCELLED)
        transaction.update(
            job_ref,
            {
                **schema.status_fields(fresh, JobStatus.CANCELLED, now),
                Field.FINISHED_AT: now,
                Field.UPDATED_AT: now,
                Field.NEXT_ATTEMPT_AT: None,
            },
        )
        jobs.follow_on_actor(transaction, actor_ref, actor, fresh, job_id, JobStatus.CANCELLED,
                             None)
        return True

    return run_in_transaction(db, cancel)


def run_reconcile_pass(
    settings: Settings,
    *,
    db: FirestoreClient,
    executor: Executor,
    now: datetime,
    report: MaintenanceReport | None = None,
    deadline: float | None = None,
    timer: Callable[[], float] = time.monotonic,
) -> MaintenanceReport:
    """Reconcile every active job, and end cancelled pending/queued jobs.

    Stops at ``deadline`` (``timer`` units; None: no limit). Active jobs are taken in
    random order, so a pass cut short does not always leave the same ones for later.
    """
    from google.cloud.firestore_v1.base_query import FieldFilter

    report = report or MaintenanceReport()
    jobs_ref = db.collection(schema.TRAINING_JOBS)

    def out_of_time() -> bool:
        if deadline is not None and timer() >= deadline:
            log.warning("reconcile pass reached its deadline; the next pass goes on")
            return True
        return False

    active = jobs_ref.where(filter=FieldFilter(Field.STATUS, "in", sorted(RECONCILED_STATUSES)))
    snaps = list(active.stream())
    random.shuffle(snaps)
    for snap in snaps:
        if out_of_time():
            return report
        seen = snap.to_dict() or {}
        with logs.context(job_id=snap.id, user_id=seen.get(Field.USER_ID),
                          attempt=seen.get(Field.ATTEMPT)):
            try:
                action = reconcile_job(db, executor, snap.id, settings, now)
            except Exception as err:  # one bad job must not stop the pass
                log.exception("reconciling job %s failed", snap.id)
                report.errors.append(f"{snap.id}: {err}")
                continue
        if action != Action.NONE:
            report.reconciled[snap.id] = action
    waiting = jobs_ref.where(filter=FieldFilter(Field.STATUS, "in", sorted(CANCEL_DIRECTLY)))
    for snap in waiting.stream():
        requested = (snap.to_dict() or {}).get(Field.CANCEL_REQUESTED)
        if requested and not out_of_time() and cancel_job(db, executor, snap.id, settings, now):
            report.cancelled.append(snap.id)
    if out_of_time():
        return report
    try:
        report.stopped.extend(stop_leftover_executor_jobs(db=db, executor=executor, now=now))
    except Exception as err:  # best effort: the next pass looks again
        log.exception("checking completed jobs for leftover executor jobs failed")
        report.errors.append(f"leftover executor jobs: {err}")
    return report


def completed_since(jobs_ref: Any, start: datetime, now: datetime, limit: int) -> Any:
    """Jobs completed from ``start`` until the grace ago, oldest first (index:
    firestore.indexes.json)."""
    from datetime import timedelta

    from google.cloud.firestore_v1.base_query import FieldFilter

    return (
        jobs_ref.where(filter=FieldFilter(Field.STATUS, "==", JobStatus.COMPLETED))
        .where(filter=FieldFilter(Field.FINISHED_AT, ">=", start))
        .where(filter=FieldFilter(
            Field.FINISHED_AT, "<=", now - timedelta(seconds=COMPLETED_GRACE_SECONDS)))
        .order_by(Field.FINISHED_AT)
        .limit(limit)
    )


def stop_leftover_executor_jobs(
    *, db: FirestoreClient, executor: Executor, now: datetime,
    limit: int = COMPLETED_CHECK_LIMIT,
) -> list[str]:
    """Cancel the executor job of completed jobs when it is still active.

    ``completed`` always wins, also when an older attempt finished after a newer one
    was submitted: the newer attempt's executor job (the job's ``executorJobName``)
    would then hold a GPU for nothing. Jobs are looked at once each, oldest first,
    from where the last pass stopped (``system/leftover-check``), once they finished
    :data:`COMPLETED_GRACE_SECONDS` ago (the completing trainer exits by itself) and
    no earlier than :data:`COMPLETED_WINDOW_SECONDS` ago; at most ``limit`` per pass,
    so however many jobs complete a minute, every one is checked. An executor that
    cannot be asked stops the pass there (the next one starts from that job). The job
    document is not written.
    """
    from datetime import timedelta

    from actorgen.executors import ExecutorError, ExecutorNotFound
    from actorgen.schema import LeftoverCheckField as C

    cursor_ref = db.collection(schema.SYSTEM).document(schema.LEFTOVER_CHECK_DOC)
    cursor = (cursor_ref.get().to_dict() or {})
    after = jobs.as_datetime(cursor.get(C.FINISHED_AT))
    seen = {str(i) for i in (cursor.get(C.JOB_IDS) or [])}
    floor = now - timedelta(seconds=COMPLETED_WINDOW_SECONDS)
    start = max(after, floor) if after is not None else floor
    last_at, last_ids = after, set(seen) if after is not None and after >= floor else set()
    stopped: list[str] = []
    checked = 0
    query = completed_since(db.collection(schema.TRAINING_JOBS), start, now, limit + len(seen))
    for snap in query.stream():
        data = snap.to_dict() or {}
        finished = jobs.as_datetime(data.get(Field.FINISHED_AT))
        if finished is None or (finished == after and snap.id in seen):
            continue
        if checked >= limit:
            break
        name = data.get(Field.EXECUTOR_JOB_NAME)
        if name:
            try:
                executor_job = executor.get(name)
                if executor_job.state.is_active:
                    executor.cancel(name)
                    log.warning("job %s is completed but its executor job %s was still %s; "
                                "cancelled it", snap.id, name,
                                executor_job.raw_state or executor_job.state)
                    stopped.append(snap.id)
            except ExecutorNotFound:
                pass
            except ExecutorError as err:
                log.warning("job %s: cannot check or stop executor job %s (%s); the next "
                            "pass starts from it", snap.id, name, err)
                break
        checked += 1
        if finished != last_at:
            last_at, last_ids = finished, set()
        last_ids.add(snap.id)
    if last_at is not None and (last_at != after or last_ids != seen):
        cursor_ref.set({C.FINISHED_AT: last_at, C.JOB_IDS: sorted(last_ids),
                        C.UPDATED_AT: now})
    return stopped


def sweep_pending_jobs(
    settings: Settings,
    *,
    db: FirestoreClient,
    now: datetime,
    limit: int = MAX_SWEPT_JOBS,
    deadline: float | None = None,
    timer: Callable[[], float] = time.monotonic,
) -> list[str]:
    """Run intake for jobs still ``pending`` a while after creation (a lost trigger).

    Bounded: at most ``limit`` jobs, until ``deadline`` (default
    :data:`PENDING_SWEEP_SECONDS` from now), of at most :data:`PENDING_SCAN_LIMIT` read
    and shuffled; the next sweep takes the rest.
    """
    from google.cloud.firestore_v1.base_query import FieldFilter

    from actorgen import intake

    deadline = timer() + PENDING_SWEEP_SECONDS if deadline is None else deadline
    # Firestore cannot query for a missing field: a job created without any status
    # whose trigger was lost is invisible here (docs/schema.md, "Sweeper").
    query = db.collection(schema.TRAINING_JOBS).where(
        filter=FieldFilter(Field.STATUS, "==", JobStatus.PENDING)
    ).limit(PENDING_SCAN_LIMIT)
    snaps = list(query.stream())
    random.shuffle(snaps)
    taken: list[str] = []
    for snap in snaps:
        created = jobs.as_datetime(snap.create_time)
        if created is not None and (now - created).total_seconds() < settings.sweep_after_seconds:
            continue  # its trigger is probably still running
        if len(taken) >= limit or timer() >= deadline:
            log.info("pending-job sweep stopped after %d jobs (budget); the next goes on",
                     len(taken))
            break
        try:
            outcome = intake.process_job(snap.id, settings, db=db, now=now)
        except Exception as err:  # one bad job must not block the others; retried next pass
            log.warning("sweeping job %s failed (%s); retried next pass", snap.id,
                        schema.quote(str(err), 200))
            continue
        log.warning("swept job %s: intake had not run; now %s", snap.id, outcome)
        taken.append(snap.id)
    return taken


@dataclass
class UploadSweepCursor:
    """Where the next upload sweep resumes listing: the first object name not yet looked
    at when a sweep ran out of budget (None: from the start). Kept in memory by the
    function instance, so a bucket larger than one sweep's budget is covered over
    successive passes instead of always its first objects; a new instance starts over."""

    resume_from: str | None = None


_UPLOAD_CURSOR = UploadSweepCursor()


def sweep_uploads(
    settings: Settings,
    *,
    db: FirestoreClient,
    bucket: Bucket,
    now: datetime,
    limit: int = MAX_SWEPT_UPLOADS,
    timer: Callable[[], float] = time.monotonic,
    cursor: UploadSweepCursor | None = None,
) -> list[str]:
    """Validate uploads that have no verdict a while after upload (a lost trigger).

    Bounded: it stops listing after ``settings.upload_sweep_max_objects`` uploads or
    ``settings.upload_sweep_max_seconds`` (listing and validating together), and the
    next sweep resumes where this one stopped (``cursor``). Only upload objects are
    listed (:data:`UPLOAD_GLOB`); anything else, such as ``.../models/``, is skipped.
    """
    from actorgen import uploads

    cursor = cursor if cursor is not None else _UPLOAD_CURSOR
    deadline = timer() + settings.upload_sweep_max_seconds
    start = cursor.resume_from
    options: dict[str, Any] = {"prefix": "users/", "match_glob": UPLOAD_GLOB}
    if start:
        options["start_offset"] = start
    groups: dict[tuple[str, str], list[Any]] = defaultdict(list)
    stopped_at: str | None = None  # first object not looked at, when the budget ran out
    listed = 0
    for blob in bucket.list_blobs(**options):
        if start and blob.name < start:
            continue  # a server (the emulator) that ignores start_offset
        path = schema.parse_upload_path(blob.name)
        if path is None:
            continue  # models, samples, anything but an upload: not counted
        listed += 1
        if listed > settings.upload_sweep_max_objects or (listed > 1 and timer() > deadline):
            stopped_at = blob.name
            break
        created = jobs.as_datetime(blob.updated or blob.time_created)
        if created is None:
            continue
        age = (now - created).total_seconds()
        if settings.sweep_after_seconds <= age <= settings.sweep_max_age_seconds:
            groups[(path.uid, path.actor_id)].append(blob)
    done: list[str] = []
    # Listing order is name order, and so is this (groups are contiguous prefixes).
    for (uid, actor_id), blobs in groups.items():
        snap = db.collection(schema.ACTORS).document(actor_id).get()
        actor = snap.to_dict() if snap.exists else None
        if actor is None or actor.get(Field.USER_ID) != uid:
            continue  # handle_upload logged this when the trigger ran; no write either way
        images = actor.get(Field.IMAGES) or {}
        for blob in blobs:
            record = images.get(schema.image_id(blob.name)) or {}
            seen = jobs.as_int(record.get(schema.ImageField.GENERATION), -1)
            if record.get(schema.ImageField.STATUS) and seen >= jobs.as_int(blob.generation):
                continue
            # At least one validation per pass: a listing that ate the whole budget
            # must not make every pass stop at the same object forever.
            if len(done) >= limit or (done and timer() > deadline):
                cursor.resume_from = blob.name  # this one is first next time
                log.info("upload sweep stopped at %s (budget); the next pass resumes there",
                         blob.name)
                return done
            event = uploads.UploadEvent(bucket.name, blob.name, blob.generation, blob.size)
            try:
                outcome = uploads.handle_upload(event, settings, db=db, bucket=bucket, now=now)
            except Exception:  # one bad file must not block the others; retried next pass
                log.exception("sweeping upload %s failed", blob.name)
                continue
            log.warning("swept upload %s: no verdict had been recorded; now %s", blob.name, outcome)
            done.append(blob.name)
    if stopped_at is not None:
        log.info("upload sweep listed %d uploads and stopped at %s (budget); the next pass "
                 "resumes there", listed - 1, stopped_at)
    cursor.resume_from = stopped_at
    return done


def _utcnow() -> datetime:
    return datetime.now(UTC)


def run_maintenance(
    settings: Settings,
    *,
    db: FirestoreClient | None = None,
    bucket: Bucket | None = None,
    executor: Executor | None = None,
    now: datetime | None = None,
    clock: Callable[[], datetime] | None = None,
    timer: Callable[[], float] = time.monotonic,
) -> MaintenanceReport:
    """The scheduled pass: reconcile, dispatch, sweep pending jobs, then sweep uploads
    (last: it lists Storage, under a budget). Each step runs even if another fails.

    Each step reads ``clock`` when it starts (a long step does not age the next one's
    view); ``now`` pins the time the steps decide with (tests). The dispatcher's
    leases always come from ``clock``.
    """
    from actorgen import clients, dispatch
    from actorgen.executors import build_executor

    from actorgen.config import DISPATCH_FUNCTION_TIMEOUT_SECONDS

    db = db or clients.firestore_client()
    clock = clock or _utcnow
    report = MaintenanceReport()
    # Every step has a deadline under the function's timeout; the upload sweep keeps
    # its own budget (upload_sweep_max_seconds), which the others leave free.
    started = timer()
    end = started + DISPATCH_FUNCTION_TIMEOUT_SECONDS - MAINTENANCE_MARGIN_SECONDS
    sweeps_end = end - settings.upload_sweep_max_seconds

    def at() -> datetime:
        return now or clock()

    def get_executor() -> Executor:
        nonlocal executor
        if executor is None:
            executor = build_executor(settings.executor_settings())
        return executor

    def reconcile_jobs() -> None:
        run_reconcile_pass(settings, db=db, executor=get_executor(), now=at(), report=report,
                           deadline=min(started + RECONCILE_SECONDS, sweeps_end), timer=timer)

    def dispatch_jobs() -> None:
        done = dispatch.run_dispatch_pass(
            settings, db=db, executor=get_executor(), now=now, clock=clock,
            deadline=sweeps_end - PENDING_SWEEP_SECONDS, timer=timer,
        )
        report.dispatched.extend(done.submitted)

    def sweep_jobs() -> None:
        report.taken_in.extend(sweep_pending_jobs(
            settings, db=db, now=at(),
            deadline=min(timer() + PENDING_SWEEP_SECONDS, sweeps_end), timer=timer,
        ))

    def sweep_files() -> None:
        files = bucket or clients.storage_bucket(settings.bucket or None)
        report.validated.extend(sweep_uploads(settings, db=db, bucket=files, now=at()))

    for name, step in (
        ("reconcile", reconcile_jobs),
        ("dispatch", dispatch_jobs),
        ("sweep jobs", sweep_jobs),
        ("sweep uploads", sweep_files),
    ):
        try:
            step()
        except Exception as err:  # logged and reported; the other steps still run
            log.exception("%s failed", name)
            report.errors.append(f"{name}: {err}")
    return report
