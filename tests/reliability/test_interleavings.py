"""Races between reconcile, dispatch, cancel and admin re-dispatch, forced step by step.

Each proof drives the real code against the Firestore emulator; a one-shot hook on
the shared folder executor (``Hooked``) runs the competing step at the exact point
between the code's read of the job and its transaction. Nothing depends on timing.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from actorgen import admin, dispatch, reconcile, schema
from actorgen.config import Settings
from actorgen.executors import ExecutorState
from actorgen.reconcile import Action
from actorgen.schema import AttemptField, AttemptOutcome, Field, JobStatus

from tests.functions.jobdocs import put_queued_job, read

JOBS = schema.TRAINING_JOBS
SETTINGS = Settings(executor_kind="local", backoff_base_seconds=60,
                    heartbeat_timeout_seconds=600, max_running_jobs=10)


def dispatched_job(db: Any, executor: Any, now: datetime, **fields: Any) -> str:
    """A job dispatched (attempt 1) through the real dispatcher."""
    job_id = put_queued_job(db, "alice", queued_at=now - timedelta(minutes=1), **fields)
    report = dispatch.run_dispatch_pass(SETTINGS, db=db, executor=executor, now=now)
    assert report.submitted == [job_id]
    return job_id


def active_executor_jobs(executor: Any, job_id: str) -> list[str]:
    return [j["name"] for j in executor.inner.active() if j["job_id"] == job_id]


def test_a_stale_reconcile_never_fails_the_next_attempt(db: Any, hooked: Any, proof: Any) -> None:
    """Stale reconcile vs retry: a pass that read attempt 1's failure records nothing
    once another pass has retried the job and attempt 2 was submitted."""
    t0 = datetime.now(UTC)
    job_id = dispatched_job(db, hooked, t0)
    first = read(db, JOBS, job_id)[Field.EXECUTOR_JOB_NAME]
    hooked.inner.set_state(first, ExecutorState.FAILED)
    t1 = t0 + timedelta(seconds=61)

    def meanwhile(name: str) -> None:
        # Pass B: the same failure, recorded; the backoff passes; attempt 2 is submitted.
        assert reconcile.reconcile_job(db, hooked, job_id, SETTINGS, t0) == Action.RETRY
        assert dispatch.run_dispatch_pass(SETTINGS, db=db, executor=hooked,
                                          now=t1).submitted == [job_id]

    hooked.on("get", meanwhile)
    # Pass A read the job (attempt 1) before pass B; it records after.
    action = reconcile.reconcile_job(db, hooked, job_id, SETTINGS, t0)
    proof.case()
    job = read(db, JOBS, job_id)
    second = job[Field.EXECUTOR_JOB_NAME]
    assert action == Action.NONE
    assert (job[Field.STATUS], job[Field.ATTEMPT]) == (JobStatus.DISPATCHED, 2)
    assert second != first
    assert [e[AttemptField.ATTEMPT] for e in job[Field.ATTEMPT_HISTORY]] == [1]
    assert active_executor_jobs(hooked, job_id) == [second]
    proof.held("attempt 2 is untouched: no false executor-failed, no attempt used up, "
               "one live executor job")

    # And the next pass still reconciles attempt 2 as usual.
    hooked.inner.set_state(second, ExecutorState.FAILED)
    assert reconcile.reconcile_job(db, hooked, job_id, SETTINGS, t1) == Action.RETRY
    assert [e[AttemptField.ATTEMPT] for e in read(db, JOBS, job_id)[Field.ATTEMPT_HISTORY]] == [
        1, 2]
    proof.case()
    proof.held("the next pass reconciles attempt 2")


def test_a_stale_heartbeat_found_in_the_transaction_cancels_the_executor_job(
    db: Any, hooked: Any, proof: Any
) -> None:
    """A decision re-made in the transaction that needs the executor job stopped
    (stale heartbeat) is recorded only after that job was cancelled."""
    t0 = datetime.now(UTC)
    job_id = dispatched_job(db, hooked, t0 - timedelta(minutes=30))
    name = read(db, JOBS, job_id)[Field.EXECUTOR_JOB_NAME]
    db.collection(JOBS).document(job_id).update({
        Field.STATUS: JobStatus.TRAINING,
        Field.EXECUTOR_STATE: "queued",  # last seen waiting: this pass observes "running"
        Field.DISPATCHED_AT: t0 - timedelta(minutes=30),
        Field.EXECUTOR_STATE_AT: t0 - timedelta(minutes=30),
        Field.HEARTBEAT_AT: t0 - timedelta(minutes=20),
    })

    def meanwhile(_: str) -> None:
        # Another pass, which started long before, recorded "running" with its time.
        db.collection(JOBS).document(job_id).update({
            Field.EXECUTOR_STATE: ExecutorState.RUNNING.value,
            Field.EXECUTOR_STATE_AT: t0 - timedelta(minutes=20),
        })

    hooked.on("get", meanwhile)
    action = reconcile.reconcile_job(db, hooked, job_id, SETTINGS, t0)
    proof.case()
    job = read(db, JOBS, job_id)
    assert action == Action.RETRY
    assert job[Field.ATTEMPT_HISTORY][-1][AttemptField.OUTCOME] == AttemptOutcome.STALE
    assert hooked.inner.get(name).state == ExecutorState.CANCELLED
    assert active_executor_jobs(hooked, job_id) == []
    proof.held("stale attempt recorded only with its executor job cancelled")


def test_a_cancel_requested_during_reconcile_stops_the_executor_job(
    db: Any, hooked: Any, proof: Any
) -> None:
    """Cancel vs reconcile: a cancel request that lands between the reconciler's read
    and its transaction ends the job only with its executor job stopped."""
    t0 = datetime.now(UTC)
    job_id = dispatched_job(db, hooked, t0)
    name = read(db, JOBS, job_id)[Field.EXECUTOR_JOB_NAME]
    db.collection(JOBS).document(job_id).update({Field.EXECUTOR_STATE: "queued"})

    def meanwhile(_: str) -> None:
        db.collection(JOBS).document(job_id).update({Field.CANCEL_REQUESTED: True})

    hooked.on("get", meanwhile)
    reconcile.reconcile_job(db, hooked, job_id, SETTINGS, t0)
    proof.case()
    job = read(db, JOBS, job_id)
    assert job[Field.STATUS] == JobStatus.CANCELLED
    assert hooked.inner.get(name).state == ExecutorState.CANCELLED
    proof.held("cancelled job has no live executor job")


def test_cancel_during_submission_never_leaves_a_gpu_job(
    db: Any, hooked: Any, proof: Any
) -> None:
    """Cancel vs dispatch: the user cancels while the dispatcher is submitting; the
    job ends cancelled and its executor job is stopped, at every point of the submit."""
    t0 = datetime.now(UTC)
    for where in ("submit", "get-after-submit"):
        job_id = put_queued_job(db, f"user-{where}", queued_at=t0 - timedelta(minutes=1))

        def cancel(*_: Any, job_id: str = job_id) -> None:
            before = read(db, JOBS, job_id)
            db.collection(JOBS).document(job_id).update({Field.CANCEL_REQUESTED: True})
            after = read(db, JOBS, job_id)
            admin.handle_job_update(job_id, before, after, SETTINGS, db=db, executor=hooked,
                                    now=t0)

        if where == "submit":
            hooked.on("submit", cancel)
            dispatch.run_dispatch_pass(SETTINGS, db=db, executor=hooked, now=t0)
        else:
            dispatch.run_dispatch_pass(SETTINGS, db=db, executor=hooked, now=t0)
            cancel()
        # The scheduled pass finishes what the trigger deferred.
        reconcile.run_reconcile_pass(SETTINGS, db=db, executor=hooked, now=t0)
        proof.case()
        job = read(db, JOBS, job_id)
        assert job[Field.STATUS] == JobStatus.CANCELLED, where
        assert active_executor_jobs(hooked, job_id) == [], where
    proof.held("cancelled job, no live executor job, whether the cancel lands during or "
               "after the submit")


def test_admin_redispatch_during_a_stale_reconcile(db: Any, hooked: Any, proof: Any) -> None:
    """Admin re-dispatch vs reconcile: a pass that read the last attempt's failure
    does not touch the attempt an admin's re-dispatch started meanwhile."""
    t0 = datetime.now(UTC)
    job_id = dispatched_job(db, hooked, t0, **{Field.MAX_ATTEMPTS: 1})
    first = read(db, JOBS, job_id)[Field.EXECUTOR_JOB_NAME]
    hooked.inner.set_state(first, ExecutorState.FAILED)

    def meanwhile(_: str) -> None:
        assert reconcile.reconcile_job(db, hooked, job_id, SETTINGS, t0) == Action.FAIL
        before = read(db, JOBS, job_id)
        db.collection(JOBS).document(job_id).update({Field.STATUS: JobStatus.QUEUED})
        after = read(db, JOBS, job_id)
        assert admin.handle_job_update(job_id, before, after, SETTINGS, db=db,
                                       now=t0) == admin.AdminAction.REDISPATCH
        assert dispatch.run_dispatch_pass(SETTINGS, db=db, executor=hooked,
                                          now=t0).submitted == [job_id]

    hooked.on("get", meanwhile)
    assert reconcile.reconcile_job(db, hooked, job_id, SETTINGS, t0) == Action.NONE
    proof.case()
    job = read(db, JOBS, job_id)
    assert (job[Field.STATUS], job[Field.ATTEMPT]) == (JobStatus.DISPATCHED, 2)
    outcomes = [e[AttemptField.OUTCOME] for e in job[Field.ATTEMPT_HISTORY]]
    assert outcomes == [AttemptOutcome.EXECUTOR_FAILED, AttemptOutcome.ADMIN_REDISPATCH]
    assert active_executor_jobs(hooked, job_id) == [job[Field.EXECUTOR_JOB_NAME]]
    proof.held("the re-dispatched attempt runs alone; the failed one is recorded once")
