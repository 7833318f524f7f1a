"""The dispatcher: queued jobs go to the executor, in order, under caps.

:func:`plan_dispatch` is the pure scheduling decision: priority (high first), then
FIFO by ``queuedAt``; jobs whose ``nextAttemptAt`` is in the future (backoff) or
absent (not released by intake or an admin yet) wait; a global cap and a per-user
cap bound the jobs that hold (or are about to hold) a GPU.

:func:`run_dispatch_pass` does the I/O. It reads only due queued jobs
(``nextAttemptAt <= now``), highest priority then oldest first (:func:`queued_scan`),
so jobs that cannot run yet never crowd due ones out of the scan. One pass runs at a
time: it holds a short pass lease (``system/dispatch-pass``); a pass that finds it
held asks the holder for one more round and ends at once, so overlapping passes
(``dispatch_jobs`` and ``dispatchnow``) cooperate instead of fighting over the same
jobs. Each chosen job is claimed in a Firestore transaction that checks and renews
the pass lease (so the claims of two passes never interleave, and the caps counted
once per round hold): ``queued -> dispatching`` with a lease and ``attempt + 1``.
A pass stops claiming at its deadline, under the function's timeout, between two
jobs, so it leaves no job lease behind; the lease of a pass the timeout (or a crash)
cut off mid-submission is re-driven by the next pass once it is
:data:`ORPHAN_LEASE_SECONDS` old, not only once it expires. Then the executor submits it (idempotent: the
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
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from actorgen import jobs, logs, schema
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
#: _claim: this pass no longer holds the pass lease (it expired and another pass took
#: it); every further claim of this pass would be refused too.
_PASS_LOST: Final = "pass-lost"
#: How long the pass lease lasts without renewal; every claim renews it. A pass that
#: dies holding it blocks the others for at most this long.
PASS_LEASE_SECONDS: Final = 60
#: Kept free under the function's timeout for the last submission and letting go.
PASS_MARGIN_SECONDS: Final = 60
#: Another pass's job lease this old is re-driven before it expires (lease_abandoned):
#: far longer than a submission takes, far shorter than DISPATCH_LEASE_SECONDS.
ORPHAN_LEASE_SECONDS: Final = 120
#: Rounds one pass runs at most (one more when other passes asked, see schema).
MAX_ROUNDS: Final = 10


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


def lease_abandoned(
    job: Mapping[str, Any], now: datetime, owner: str, lease_seconds: int
) -> bool:
    """Whether the pass holding the pass lease (``owner``) may re-drive this job now.

    Expired, or left by another pass more than :data:`ORPHAN_LEASE_SECONDS` ago: job
    leases are taken only by the pass-lease holder, and a pass submits one job at a
    time, so another pass's lease that old belongs to a pass the function's timeout
    (or a crash) cut off in the middle of a submission. Re-driving it then, instead of
    after the whole ``DISPATCH_LEASE_SECONDS``, is safe: the submission looks the
    attempt up by its labels first, and a second executor job is cancelled.
    """
    if lease_expired(job, now):
        return True
    if job.get(Field.LEASE_OWNER) == owner:
        return False
    expires = jobs.as_datetime(job.get(Field.LEASE_EXPIRES_AT))
    granted = expires - timedelta(seconds=lease_seconds) if expires else None
    return granted is not None and (now - granted).total_seconds() > ORPHAN_LEASE_SECONDS


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
    #: Another pass held the pass lease: this one asked it for another round and ended.
    skipped: bool = False
    #: The deadline came before the plan was done (or the pass lease was lost): the next
    #: pass goes on from there. No job lease is left behind: claims stop between jobs.
    cut_off: bool = False
    rounds: int = 0


@dataclass(frozen=True)
class Claim:
    job_id: str
    user_id: str
    attempt: int
    owner: str
    cancel: bool = False  # cancelRequested on a re-drive: stop, do not submit


def pass_deadline(timer: Callable[[], float] = time.monotonic) -> float:
    """When a pass that starts now must stop claiming (``timer`` units): the dispatch
    functions' timeout less :data:`PASS_MARGIN_SECONDS`."""
    from actorgen.config import DISPATCH_FUNCTION_TIMEOUT_SECONDS

    return timer() + DISPATCH_FUNCTION_TIMEOUT_SECONDS - PASS_MARGIN_SECONDS


def run_dispatch_pass(
    settings: Settings,
    *,
    db: FirestoreClient | None = None,
    executor: Executor | None = None,
    now: datetime | None = None,
    owner: str | None = None,
    clock: Callable[[], datetime] | None = None,
    deadline: float | None = None,
    timer: Callable[[], float] = time.monotonic,
) -> DispatchReport:
    """One pass: re-drive expired ``dispatching`` leases, then dispatch what the plan allows.

    One pass runs at a time: it holds the pass lease (``system/dispatch-pass``), which
    every claim checks and renews in its transaction. A pass that finds the lease held
    asks the holder for one more round (its jobs may have been queued after the
    holder's scan) and returns at once (``skipped``); overlapping passes
    (``dispatch_jobs`` and ``dispatchnow``) thus never fight over the same jobs. Caps:
    jobs enter the active statuses only through claims, and all claims are the lease
    holder's, so the active jobs counted once per round plus this round's claims are an
    upper bound; no claim re-reads every active job.

    ``now`` is the time the pass plans with (which jobs are due); leases are granted
    and checked with ``clock()`` read at that moment (default: the real time). The pass
    stops claiming at ``deadline`` (``timer`` units; default :func:`pass_deadline`).
    """
    from actorgen import clients

    db = db or clients.firestore_client()
    clock = clock or _utcnow
    now = now or clock()
    owner = owner or new_lease_owner()
    deadline = pass_deadline(timer) if deadline is None else deadline
    report = DispatchReport()

    def get_executor() -> Executor:
        nonlocal executor
        if executor is None:
            from actorgen.executors import build_executor

            executor = build_executor(settings.executor_settings())
        return executor

    pass_ref = db.collection(schema.SYSTEM).document(schema.DISPATCH_PASS_DOC)
    if not _take_pass_lease(db, pass_ref, owner, clock):
        report.skipped = True
        log.info("dispatch pass %s: another pass is running; asked it for another round",
                 owner)
        return report
    try:
        more = True
        while more:
            report.rounds += 1
            finished = _dispatch_round(db, settings, now, clock, owner, get_executor, report,
                                       deadline, timer)
            more = _end_round(db, pass_ref, owner, clock,
                              another=finished and report.rounds < MAX_ROUNDS
                              and timer() < deadline)
    except Exception:
        _end_round(db, pass_ref, owner, clock, another=False)
        raise
    if any(v for k, v in vars(report).items() if k != "rounds"):
        log.info("dispatch pass %s: %s", owner, report)
    return report


def _dispatch_round(
    db: FirestoreClient,
    settings: Settings,
    now: datetime,
    clock: Callable[[], datetime],
    owner: str,
    get_executor: Callable[[], Executor],
    report: DispatchReport,
    deadline: float,
    timer: Callable[[], float],
) -> bool:
    """Re-drive expired leases, then claim and submit what the plan allows. False when
    the round stopped early (deadline, or the pass lease was lost)."""
    from google.cloud.firestore_v1.base_query import FieldFilter

    jobs_ref = db.collection(schema.TRAINING_JOBS)

    def out_of_time() -> bool:
        if timer() >= deadline:
            report.cut_off = True
            log.warning("dispatch pass %s reached its deadline; the next pass goes on", owner)
            return True
        return False

    # 1. Submissions whose dispatcher died (lease expired): submit the same attempt again.
    stuck = jobs_ref.where(filter=FieldFilter(Field.STATUS, "==", JobStatus.DISPATCHING))
    for snap in stuck.stream():
        if not lease_abandoned(snap.to_dict() or {}, clock(), owner,
                               settings.dispatch_lease_seconds):
            continue
        if out_of_time():
            return False
        if _dispatch_one(db, snap.id, settings, now, clock, owner, get_executor, report,
                         None, redrive=True) == _PASS_LOST:
            report.cut_off = True
            return False

    # 2. New dispatches under the caps, counted once: only this pass's claims add to them.
    active = jobs_ref.where(
        filter=FieldFilter(Field.STATUS, "in", sorted(schema.ACTIVE_JOB_STATUSES))
    )
    running = Counter(str((s.to_dict() or {}).get(Field.USER_ID) or "") for s in active.stream())
    queued = [
        Candidate.from_doc(s.id, s.to_dict() or {}) for s in queued_scan(jobs_ref, now).stream()
    ]
    for candidate in plan_dispatch(queued, running, settings, now):
        if out_of_time():
            return False
        with logs.context(job_id=candidate.job_id, user_id=candidate.user_id or None,
                          attempt=candidate.attempt + 1):  # the attempt being dispatched
            outcome = _dispatch_one(db, candidate.job_id, settings, now, clock, owner,
                                    get_executor, report, running)
        if outcome == _PASS_LOST:
            report.cut_off = True
            return False
    return True


def _lease_held_by_other(lease: Mapping[str, Any], owner: str, at: datetime) -> bool:
    from actorgen.schema import DispatchPassField as P

    expires = jobs.as_datetime(lease.get(P.EXPIRES_AT))
    return lease.get(P.OWNER) not in (None, owner) and expires is not None and expires > at


def _take_pass_lease(
    db: FirestoreClient, pass_ref: Any, owner: str, clock: Callable[[], datetime]
) -> bool:
    """Take the pass lease; when another pass holds it, ask that one for another round.

    The request is a blind increment of ``system/dispatch-requests`` followed by a
    fresh look at the lease: either the holder's end-of-round transaction sees the
    increment, or it let go before it and the fresh look finds the lease free.
    """
    from google.cloud.firestore_v1 import Increment

    from actorgen.schema import DispatchPassField as P

    requests_ref = pass_ref.parent.document(schema.DISPATCH_REQUESTS_DOC)

    def take(transaction: Any) -> bool:
        snap = pass_ref.get(transaction=transaction)
        asked = requests_ref.get(transaction=transaction)
        at = clock()
        if _lease_held_by_other((snap.to_dict() if snap.exists else None) or {}, owner, at):
            return False
        transaction.set(pass_ref, {
            P.OWNER: owner,
            P.EXPIRES_AT: at + timedelta(seconds=PASS_LEASE_SECONDS),
            # Requests so far are served by this pass's full round.
            P.SERVED: jobs.as_int(((asked.to_dict() if asked.exists else None) or {}).get(
                P.REQUESTS)),
            P.UPDATED_AT: at,
        })
        return True

    requested = False
    for _ in range(3):
        snap = pass_ref.get()
        if not _lease_held_by_other((snap.to_dict() if snap.exists else None) or {}, owner,
                                    clock()):
            if run_in_transaction(db, take):
                return True
            continue
        if requested:
            return False
        requests_ref.set({P.REQUESTS: Increment(1), P.UPDATED_AT: clock()}, merge=True)
        requested = True
    return False


def _end_round(
    db: FirestoreClient, pass_ref: Any, owner: str, clock: Callable[[], datetime],
    *, another: bool,
) -> bool:
    """After a round: keep the lease for another round when one was asked for (and
    ``another`` allows it), else let go. One transaction, so a request that arrives
    while the holder finishes is either served or finds the lease free."""
    from actorgen.schema import DispatchPassField as P

    requests_ref = pass_ref.parent.document(schema.DISPATCH_REQUESTS_DOC)

    def end(transaction: Any) -> bool:
        snap = pass_ref.get(transaction=transaction)
        asked = requests_ref.get(transaction=transaction)
        lease = (snap.to_dict() if snap.exists else None) or {}
        if lease.get(P.OWNER) != owner:
            return False  # lost meanwhile: the new holder does the work
        at = clock()
        count = jobs.as_int(((asked.to_dict() if asked.exists else None) or {}).get(P.REQUESTS))
        if another and count != jobs.as_int(lease.get(P.SERVED)):
            transaction.update(pass_ref, {
                P.SERVED: count,
                P.EXPIRES_AT: at + timedelta(seconds=PASS_LEASE_SECONDS),
                P.UPDATED_AT: at,
            })
            return True
        # A request left unserved (deadline) is served by the next pass's full round.
        transaction.update(pass_ref, {P.OWNER: None, P.EXPIRES_AT: None, P.UPDATED_AT: at})
        return False

    return run_in_transaction(db, end)


def _dispatch_one(
    db: FirestoreClient,
    job_id: str,
    settings: Settings,
    now: datetime,
    clock: Callable[[], datetime],
    owner: str,
    get_executor: Callable[[], Executor],
    report: DispatchReport,
    running: Counter[str] | None,
    *,
    redrive: bool = False,
) -> str | None:
    """Claim and submit one job; a failure here is logged and left to the next pass.

    ``running`` (new claims only) is the pass's count of active jobs per user, which a
    successful claim increments. Returns :data:`_PASS_LOST` when the pass lease is gone.
    """
    try:
        claim = _claim(db, job_id, settings, now, clock, owner, running, redrive=redrive)
        if claim == _PASS_LOST:
            return _PASS_LOST
        if claim is None:
            if not redrive:
                report.lost_claims.append(job_id)  # changed since the scan (cancel, retry)
            return None
        assert isinstance(claim, Claim)
        if running is not None:
            running[claim.user_id] += 1
        if claim.cancel:
            _cancel_unsubmitted(db, get_executor(), claim, clock, report)
            return None
        if redrive:
            report.redriven.append(job_id)
        _submit(db, get_executor(), claim, settings, now, clock, report)
    except Exception:  # one job must not stop the pass; its lease (if any) expires
        log.exception("dispatching job %s failed; the next pass retries", job_id)
        report.errors.append(job_id)
    return None


def _claim(
    db: FirestoreClient,
    job_id: str,
    settings: Settings,
    now: datetime,
    clock: Callable[[], datetime],
    owner: str,
    running: Counter[str] | None,
    *,
    redrive: bool,
) -> Claim | str | None:
    """Take the job under a lease; None when it is not (or no longer) ours to take,
    :data:`_PASS_LOST` when this pass no longer holds the pass lease.

    The transaction reads the pass lease too and renews it: a claim commits only while
    its pass holds the lease, so claims of two passes never interleave. The job lease
    runs from ``clock()`` read in the transaction, not from ``now`` (the time the pass
    started), so it is never granted already nearly expired.
    """
    from actorgen.schema import DispatchPassField as P

    job_ref = db.collection(schema.TRAINING_JOBS).document(job_id)
    pass_ref = db.collection(schema.SYSTEM).document(schema.DISPATCH_PASS_DOC)

    def claim(transaction: Any) -> Claim | str | None:
        pass_snap = pass_ref.get(transaction=transaction)
        snap = job_ref.get(transaction=transaction)
        at = clock()
        held = (pass_snap.to_dict() if pass_snap.exists else None) or {}
        expires = jobs.as_datetime(held.get(P.EXPIRES_AT))
        if held.get(P.OWNER) != owner or expires is None or expires <= at:
            return _PASS_LOST
        job = snap.to_dict() if snap.exists else None
        if job is None:
            return None
        status = job.get(Field.STATUS)
        lease = {
            Field.LEASE_OWNER: owner,
            Field.LEASE_EXPIRES_AT: at + timedelta(seconds=settings.dispatch_lease_seconds),
            Field.UPDATED_AT: at,
        }
        renewal = {P.EXPIRES_AT: at + timedelta(seconds=PASS_LEASE_SECONDS), P.UPDATED_AT: at}
        if redrive:
            if status != JobStatus.DISPATCHING or not lease_abandoned(
                job, at, owner, settings.dispatch_lease_seconds
            ):
                return None
            attempt = jobs.as_int(job.get(Field.ATTEMPT))
            if job.get(Field.CANCEL_REQUESTED):
                # Not submitted again: hold the lease while the executor job (if one was
                # created) is cancelled, then the job ends cancelled (_cancel_unsubmitted).
                transaction.update(job_ref, lease)
                transaction.update(pass_ref, renewal)
                return Claim(job_id, str(job.get(Field.USER_ID) or ""), attempt, owner,
                             cancel=True)
        else:
            candidate = Candidate.from_doc(job_id, job)
            if status != JobStatus.QUEUED or not is_due(candidate, now):
                return None
            # The caps as this pass counts them (no other pass claims meanwhile).
            if not plan_dispatch([candidate], running or Counter(), settings, now):
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
        transaction.update(pass_ref, renewal)
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
