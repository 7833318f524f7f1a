"""Admin re-dispatch from the console, against the Firestore emulator."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from actorgen import admin, dispatch, schema
from actorgen.admin import AdminAction
from actorgen.config import Settings
from actorgen.executors.local import job_dir_name
from actorgen.schema import AttemptField, AttemptOutcome, Field, JobStatus, ModelStatus

from tests.functions.jobdocs import put_queued_job, read

JOBS = schema.TRAINING_JOBS
SETTINGS = Settings(executor_kind="local", max_attempts=3)


def failed_job(db: Any, owner: str = "alice") -> str:
    """A job that used up its attempts."""
    job_id = put_queued_job(db, owner)
    db.collection(JOBS).document(job_id).update(
        {
            Field.STATUS: JobStatus.FAILED,
            Field.ATTEMPT: 3,
            Field.MAX_ATTEMPTS: 3,
            Field.NEXT_ATTEMPT_AT: None,
            Field.ERROR: "Training failed after 3 attempts: boom",
            Field.ATTEMPT_HISTORY: [{AttemptField.ATTEMPT: n, AttemptField.OUTCOME: "x"}
                                    for n in (1, 2, 3)],
        }
    )
    job = read(db, JOBS, job_id)
    db.collection(schema.ACTORS).document(job[Field.ACTOR_ID]).update(
        {Field.MODEL_STATUS: ModelStatus.FAILED, Field.MODEL_ERROR: job[Field.ERROR]}
    )
    return job_id


def console_edit(db: Any, job_id: str, **fields: Any) -> tuple[dict, dict]:
    """An admin changes fields in the console; returns the trigger's (before, after)."""
    ref = db.collection(JOBS).document(job_id)
    before = ref.get().to_dict()
    ref.update(fields)
    return before, ref.get().to_dict()


def test_status_failed_to_queued_redispatches_with_a_fresh_budget(
    db: Any, executor_factory: Any
) -> None:
    executor = executor_factory()
    job_id = failed_job(db)
    before, after = console_edit(db, job_id, **{Field.STATUS: JobStatus.QUEUED})
    # Until the trigger accepts it, the dispatcher leaves the hand edit alone.
    assert dispatch.run_dispatch_pass(SETTINGS, db=db, executor=executor).submitted == []

    assert admin.handle_job_update(job_id, before, after, SETTINGS, db=db) == (
        AdminAction.REDISPATCH
    )
    job = read(db, JOBS, job_id)
    assert job[Field.STATUS] == JobStatus.QUEUED
    assert job[Field.ERROR] is None
    assert job[Field.MAX_ATTEMPTS] == 6
    assert [e[AttemptField.ATTEMPT] for e in job[Field.ATTEMPT_HISTORY]] == [1, 2, 3, 3]
    assert job[Field.ATTEMPT_HISTORY][-1][AttemptField.OUTCOME] == AttemptOutcome.ADMIN_REDISPATCH
    actor = read(db, schema.ACTORS, job[Field.ACTOR_ID])
    assert actor[Field.MODEL_STATUS] == ModelStatus.QUEUED and actor[Field.MODEL_ERROR] is None

    # The same event delivered again changes nothing.
    assert admin.handle_job_update(job_id, before, after, SETTINGS, db=db) == AdminAction.IGNORE

    report = dispatch.run_dispatch_pass(SETTINGS, db=db, executor=executor,
                                        now=datetime.now(UTC))
    assert report.submitted == [job_id]
    job = read(db, JOBS, job_id)
    # Attempt numbers go on (4), so the new executor job has labels of its own.
    assert job[Field.ATTEMPT] == 4
    assert job[Field.EXECUTOR_JOB_NAME] == job_dir_name(job_id, 4)


def test_hand_made_queued_on_a_completed_job_is_put_back(db: Any, executor_factory: Any) -> None:
    executor = executor_factory()
    job_id = put_queued_job(db, "alice")
    db.collection(JOBS).document(job_id).update(
        {Field.STATUS: JobStatus.COMPLETED, Field.NEXT_ATTEMPT_AT: None, Field.ATTEMPT: 1}
    )
    before, after = console_edit(db, job_id, **{Field.STATUS: JobStatus.QUEUED})
    assert admin.handle_job_update(job_id, before, after, SETTINGS, db=db) == AdminAction.REVERT
    assert read(db, JOBS, job_id)[Field.STATUS] == JobStatus.COMPLETED
    assert dispatch.run_dispatch_pass(SETTINGS, db=db, executor=executor).submitted == []


def test_other_console_edits_are_ignored(db: Any) -> None:
    job_id = failed_job(db)
    ref = db.collection(JOBS).document(job_id)
    before, after = console_edit(db, job_id, **{Field.PRIORITY: 5})
    stamp = ref.get().update_time
    assert admin.handle_job_update(job_id, before, after, SETTINGS, db=db) == AdminAction.IGNORE
    assert ref.get().update_time == stamp


def test_a_failed_job_with_a_leftover_next_attempt_at_gets_a_fresh_budget(
    db: Any, executor_factory: Any
) -> None:
    executor = executor_factory()
    job_id = failed_job(db)
    # Failed before the pipeline cleared nextAttemptAt on failure (e.g. by a stale trainer).
    db.collection(JOBS).document(job_id).update(
        {Field.NEXT_ATTEMPT_AT: datetime.now(UTC) - timedelta(hours=2)}
    )
    before, after = console_edit(db, job_id, **{Field.STATUS: JobStatus.QUEUED})
    assert admin.handle_job_update(job_id, before, after, SETTINGS, db=db) == (
        AdminAction.REDISPATCH
    )
    job = read(db, JOBS, job_id)
    assert job[Field.MAX_ATTEMPTS] == 6 and job[Field.ERROR] is None
    assert job[Field.ATTEMPT_HISTORY][-1][AttemptField.OUTCOME] == AttemptOutcome.ADMIN_REDISPATCH
    # The same event delivered again changes nothing.
    stamp = db.collection(JOBS).document(job_id).get().update_time
    assert admin.handle_job_update(job_id, before, after, SETTINGS, db=db) == AdminAction.IGNORE
    assert db.collection(JOBS).document(job_id).get().update_time == stamp

    report = dispatch.run_dispatch_pass(SETTINGS, db=db, executor=executor)
    assert report.submitted == [job_id]
    assert read(db, JOBS, job_id)[Field.ATTEMPT] == 4


def test_redispatch_is_refused_while_the_actor_has_another_job_in_progress(
    db: Any, executor_factory: Any
) -> None:
    """Intake's one-active-job-per-actor rule holds for an admin's re-dispatch too."""
    executor = executor_factory()
    job_id = failed_job(db)
    actor_id = read(db, JOBS, job_id)[Field.ACTOR_ID]
    # The user started a new job for the same actor after the first one failed.
    newer = put_queued_job(db, "alice", actor_id=actor_id)
    db.collection(JOBS).document(newer).update({Field.STATUS: JobStatus.TRAINING})
    before, after = console_edit(db, job_id, **{Field.STATUS: JobStatus.QUEUED})

    assert admin.handle_job_update(job_id, before, after, SETTINGS, db=db) == AdminAction.REFUSE
    job = read(db, JOBS, job_id)
    assert job[Field.STATUS] == JobStatus.FAILED
    assert job[Field.MAX_ATTEMPTS] == 3  # no fresh budget
    assert job[Field.ERROR] == "Training failed after 3 attempts: boom"  # the reason stays
    assert read(db, schema.ACTORS, actor_id)[Field.LATEST_JOB_ID] == newer
    assert dispatch.run_dispatch_pass(SETTINGS, db=db, executor=executor).submitted == []

    # Once the other job has ended, the same re-dispatch goes through.
    db.collection(JOBS).document(newer).update({Field.STATUS: JobStatus.COMPLETED})
    before, after = console_edit(db, job_id, **{Field.STATUS: JobStatus.QUEUED})
    assert admin.handle_job_update(job_id, before, after, SETTINGS, db=db) == (
        AdminAction.REDISPATCH
    )
    assert read(db, JOBS, job_id)[Field.MAX_ATTEMPTS] == 6
