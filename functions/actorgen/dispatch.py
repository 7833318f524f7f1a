"""The dispatcher: queued jobs go to the executor, in order, under caps.

:func:`plan_dispatch` is the pure scheduling decision: priority (high first), then
FIFO by ``queuedAt``; jobs whose ``nextAttemptAt`` is in the future (backoff) or
absent (not released by intake or an admin yet) wait; a global cap and a per-user
cap bound the jobs that hold (or are about to hold) a GPU.

:func:`run_dispatch_pass` does the I/O. It reads only due queued jobs
(``nextAttemptAt <= now``), highest priority then oldest first (:func:`queued_scan`),
so jobs that cannot run yet never crowd due ones out of the scan. Each chosen job is
claimed in a Firestore transaction that re-counts the running jobs (so concurrent
passes cannot exceed the caps or claim one job twice): ``queued -> dispatching``
with a lease and ``attempt + 1``. Then the executor submits it (idempotent: the
executor looks the attempt up by its labels first) and a second transaction records
``dispatching -> dispatched``. A pass that dies between the two leaves a
``dispatching`` job whose lease expires; the next pass re-drives the submission
for the same attempt, which finds the executor job instead of starting another.

Leases are granted and checked with a fresh reading of the clock (never the time
the pass started): a claim late in a long pass still owns its job for the full
``dispatch_lease_seconds``. Should two executor jobs still be created for one
attempt, the one recorded second is cancelled. A re-driven job whose
``cancelRequested`` is set is not submitted: any executor job found for its attempt
is cancelled and the job ends ``cancelled``.

Submission failures: a retryable one (API unavailable, quota) is not a GPU attempt:
the job goes back to ``queued`` with its attempt number restored (so the retry
uses the same labels and finds a job that was created after all) and a backoff;
after :data:`MAX_SUBMIT_RETRIES` it fails. A non-retryable one (bad configuration,
permissions) fails the job. The executor's message is kept in ``attemptHistory``;
the job and actor get a short sentence.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from actorgen import jobs, schema
from actorgen.schema import AttemptOutcome, Field, JobStatus
from actorgen.txn import run_in_transaction

if TYPE_CHECKING:
    from google.cloud.firestore import Client as FirestoreClient

    from actorgen.config import Settings
    from actorgen.executors import Executor, ExecutorJob

log = logging.getLogger(__name__)

#: Retryable submission failures of one attempt before the job fails.
MAX_SUBMIT_RETRIES: Final = 8
#: Due queued jobs read per pass (priority, then oldest first); more wait for the next pass.
QUEUED_SCAN_LIMIT: Final = 500
#: What the job and actor show when submission fails for good (details: attemptHistory).
SUBMIT_REFUSED: Final = (
    "Training could not be started: the training service refused the job. "
    "Start the training again or contact support."
)
SUBMIT_UNAVAILABLE: Final = (
    "Training could not be started after {tries} tries: the training service is "
    "unavailable. Start the training again or contact support."
)
#: _record_submitted: the executor job is not (or no longer) the job's for its attempt.
_DUPLICATE: Final = "duplicate"


@dataclass(frozen=True)
class Candidate:
    """A queued job as the planner sees it."""

    job_id: str
    user_id: str
    priority: int = 0
    queued_at: datetime | None = None
    next_attempt_at: datetime | None = None
    attempt: int = 0
    max_attempts: int = 1
    cancel_requested: bool = False

    @classmethod
    def from_doc(cls, job_id: str, data: Mapping[str, Any]) -> Candidate:
        return cls(
            job_id=job_id,
            user_id=str(data.get(Field.USER_ID) or ""),
            priority=jobs.as_int(data.get(Field.PRIORITY)),
            queued_at=jobs.as_datetime(data.get(Field.QUEUED_AT)),
            next_attempt_at=jobs.as_datetime(data.get(Field.NEXT_ATTEMPT_AT)),
            attempt=jobs.as_int(data.get(Field.ATTEMPT)),
            max_attempts=jobs.as_int(data.get(Field.MAX_ATTEMPTS), 1),
            cancel_requested=bool(data.get(Field.CANCEL_REQUESTED)),
        )


def is_due(job: Candidate, now: datetime) -> bool:
    """Whether a queued job may be dispatched now.

    ``nextAttemptAt`` absent means nobody released the job: e.g. an admin set
    ``status`` to ``queued`` by hand and the admin trigger has not (or would not)
    accept it. Attempts used up likewise means "not released".
    """
    return (
        not job.cancel_requested
        and job.next_attempt_at is not None
        and job.next_attempt_at <= now
        and job.attempt < job.max_attempts
        and bool(job.user_id)
    )


def plan_dispatch(
    queued: Iterable[Candidate],
    running_per_user: Mapping[str, int],
    settings: Settings,
    now: datetime,
) -> list[Candidate]:
    """Which queued jobs to dispatch now, in order.

    ``running_per_user`` counts each user's jobs that hold or are about to hold a
    GPU (statuses in ``schema.ACTIVE_JOB_STATUSES``).
    """
    total = sum(running_per_user.values())
    per_user = Counter(running_per_user)
    chosen: list[Candidate] = []
    order = sorted(
        (job for job in queued if is_due(job, now)),
        key=lambda j: (-j.priority, j.queued_at or datetime.max.replace(tzinfo=UTC),
                       j.job_id),
    )
    for job in order:
        if total >= settings.max_running_jobs:
            break
        if per_user[job.user_id] >= settings.max_running_jobs_per_user:
            continue
        chosen.append(job)
        total += 1
        per_user[job.user_id] += 1
    return chosen


def lease_expired(job: Mapping[str, Any], now: datetime) -> bool:
    expires = jobs.as_datetime(job.get(Field.LEASE_EXPIRES_AT))
    return expires is None or expires <= now


def _utcnow() -> datetime:
    return datetime.now(UTC)


def queued_scan(jobs_ref: Any, now: datetime) -> Any:
    """The query for due queued jobs, in dispatch order (index: firestore.indexes.json)."""
    from google.cloud.firestore_v1.base_query import BaseQuery, FieldFilter

    return (
        jobs_ref.where(filter=FieldFilter(Field.STATUS, "==", JobStatus.QUEUED))
        .where(filter=FieldFilter(Field.NEXT_ATTEMPT_AT, "<=", now))
        .order_by(Field.PRIORITY, direction=BaseQuery.DESCENDING)
        .order_by(Field.QUEUED_AT, direction=BaseQuery.ASCENDING)
        .limit(QUEUED_SCAN_LIMIT)
    )


def new_lease_owner() -> str:
    """A unique name for one dispatch pass (host, process, random)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- I/O
@dataclass
class DispatchReport:
    submitted: list[str] = field(default_factory=list)
    redriven: list[str] = field(default_factory=list)
    retrying: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    lost_claims: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)  # re-driven with cancelRequested
    duplicates: list[str] = field(default_factory=list)  # a second executor job, cancelled
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Claim:
    job_id: str
    user_id: str
    attempt: int
    owner: str
    cancel: bool = False  # cancelRequested on a re-drive: stop, do not submit


def run_dispatch_pass(
    settings: Settings,
    *,
    db: FirestoreClient | None = None,
    executor: Executor | None = None,
    now: datetime | None = None,
    owner: str | None = None,
    clock: Callable[[], datetime] | None = None,
) -> DispatchReport:
    """One pass: re-drive expired ``dispatching`` leases, then dispatch what the plan allows.

    ``now`` is the time the pass plans with (which jobs are due); leases are granted
    and checked with ``clock()`` read at that moment (default: the real time).
    """
    from google.cloud.firestore_v1.base_query import FieldFilter

    from actorgen import clients

    db = db or clients.firestore_client()
    clock = clock or _utcnow
    now = now or clock()
    owner = owner or new_lease_owner()
    report = DispatchReport()
    jobs_ref = db.collection(schema.TRAINING_JOBS)

    def get_executor() -> Executor:
        nonlocal executor
        if executor is None:
            from actorgen.executors import build_executor

            executor = build_executor(settings.executor_settings())
        return executor

    # 1. Submissions whose dispatcher died (lease expired): submit the same attempt again.
    stuck = jobs_ref.where(filter=FieldFilter(Field.STATUS, "==", JobStatus.DISPATCHING))
    for snap in stuck.stream():
        if lease_expired(snap.to_dict() or {}, clock()):
            _dispatch_one(db, snap.id, settings, now, clock, owner, get_executor, report,
                          redrive=True)

    # 2. New dispatches under the caps.
    active = jobs_ref.where(
        filter=FieldFilter(Field.STATUS, "in", sorted(schema.ACTIVE_JOB_STATUSES))
    )
    running = Counter(str((s.to_dict() or {}).get(Field.USER_ID) or "") for s in active.stream())
    queued = [
        Candidate.from_doc(s.id, s.to_dict() or {}) for s in queued_scan(jobs_ref, now).stream()
    ]
    for candidate in plan_dispatch(queued, running, settings, now):
        _dispatch_one(db, candidate.job_id, settings, now, clock, owner, get_executor, report)
    if any(vars(report).values()):
        log.info("dispatch pass %s: %s", owner, report)
    return report


def _dispatch_one(
    db: FirestoreClient,
    job_id: str,
    settings: Settings,
    now: datetime,
    clock: Callable[[], datetime],
    owner: str,
    get_executor: Callable[[], Executor],
    report: DispatchReport,
    *,
    redrive: bool = False,
) -> None:
    """Claim and submit one job; a failure here is logged and left to the next pass."""
    try:
        claim = _claim(db, job_id, settings, now, clock, owner, redrive=redrive)
        if claim is None:
            if not redrive:
                report.lost_claims.append(job_id)  # another pass took it, or the cap filled
            return
        if claim.cancel:
            _cancel_unsubmitted(db, get_executor(), claim, clock, report)
            return
        if redrive:
            report.redriven.append(job_id)
        _submit(db, get_executor(), claim, settings, now, clock, report)
    except Exception:  # one job must not stop the pass; its lease (if any) expires
        log.exception("dispatching job %s failed; the next pass retries", job_id)
        report.errors.append(job_id)


def _claim(
    db: FirestoreClient,
    job_id: str,
    settings: Settings,
    now: datetime,
    clock: Callable[[], datetime],
    owner: str,
    *,
    redrive: bool,
) -> Claim | None:
    """Take the job under a lease; None when it is not (or no longer) ours to take.

    The lease runs from ``clock()`` read in the transaction, not from ``now`` (the
    time the pass started), so it is never granted already nearly expired.
    """
    from google.cloud.firestore_v1.base_query import FieldFilter

    job_ref = db.collection(schema.TRAINING_JOBS).document(job_id)
    active_query = db.collection(schema.TRAINING_JOBS).where(
        filter=FieldFilter(Field.STATUS, "in", sorted(schema.ACTIVE_JOB_STATUSES))
    )

    def claim(transaction: Any) -> Claim | None:
        snap = job_ref.get(transaction=transaction)
        job = snap.to_dict() if snap.exists else None
        if job is None:
            return None
        status = job.get(Field.STATUS)
        at = clock()
        lease = {
            Field.LEASE_OWNER: owner,
            Field.LEASE_EXPIRES_AT: at + timedelta(seconds=settings.dispatch_lease_seconds),
            Field.UPDATED_AT: at,
        }
        if redrive:
            if status != JobStatus.DISPATCHING or not lease_expired(job, at):
                return None
            attempt = jobs.as_int(job.get(Field.ATTEMPT))
            if job.get(Field.CANCEL_REQUESTED):
                # Not submitted again: hold the lease while the executor job (if one was
                # created) is cancelled, then the job ends cancelled (_cancel_unsubmitted).
                transaction.update(job_ref, lease)
                return Claim(job_id, str(job.get(Field.USER_ID) or ""), attempt, owner,
                             cancel=True)
        else:
            candidate = Candidate.from_doc(job_id, job)
            if status != JobStatus.QUEUED or not is_due(candidate, now):
                return None
            # Re-count inside the transaction: a concurrent pass's claim conflicts here.
            running = Counter(
                str((s.to_dict() or {}).get(Field.USER_ID) or "")
                for s in active_query.get(transaction=transaction)
                if s.id != job_id
            )
            if not plan_dispatch([candidate], running, settings, now):
                return None
            attempt = candidate.attempt + 1
        schema.check_transition(status, JobStatus.DISPATCHING)
        transaction.update(
            job_ref,
            {
                **schema.status_fields(job, JobStatus.DISPATCHING, at),
                Field.ATTEMPT: attempt,
                **lease,
                Field.EXECUTOR: settings.executor_kind,
                Field.NEXT_ATTEMPT_AT: None,
                Field.ERROR: None,  # a previous attempt's error lives on in attemptHistory
            },
        )
        return Claim(job_id, str(job.get(Field.USER_ID) or ""), attempt, owner)

    return run_in_transaction(db, claim)


def _submit(
    db: FirestoreClient,
    executor: Executor,
    claim: Claim,
    settings: Settings,
    now: datetime,
    clock: Callable[[], datetime],
    report: DispatchReport,
) -> None:
    from actorgen.executors import ExecutorError, SubmitRequest

    try:
        executor_job = executor.submit(SubmitRequest(claim.job_id, claim.attempt, claim.user_id))
    except ExecutorError as err:
        _record_failure(db, claim, settings, now, err.message, err.retryable, report)
        return
    except Exception as err:  # an unexpected error must not strand the lease
        log.exception("submitting job %s attempt %d failed", claim.job_id, claim.attempt)
        _record_failure(
            db, claim, settings, now, f"{type(err).__name__}: {err}", True, report
        )
        return
    outcome = _record_submitted(db, claim, executor_job, clock)
    if outcome == _DUPLICATE:
        # Two creates raced (e.g. a lease re-driven while this create was in flight):
        # the job already names another executor job. Never leave a second GPU job.
        log.warning(
            "job %s attempt %d: executor job %s is not the one recorded for the job; "
            "cancelling it", claim.job_id, claim.attempt, executor_job.name,
        )
        executor.cancel(executor_job.name)
        report.duplicates.append(claim.job_id)
        return
    if outcome == JobStatus.CANCELLED:
        executor.cancel(executor_job.name)  # cancelled while we were submitting
    report.submitted.append(claim.job_id)


def _record_submitted(
    db: FirestoreClient, claim: Claim, executor_job: ExecutorJob, clock: Callable[[], datetime]
) -> str | None:
    """Record the executor job on the document; returns the job's status afterwards,
    or :data:`_DUPLICATE` when the job has another executor job for this attempt (or
    has moved past it), so this one must be cancelled."""
    job_ref = db.collection(schema.TRAINING_JOBS).document(claim.job_id)

    def record(transaction: Any) -> str | None:
        snap = job_ref.get(transaction=transaction)
        job = snap.to_dict() if snap.exists else None
        if job is None:
            return None
        attempt = jobs.as_int(job.get(Field.ATTEMPT))
        if attempt > claim.attempt:
            return _DUPLICATE  # a later attempt owns the job: this one is nobody's
        if attempt != claim.attempt:
            # Lower: a submit retry restored the number; the retry finds this job by labels.
            return None
        recorded = job.get(Field.EXECUTOR_JOB_NAME)
        if recorded and recorded != executor_job.name:
            return _DUPLICATE
        status = job.get(Field.STATUS)
        now = clock()
        update: dict[str, Any] = {}
        if status == JobStatus.DISPATCHING:
            schema.check_transition(status, JobStatus.DISPATCHED)
            status = JobStatus.DISPATCHED
            update = {
                **schema.status_fields(job, status, now),
                Field.EXECUTOR_JOB_NAME: executor_job.name,
                Field.LEASE_OWNER: None,
                Field.LEASE_EXPIRES_AT: None,
                Field.DISPATCHED_AT: now,
            }
        elif status != JobStatus.CANCELLED and not job.get(Field.EXECUTOR_JOB_NAME):
            # The trainer ran ahead (already preparing, or even completed): no status change.
            update = {
                Field.EXECUTOR_JOB_NAME: executor_job.name,
                Field.DISPATCHED_AT: job.get(Field.DISPATCHED_AT) or now,
                Field.LEASE_OWNER: None,
                Field.LEASE_EXPIRES_AT: None,
            }
        if update:
            update[Field.EXECUTOR_STATE] = executor_job.raw_state or executor_job.state.value
            update[Field.EXECUTOR_STATE_AT] = now
            update[Field.UPDATED_AT] = now
            transaction.update(job_ref, update)
        return status

    return run_in_transaction(db, record)


def _record_failure(
    db: FirestoreClient,
    claim: Claim,
    settings: Settings,
    now: datetime,
    message: str,
    retryable: bool,
    report: DispatchReport,
) -> None:
    job_ref = db.collection(schema.TRAINING_JOBS).document(claim.job_id)

    def record(transaction: Any) -> str | None:
        snap = job_ref.get(transaction=transaction)
        job = snap.to_dict() if snap.exists else None
        if (
            job is None
            or job.get(Field.STATUS) != JobStatus.DISPATCHING
            or jobs.as_int(job.get(Field.ATTEMPT)) != claim.attempt
        ):
            return None
        actor_ref, actor = jobs.read_actor(db, transaction, job)
        past = jobs.history(job)
        retries = 1 + sum(
            1
            for e in past
            if e.get(schema.AttemptField.OUTCOME) == AttemptOutcome.SUBMIT_RETRY
            and e.get(schema.AttemptField.ATTEMPT) == claim.attempt
        )
        if retryable and retries <= MAX_SUBMIT_RETRIES:
            schema.check_transition(JobStatus.DISPATCHING, JobStatus.QUEUED)
            entry = jobs.history_entry(
                claim.attempt, AttemptOutcome.SUBMIT_RETRY, message, None, now
            )
            transaction.update(
                job_ref,
                {
                    **schema.status_fields(job, JobStatus.QUEUED, now),
                    # Not a GPU attempt: the retry reuses this attempt's number (and labels).
                    Field.ATTEMPT: claim.attempt - 1,
                    Field.NEXT_ATTEMPT_AT: jobs.next_attempt_at(retries, settings, now),
                    Field.ATTEMPT_HISTORY: [*past, entry],
                    Field.LEASE_OWNER: None,
                    Field.LEASE_EXPIRES_AT: None,
                    Field.UPDATED_AT: now,
                },
            )
            return JobStatus.QUEUED
        # The executor's message (configuration, resource paths) is for admins: it goes
        # to attemptHistory; the job and actor get a short sentence.
        error = SUBMIT_REFUSED if not retryable else SUBMIT_UNAVAILABLE.format(tries=retries)
        schema.check_transition(JobStatus.DISPATCHING, JobStatus.FAILED)
        entry = jobs.history_entry(claim.attempt, AttemptOutcome.SUBMIT_FAILED, message, None, now)
        transaction.update(
            job_ref,
            {
                **schema.status_fields(job, JobStatus.FAILED, now),
                Field.ERROR: error,
                Field.ATTEMPT_HISTORY: [*past, entry],
                Field.NEXT_ATTEMPT_AT: None,
                Field.LEASE_OWNER: None,
                Field.LEASE_EXPIRES_AT: None,
                Field.FINISHED_AT: now,
                Field.UPDATED_AT: now,
            },
        )
        jobs.follow_on_actor(transaction, actor_ref, actor, job, claim.job_id, JobStatus.FAILED,
                             error)
        return JobStatus.FAILED

    outcome = run_in_transaction(db, record)
    if outcome == JobStatus.QUEUED:
        log.warning("job %s: submission failed, will retry: %s", claim.job_id, message)
        report.retrying.append(claim.job_id)
    elif outcome == JobStatus.FAILED:
        log.error("job %s: submission failed for good: %s", claim.job_id, message)
        report.failed.append(claim.job_id)


def _cancel_unsubmitted(
    db: FirestoreClient,
    executor: Executor,
    claim: Claim,
    clock: Callable[[], datetime],
    report: DispatchReport,
) -> None:
    """End a re-driven ``dispatching`` job with ``cancelRequested`` as ``cancelled``.

    The executor job a dead dispatcher may have created for this attempt is cancelled
    first (an executor error propagates: the lease expires and the next pass retries,
    so no GPU job is left behind).
    """
    found = executor.find(claim.job_id, claim.attempt)
    if found is not None:
        executor.cancel(found.name)
    job_ref = db.collection(schema.TRAINING_JOBS).document(claim.job_id)

    def record(transaction: Any) -> bool:
        snap = job_ref.get(transaction=transaction)
        job = snap.to_dict() if snap.exists else None
        if (
            job is None
            or job.get(Field.STATUS) != JobStatus.DISPATCHING
            or jobs.as_int(job.get(Field.ATTEMPT)) != claim.attempt
            or job.get(Field.LEASE_OWNER) != claim.owner
        ):
            return False  # recorded meanwhile: the reconciler cancels it as any other
        actor_ref, actor = jobs.read_actor(db, transaction, job)
        at = clock()
        name = found.name if found is not None else None
        entry = jobs.history_entry(
            claim.attempt, AttemptOutcome.CANCELLED, "cancelled on request before submission",
            name, at,
        )
        schema.check_transition(JobStatus.DISPATCHING, JobStatus.CANCELLED)
        transaction.update(
            job_ref,
            {
                **schema.status_fields(job, JobStatus.CANCELLED, at),
                Field.ATTEMPT_HISTORY: [*jobs.history(job), entry],
                Field.EXECUTOR_JOB_NAME: name,
                Field.LEASE_OWNER: None,
                Field.LEASE_EXPIRES_AT: None,
                Field.NEXT_ATTEMPT_AT: None,
                Field.FINISHED_AT: at,
                Field.UPDATED_AT: at,
            },
        )
        jobs.follow_on_actor(transaction, actor_ref, actor, job, claim.job_id,
                             JobStatus.CANCELLED, None)
        return True

    if run_in_transaction(db, record):
        log.info("job %s: cancelled on request instead of re-driving its submission",
                 claim.job_id)
        report.cancelled.append(claim.job_id)
