"""Every status change of a job lands in its statusHistory, with its time (the timeline)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from actorgen import admin, intake, reconcile, schema
from actorgen.config import Settings
from actorgen.schema import Field, JobStatus, StatusChangeField

from tests.functions.jobdocs import new_id, put_actor, read
from tests.functions.test_reconcile_emulated import wait_until_ended

S = JobStatus
SETTINGS = Settings(executor_kind="local", backoff_base_seconds=60, max_attempts=2)


def timeline(db: Any, job_id: str) -> list[tuple[str, datetime]]:
    job = read(db, schema.TRAINING_JOBS, job_id)
    return [(e[StatusChangeField.STATUS], e[StatusChangeField.AT]) for e in job[Field.STATUS_HISTORY]]


def test_intake_dispatch_retry_failure_and_redispatch_are_all_recorded(
    db: Any, bucket: Any, executor_factory: Any
) -> None:
    executor = executor_factory("exit1")
    created = datetime.now(UTC) - timedelta(minutes=1)
    job_id = new_id("job")
    job_ref = db.collection(schema.TRAINING_JOBS).document(job_id)
    job_ref.set({
        Field.USER_ID: "alice", Field.ACTOR_ID: put_actor(db, "alice"),
        Field.INSTANCE_NAME: "sks_person",
        Field.BASE_MODEL_ID: "stable-diffusion-v1-5/stable-diffusion-v1-5",
        Field.STATUS: S.PENDING, Field.CREATED_AT: created,
    })
    t0 = datetime.now(UTC)
    assert intake.process_job(job_id, SETTINGS, db=db, now=t0, nudge=False) == "queued"

    def maintain(now: datetime) -> None:
        report = reconcile.run_maintenance(SETTINGS, db=db, bucket=bucket, executor=executor,
                                           now=now)
        assert report.errors == []

    maintain(t0)  # attempt 1 dispatched
    wait_until_ended(executor, read(db, schema.TRAINING_JOBS, job_id)[Field.EXECUTOR_JOB_NAME])
    maintain(t0)  # failed attempt: re-queued with backoff
    t1 = t0 + timedelta(seconds=61)
    maintain(t1)  # attempt 2
    wait_until_ended(executor, read(db, schema.TRAINING_JOBS, job_id)[Field.EXECUTOR_JOB_NAME])
    maintain(t1)  # out of attempts: failed

    # An admin re-dispatches from the console (status failed -> queued); the trigger acts.
    before = read(db, schema.TRAINING_JOBS, job_id)
    job_ref.update({Field.STATUS: S.QUEUED})
    after = read(db, schema.TRAINING_JOBS, job_id)
    t2 = t1 + timedelta(minutes=5)
    assert admin.handle_job_update(job_id, before, after, SETTINGS, db=db, now=t2) == "redispatch"

    steps = timeline(db, job_id)
    assert [status for status, _ in steps] == [
        S.PENDING, S.QUEUED, S.DISPATCHING, S.DISPATCHED, S.QUEUED,
        S.DISPATCHING, S.DISPATCHED, S.FAILED, S.QUEUED,
    ]
    # Each entry carries the time its writer gave the change (the passes here run on a
    # simulated clock, the dispatcher's claims on the real one).
    assert steps[0][1] == created and steps[1][1] == t0 and steps[-1][1] == t2
    assert steps[4][1] == t0 and steps[7][1] == t1
