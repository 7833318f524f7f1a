"""The command line's reads and its two requests (the I/O half of :mod:`actorgen.cli`).

Reads go straight to Firestore and Storage. The two actions write exactly what the
Firebase console or the app would write (``status: queued`` on a failed job,
``cancelRequested: true``) after checking them with the same rule the
``on_job_updated`` trigger applies (:func:`actorgen.admin.review_update`) and the
state machine; the trigger then does the work, so the command never goes around
the pipeline's rules.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from actorgen import admin, schema
from actorgen.schema import Field, JobStatus
from actorgen.txn import run_in_transaction

if TYPE_CHECKING:
    from google.cloud.firestore import Client as FirestoreClient

#: Most documents ``jobs`` reads while filtering on the client side.
SCAN_LIMIT = 5000
#: How long one read may keep retrying an unreachable Firestore (the client library's
#: own retry has no end against a dead emulator); ``--rpc-timeout`` changes it.
DEFAULT_RPC_TIMEOUT_SECONDS = 30.0
RPC_TIMEOUT_SECONDS = DEFAULT_RPC_TIMEOUT_SECONDS


def set_rpc_timeout(seconds: float) -> None:
    global RPC_TIMEOUT_SECONDS
    RPC_TIMEOUT_SECONDS = seconds


def rpc() -> dict[str, Any]:
    """``retry`` and ``timeout`` for one Firestore call: transient errors are retried,
    but never for longer than :data:`RPC_TIMEOUT_SECONDS` in all."""
    from google.api_core import exceptions
    from google.api_core.retry import Retry, if_exception_type

    transient = if_exception_type(exceptions.ServiceUnavailable, exceptions.DeadlineExceeded,
                                  exceptions.InternalServerError)
    return {"retry": Retry(predicate=transient, deadline=RPC_TIMEOUT_SECONDS),
            "timeout": RPC_TIMEOUT_SECONDS}


class NotFound(LookupError):
    """The job or actor does not exist."""


class Refused(RuntimeError):
    """The pipeline's rules do not allow the request; the message says why."""


def get_job(db: FirestoreClient, job_id: str) -> dict[str, Any]:
    if not job_id or "/" in job_id:
        raise NotFound(f"{job_id[:40]!r} is not a job id")
    snap = db.collection(schema.TRAINING_JOBS).document(job_id).get(**rpc())
    if not snap.exists:
        raise NotFound(f"no job {job_id!r} in {schema.TRAINING_JOBS}")
    return snap.to_dict() or {}


def get_actor(db: FirestoreClient, actor_id: str) -> dict[str, Any]:
    if not actor_id or "/" in actor_id:
        raise NotFound(f"{actor_id[:40]!r} is not an actor id")
    snap = db.collection(schema.ACTORS).document(actor_id).get(**rpc())
    if not snap.exists:
        raise NotFound(f"no actor {actor_id!r} in {schema.ACTORS}")
    return snap.to_dict() or {}


def list_jobs(
    db: FirestoreClient,
    *,
    statuses: Sequence[str] = (),
    user: str | None = None,
    actor: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    limit: int = 50,
) -> list[tuple[str, dict[str, Any]]]:
    """Jobs matching every filter, newest first.

    One equality filter (the most selective given) and the creation-time range go to
    Firestore, served by the composite indexes in firestore.indexes.json; the other
    filters are applied here. Jobs without ``createdAt`` are not listed (Firestore
    leaves documents without the ordering field out).
    """
    query = jobs_query(db.collection(schema.TRAINING_JOBS), statuses=statuses, user=user,
                       actor=actor, created_after=created_after, created_before=created_before)
    out: list[tuple[str, dict[str, Any]]] = []
    for snap in query.stream(**rpc()):
        job = snap.to_dict() or {}
        if statuses and (job.get(Field.STATUS) or JobStatus.PENDING) not in statuses:
            continue
        if user and job.get(Field.USER_ID) != user:
            continue
        out.append((snap.id, job))
        if len(out) >= limit:
            break
    return out


def jobs_query(
    jobs_ref: Any,
    *,
    statuses: Sequence[str] = (),
    user: str | None = None,
    actor: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
) -> Any:
    """The Firestore query behind ``jobs`` (no I/O: building a query reads nothing)."""
    from google.cloud.firestore_v1 import Query
    from google.cloud.firestore_v1.base_query import FieldFilter

    query: Any = jobs_ref
    if actor:
        query = query.where(filter=FieldFilter(Field.ACTOR_ID, "==", actor))
    elif user:
        query = query.where(filter=FieldFilter(Field.USER_ID, "==", user))
    elif statuses:
        query = query.where(filter=FieldFilter(Field.STATUS, "in", sorted(set(statuses))))
    if created_after is not None:
        query = query.where(filter=FieldFilter(Field.CREATED_AT, ">=", created_after))
    if created_before is not None:
        query = query.where(filter=FieldFilter(Field.CREATED_AT, "<=", created_before))
    return query.order_by(Field.CREATED_AT, direction=Query.DESCENDING).limit(SCAN_LIMIT)


def jobs_created_since(db: FirestoreClient, since: datetime) -> Iterator[dict[str, Any]]:
    from google.cloud.firestore_v1.base_query import FieldFilter

    query = db.collection(schema.TRAINING_JOBS).where(
        filter=FieldFilter(Field.CREATED_AT, ">=", since)
    )
    for snap in query.stream(**rpc()):
        yield snap.to_dict() or {}


def queued_jobs(db: FirestoreClient) -> Iterator[dict[str, Any]]:
    from google.cloud.firestore_v1.base_query import FieldFilter

    query = db.collection(schema.TRAINING_JOBS).where(
        filter=FieldFilter(Field.STATUS, "==", JobStatus.QUEUED)
    )
    for snap in query.stream(**rpc()):
        yield snap.to_dict() or {}


def model_files(bucket: Any, uid: str, actor_id: str, job_id: str) -> list[dict[str, Any]]:
    """The published files of one model version, with their sizes."""
    prefix = schema.model_prefix(uid, actor_id, job_id)
    return [
        {"path": blob.name, "size": int(blob.size or 0)}
        for blob in bucket.list_blobs(prefix=prefix, timeout=RPC_TIMEOUT_SECONDS)
    ]


# ----------------------------------------------------------------------------- requests
def request_redispatch(db: FirestoreClient, job_id: str) -> dict[str, Any]:
    """Move a failed job to ``queued`` as an admin does in the console; returns the job before.

    Checked in a transaction with the trigger's own rule, so a job that is not failed
    (or stopped being failed meanwhile) is refused here instead of being reverted.
    """
    return _request(db, job_id, {Field.STATUS: JobStatus.QUEUED}, admin.AdminAction.REDISPATCH,
                    _redispatch_refusal)


def request_cancel(db: FirestoreClient, job_id: str) -> dict[str, Any]:
    """Set ``cancelRequested`` as the app or an admin does; returns the job before."""
    return _request(db, job_id, {Field.CANCEL_REQUESTED: True}, admin.AdminAction.CANCEL,
                    _cancel_refusal)


def _redispatch_refusal(job: dict[str, Any]) -> str:
    status = job.get(Field.STATUS) or JobStatus.PENDING
    return (f"job is {status!r}: only a failed job can be re-dispatched "
            f"(allowed moves from {status!r}: {_moves(status)})")


def _cancel_refusal(job: dict[str, Any]) -> str:
    status = job.get(Field.STATUS) or JobStatus.PENDING
    if job.get(Field.CANCEL_REQUESTED) and status not in schema.FINAL_JOB_STATUSES:
        return f"job is {status!r} and its cancellation was already requested"
    return f"job is {status!r}: a {status} job has nothing to cancel"


def _moves(status: str) -> str:
    allowed = sorted(s for s in schema.ALL_JOB_STATUSES if s != status and schema.can_transition(status, s))
    return ", ".join(allowed) or "none, it is final"


def _request(
    db: FirestoreClient,
    job_id: str,
    change: dict[str, Any],
    expected: str,
    refusal: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    get_job(db, job_id)  # NotFound with a clear message before the transaction
    ref = db.collection(schema.TRAINING_JOBS).document(job_id)

    def write(transaction: Any) -> dict[str, Any]:
        snap = ref.get(transaction=transaction)
        if not snap.exists:
            raise NotFound(f"no job {job_id!r} in {schema.TRAINING_JOBS}")
        job = snap.to_dict() or {}
        if admin.review_update(job, {**job, **change}) != expected:
            raise Refused(refusal(job))
        if Field.STATUS in change:
            schema.check_transition(job.get(Field.STATUS), change[Field.STATUS])
        if expected == admin.AdminAction.REDISPATCH:
            _check_actor_is_free(db, transaction, job_id, job)
        transaction.update(ref, change)
        return job

    return run_in_transaction(db, write)


def _check_actor_is_free(db: FirestoreClient, transaction: Any, job_id: str,
                         job: dict[str, Any]) -> None:
    """Intake's one-active-job-per-actor rule, which the trigger applies to a re-dispatch
    too: refused here with its reason rather than put back by the trigger."""
    from actorgen import intake

    actor_id = job.get(Field.ACTOR_ID)
    if not isinstance(actor_id, str) or not actor_id or "/" in actor_id:
        return
    busy = intake.blocking_jobs(db, transaction, actor_id, job_id)
    if busy:
        raise Refused(intake.busy_actor_problem(actor_id, busy))


def wait_for(
    db: FirestoreClient,
    job_id: str,
    done: Callable[[dict[str, Any]], bool],
    timeout: float,
    interval: float = 1.0,
) -> dict[str, Any] | None:
    """Poll the job until ``done(job)``; the job then, or None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        job = get_job(db, job_id)
        if done(job):
            return job
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
