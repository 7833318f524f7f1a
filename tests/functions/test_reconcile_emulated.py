"""The scheduled pass (sweep, reconcile, dispatch) with real trainer processes."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from actorgen import admin, reconcile, schema
from actorgen.config import Settings
from actorgen.executors import ExecutorJob, ExecutorState, SubmitRequest
from actorgen.reconcile import Action
from actorgen.schema import AttemptField, AttemptOutcome, Field, JobStatus, ModelStatus

from tests.functions.jobdocs import put_queued_job, read

JOBS = schema.TRAINING_JOBS
SETTINGS = Settings(executor_kind="local", backoff_base_seconds=60, heartbeat_timeout_seconds=600)


def wait_until_ended(executor: Any, name: str, limit: float = 60.0) -> ExecutorState:
    """Wait for a trainer process to end (bounds a hang; asserts nothing about speed)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        state = executor.get(name).state
        if state.is_terminal:
            return state
        time.sleep(0.1)
    raise AssertionError(f"{name} still running after {limit}s")


def maintain(db: Any, bucket: Any, executor: Any, now: datetime,
             settings: Settings = SETTINGS) -> reconcile.MaintenanceReport:
    report = reconcile.run_maintenance(settings, db=db, bucket=bucket, executor=executor, now=now)
    assert report.errors == []
    return report


def test_failed_attempts_are_retried_with_backoff_then_the_job_fails(
    db: Any, bucket: Any, executor_factory: Any
) -> None:
    executor = executor_factory("exit1")
    job_id = put_queued_job(db, "alice", **{Field.MAX_ATTEMPTS: 2})
    actor_id = read(db, JOBS, job_id)[Field.ACTOR_ID]
    t0 = datetime.now(UTC)

    maintain(db, bucket, executor, t0)  # dispatches attempt 1
    first = read(db, JOBS, job_id)
    assert (first[Field.STATUS], first[Field.ATTEMPT]) == (JobStatus.DISPATCHED, 1)
    assert wait_until_ended(executor, first[Field.EXECUTOR_JOB_NAME]) == ExecutorState.FAILED

    report = maintain(db, bucket, executor, t0)  # attempt 1 failed: re-queued, not yet due
    assert report.reconciled == {job_id: Action.RETRY}
    job = read(db, JOBS, job_id)
    assert job[Field.STATUS] == JobStatus.QUEUED
    assert job[Field.NEXT_ATTEMPT_AT] == t0 + timedelta(seconds=60)
    (entry,) = job[Field.ATTEMPT_HISTORY]
    assert entry[AttemptField.ATTEMPT] == 1
    assert entry[AttemptField.OUTCOME] == AttemptOutcome.EXECUTOR_FAILED
    assert "CUDA out of memory" in entry[AttemptField.ERROR]
    assert entry[AttemptField.EXECUTOR_JOB_NAME] == first[Field.EXECUTOR_JOB_NAME]
    assert read(db, schema.ACTORS, actor_id)[Field.MODEL_STATUS] == ModelStatus.QUEUED

    t1 = t0 + timedelta(seconds=61)
    maintain(db, bucket, executor, t1)  # backoff over: attempt 2
    second = read(db, JOBS, job_id)
    assert (second[Field.STATUS], second[Field.ATTEMPT]) == (JobStatus.DISPATCHED, 2)
    assert second[Field.EXECUTOR_JOB_NAME] != first[Field.EXECUTOR_JOB_NAME]
    wait_until_ended(executor, second[Field.EXECUTOR_JOB_NAME])

    report = maintain(db, bucket, executor, t1)  # no attempts left
    assert report.reconciled == {job_id: Action.FAIL}
    job = read(db, JOBS, job_id)
    assert job[Field.STATUS] == JobStatus.FAILED
    # The user reads a short sentence; the executor's log tail stays in the history.
    assert job[Field.ERROR] == (
        "Training failed after 2 attempts: the training machine stopped unexpectedly. "
        "Start the training again or contact support."
    )
    assert job[Field.NEXT_ATTEMPT_AT] is None
    assert len(job[Field.ATTEMPT_HISTORY]) == 2
    last = job[Field.ATTEMPT_HISTORY][-1][AttemptField.ERROR]
    assert last.startswith("trainer exited with code 1") and "CUDA out of memory" in last
    actor = read(db, schema.ACTORS, actor_id)
    assert actor[Field.MODEL_STATUS] == ModelStatus.FAILED
    assert actor[Field.MODEL_ERROR] == job[Field.ERROR]
    # Failed is final for the pipeline: further passes change nothing.
    assert maintain(db, bucket, executor, t1 + timedelta(hours=1)).reconciled == {}


def test_executor_success_without_completion_is_a_failed_attempt(
    db: Any, bucket: Any, executor_factory: Any
) -> None:
    executor = executor_factory("exit0")
    job_id = put_queued_job(db, "alice")
    now = datetime.now(UTC)
    maintain(db, bucket, executor, now)
    name = read(db, JOBS, job_id)[Field.EXECUTOR_JOB_NAME]
    assert wait_until_ended(executor, name) == ExecutorState.SUCCEEDED
    maintain(db, bucket, executor, now)
    job = read(db, JOBS, job_id)
    assert job[Field.STATUS] == JobStatus.QUEUED
    assert job[Field.ATTEMPT_HISTORY][-1][AttemptField.OUTCOME] == AttemptOutcome.NO_COMPLETION


def test_trainer_reported_completion_always_wins(
    db: Any, bucket: Any, executor_factory: Any
) -> None:
    executor = executor_factory("exit1")  # the executor even says it failed
    job_id = put_queued_job(db, "alice")
    now = datetime.now(UTC)
    maintain(db, bucket, executor, now)
    job_ref = db.collection(JOBS).document(job_id)
    name = read(db, JOBS, job_id)[Field.EXECUTOR_JOB_NAME]
    # The trainer's writes.
    for status in (JobStatus.PREPARING, JobStatus.TRAINING, JobStatus.UPLOADING):
        job_ref.update({Field.STATUS: status, Field.HEARTBEAT_AT: now})
    job_ref.update({Field.STATUS: JobStatus.COMPLETED, Field.TRAINED_MODEL_ID: "m1",
                    Field.PROGRESS: 100})
    wait_until_ended(executor, name)
    before = job_ref.get().update_time
    report = maintain(db, bucket, executor, now + timedelta(days=1))
    assert report.reconciled == {}
    assert job_ref.get().update_time == before
    assert read(db, JOBS, job_id)[Field.STATUS] == JobStatus.COMPLETED


def test_stale_heartbeat_stops_the_trainer_and_requeues(
    db: Any, bucket: Any, executor_factory: Any
) -> None:
    executor = executor_factory("hang")
    job_id = put_queued_job(db, "alice")
    now = datetime.now(UTC)
    maintain(db, bucket, executor, now)
    job_ref = db.collection(JOBS).document(job_id)
    job_ref.update({Field.STATUS: JobStatus.TRAINING, Field.HEARTBEAT_AT: now})
    name = read(db, JOBS, job_id)[Field.EXECUTOR_JOB_NAME]

    # Still fresh: nothing happens.
    assert maintain(db, bucket, executor, now + timedelta(seconds=300)).reconciled == {}
    assert executor.get(name).state == ExecutorState.RUNNING

    # (630: dispatchedAt is the real time of the submission, a moment after `now`.)
    report = maintain(db, bucket, executor, now + timedelta(seconds=630))
    assert report.reconciled == {job_id: Action.RETRY}
    assert executor.get(name).state == ExecutorState.CANCELLED  # no zombie holds the GPU
    job = read(db, JOBS, job_id)
    assert job[Field.STATUS] == JobStatus.QUEUED
    entry = job[Field.ATTEMPT_HISTORY][-1]
    assert entry[AttemptField.OUTCOME] == AttemptOutcome.STALE
    assert "no heartbeat for 10 minutes" in entry[AttemptField.ERROR]


def test_lost_executor_job_is_a_failed_attempt(db: Any, bucket: Any, executor_factory: Any) -> None:
    executor = executor_factory()
    job_id = put_queued_job(db, "alice")
    db.collection(JOBS).document(job_id).update(
        {Field.STATUS: JobStatus.DISPATCHED, Field.ATTEMPT: 1,
         Field.EXECUTOR_JOB_NAME: "j" + "0" * 40 + "-a1", Field.NEXT_ATTEMPT_AT: None}
    )
    maintain(db, bucket, executor, datetime.now(UTC) - timedelta(minutes=5))
    entry = read(db, JOBS, job_id)[Field.ATTEMPT_HISTORY][-1]
    assert entry[AttemptField.OUTCOME] == AttemptOutcome.LOST


def test_cancel_request_on_a_queued_job(db: Any, bucket: Any, executor_factory: Any) -> None:
    executor = executor_factory()
    job_id = put_queued_job(db, "alice", **{Field.NEXT_ATTEMPT_AT: datetime.now(UTC)
                                            + timedelta(hours=1)})
    db.collection(JOBS).document(job_id).update({Field.CANCEL_REQUESTED: True})
    report = maintain(db, bucket, executor, datetime.now(UTC))
    assert report.cancelled == [job_id]
    job = read(db, JOBS, job_id)
    assert job[Field.STATUS] == JobStatus.CANCELLED
    assert read(db, schema.ACTORS, job[Field.ACTOR_ID])[Field.MODEL_STATUS] == ModelStatus.NONE


def test_cancel_request_on_a_running_job_stops_it(
    db: Any, bucket: Any, executor_factory: Any
) -> None:
    executor = executor_factory("hang")
    job_id = put_queued_job(db, "alice")
    maintain(db, bucket, executor, datetime.now(UTC))
    job_ref = db.collection(JOBS).document(job_id)
    job_ref.update({Field.STATUS: JobStatus.TRAINING})
    before = job_ref.get().to_dict()
    job_ref.update({Field.CANCEL_REQUESTED: True})
    after = job_ref.get().to_dict()

    # What the on_document_updated trigger does with that event.
    action = admin.handle_job_update(job_id, before, after, SETTINGS, db=db, executor=executor)
    assert action == admin.AdminAction.CANCEL
    job = read(db, JOBS, job_id)
    assert job[Field.STATUS] == JobStatus.CANCELLED
    assert job[Field.ATTEMPT_HISTORY][-1][AttemptField.OUTCOME] == AttemptOutcome.CANCELLED
    assert executor.get(job[Field.EXECUTOR_JOB_NAME]).state == ExecutorState.CANCELLED


class Scripted:
    """An executor whose one job is in whatever state the test sets (no processes)."""

    kind = "vertex"

    def __init__(self, name: str) -> None:
        self.job = ExecutorJob(name, ExecutorState.QUEUED, None, "JOB_STATE_PENDING")
        self.cancelled: list[str] = []

    def set(self, state: ExecutorState, raw: str) -> None:
        self.job = ExecutorJob(self.job.name, state, None, raw)

    def find(self, job_id: str, attempt: int) -> ExecutorJob:
        return self.job

    def get(self, name: str) -> ExecutorJob:
        return self.job

    def cancel(self, name: str) -> None:
        self.cancelled.append(name)

    def submit(self, request: SubmitRequest) -> ExecutorJob:
        raise AssertionError("nothing is dispatched in this test")


def test_a_job_that_waited_for_capacity_gets_a_full_heartbeat_window(
    db: Any, bucket: Any
) -> None:
    executor = Scripted("projects/p/locations/l/customJobs/1")
    t0 = datetime.now(UTC)
    job_id = put_queued_job(db, "alice")
    db.collection(JOBS).document(job_id).update(
        {Field.STATUS: JobStatus.DISPATCHED, Field.ATTEMPT: 1, Field.NEXT_ATTEMPT_AT: None,
         Field.EXECUTOR_JOB_NAME: executor.job.name, Field.EXECUTOR_STATE: "JOB_STATE_PENDING",
         Field.DISPATCHED_AT: t0 - timedelta(minutes=40)}
    )
    # FLEX_START: 40 minutes waiting for a GPU is no reason to give up.
    assert maintain(db, bucket, executor, t0).reconciled == {}

    executor.set(ExecutorState.RUNNING, "JOB_STATE_RUNNING")
    assert maintain(db, bucket, executor, t0).reconciled == {job_id: Action.OBSERVE}
    job = read(db, JOBS, job_id)
    assert (job[Field.STATUS], job[Field.EXECUTOR_STATE]) == (
        JobStatus.DISPATCHED, "JOB_STATE_RUNNING"
    )
    assert job[Field.EXECUTOR_STATE_AT] == t0
    assert executor.cancelled == []

    # The trainer has the whole timeout from there to report...
    assert maintain(db, bucket, executor, t0 + timedelta(minutes=9)).reconciled == {}
    # ...and is stale (its executor job stopped) once that is over.
    report = maintain(db, bucket, executor, t0 + timedelta(minutes=11))
    assert report.reconciled == {job_id: Action.RETRY}
    assert executor.cancelled == [executor.job.name]
    entry = read(db, JOBS, job_id)[Field.ATTEMPT_HISTORY][-1]
    assert entry[AttemptField.OUTCOME] == AttemptOutcome.STALE


def test_a_completed_jobs_leftover_executor_job_is_cancelled(
    db: Any, bucket: Any, executor_factory: Any
) -> None:
    executor = executor_factory("hang")
    now = datetime.now(UTC)

    def completed_with_running_executor_job(finished_ago: timedelta) -> tuple[str, str]:
        job_id = put_queued_job(db, "alice")
        # Attempt 1 finished late and completed the job while attempt 2 was submitted.
        newer = executor.submit(SubmitRequest(job_id, 2, "alice"))
        db.collection(JOBS).document(job_id).update(
            {Field.STATUS: JobStatus.COMPLETED, Field.ATTEMPT: 2, Field.NEXT_ATTEMPT_AT: None,
             Field.EXECUTOR_JOB_NAME: newer.name, Field.EXECUTOR_STATE: "running",
             Field.FINISHED_AT: now - finished_ago, Field.TRAINED_MODEL_ID: job_id}
        )
        return job_id, newer.name

    leftover, leftover_name = completed_with_running_executor_job(timedelta(minutes=15))
    # Just completed: its trainer may still be exiting; left alone for now.
    recent, recent_name = completed_with_running_executor_job(timedelta(minutes=2))
    stamp = db.collection(JOBS).document(leftover).get().update_time

    report = maintain(db, bucket, executor, now)
    assert executor.get(leftover_name).state == ExecutorState.CANCELLED
    assert executor.get(recent_name).state == ExecutorState.RUNNING
    assert report.stopped == [leftover]
    # Completed stays completed, untouched.
    assert db.collection(JOBS).document(leftover).get().update_time == stamp
    assert read(db, JOBS, leftover)[Field.STATUS] == JobStatus.COMPLETED
    # Later, past the grace, the other one is stopped too; nothing is cancelled twice.
    assert maintain(db, bucket, executor, now + timedelta(minutes=9)).stopped == [recent]


class EndlessListing:
    """A bucket with more objects than any sweep may list; notes when it was listed."""

    def __init__(self, inner: Any, on_list: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.on_list = on_list
        self.listed = 0

    def list_blobs(self, **options: Any) -> Any:
        self.on_list()
        old = datetime(2020, 1, 1, tzinfo=UTC)  # past the sweep's age limit: never validated
        for i in range(100_000):
            self.listed += 1
            yield SimpleNamespace(name=f"users/u{i:07d}/actors/a/images/p.jpg", updated=old,
                                  time_created=old, generation=1, size=1)
        raise AssertionError("the upload sweep listed without a limit")


def test_reconcile_and_dispatch_run_before_a_bounded_upload_sweep(
    db: Any, bucket: Any, executor_factory: Any
) -> None:
    executor = executor_factory("hang")
    job_id = put_queued_job(db, "alice")
    seen: list[str] = []
    huge = EndlessListing(bucket, lambda: seen.append(read(db, JOBS, job_id)[Field.STATUS]))
    settings = Settings(executor_kind="local", upload_sweep_max_objects=500)
    report = reconcile.run_maintenance(settings, db=db, bucket=huge, executor=executor)
    assert report.errors == []
    assert report.dispatched == [job_id]
    assert seen == [JobStatus.DISPATCHED]  # the job was dispatched before Storage was listed
    assert huge.listed == 501  # the one over the budget is where the next sweep resumes
