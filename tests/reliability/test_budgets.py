"""Every sweep has a budget, and what a budget leaves over is taken up by later passes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from actorgen import reconcile, schema
from actorgen.config import Settings
from actorgen.executors import ExecutorState, SubmitRequest
from actorgen.schema import Field, JobStatus

from tests.functions.jobdocs import put_actor

SETTINGS = Settings(executor_kind="local", sweep_after_seconds=0)


def test_every_completed_job_is_checked_for_a_leftover_executor_job(
    db: Any, folder_executor: Any, proof: Any
) -> None:
    """Many completions a minute: each one is checked once for a leftover executor job
    (a newer attempt still running), over as many passes as the budget needs."""
    now = datetime.now(UTC)
    names = []
    count = 2 * reconcile.COMPLETED_CHECK_LIMIT + 5
    for i in range(count):
        job_id = f"done-{i:03d}"
        leftover = folder_executor.submit(SubmitRequest(job_id, 2, "alice"))
        names.append(leftover.name)
        db.collection(schema.TRAINING_JOBS).document(job_id).set({
            Field.USER_ID: "alice", Field.STATUS: JobStatus.COMPLETED, Field.ATTEMPT: 2,
            Field.EXECUTOR_JOB_NAME: leftover.name,
            # All within one minute, 20 to 21 minutes ago.
            Field.FINISHED_AT: now - timedelta(minutes=20) + timedelta(seconds=i * 0.5),
        })
    stopped: list[str] = []
    for _ in range(3):
        stopped += reconcile.stop_leftover_executor_jobs(db=db, executor=folder_executor,
                                                         now=now)
    proof.case(count)
    assert sorted(stopped) == [f"done-{i:03d}" for i in range(count)]
    assert all(folder_executor.get(n).state == ExecutorState.CANCELLED for n in names)
    assert reconcile.stop_leftover_executor_jobs(db=db, executor=folder_executor,
                                                 now=now) == []
    proof.held(f"{count} completions within one minute: every leftover executor job "
               f"stopped ({reconcile.COMPLETED_CHECK_LIMIT} per pass), none twice")


def test_the_pending_job_sweep_is_bounded(db: Any, proof: Any) -> None:
    """Lost intake triggers in bulk: one sweep takes in at most its budget; the next
    takes the rest."""
    actor_id = put_actor(db, "alice")
    count = reconcile.MAX_SWEPT_JOBS + 7
    for i in range(count):
        db.collection(schema.TRAINING_JOBS).document(f"lost-{i:03d}").set({
            Field.USER_ID: "alice", Field.ACTOR_ID: actor_id, Field.STATUS: JobStatus.PENDING,
            Field.INSTANCE_NAME: "1bad"})  # rejected: each is taken in independently
    now = datetime.now(UTC)
    first = reconcile.sweep_pending_jobs(SETTINGS, db=db, now=now)
    second = reconcile.sweep_pending_jobs(SETTINGS, db=db, now=now)
    proof.case(count)
    assert len(first) == reconcile.MAX_SWEPT_JOBS
    assert sorted(first + second) == [f"lost-{i:03d}" for i in range(count)]
    # A time budget too: a sweep past its deadline takes in nothing; the next one does.
    db.collection(schema.TRAINING_JOBS).document("late").set({
        Field.USER_ID: "alice", Field.ACTOR_ID: actor_id, Field.STATUS: JobStatus.PENDING})
    later = datetime.now(UTC) + timedelta(seconds=1)
    assert reconcile.sweep_pending_jobs(SETTINGS, db=db, now=later, deadline=0.0,
                                        timer=lambda: 1.0) == []
    assert reconcile.sweep_pending_jobs(SETTINGS, db=db, now=later) == ["late"]
    proof.held(f"{count} lost intake triggers taken in over two sweeps of at most "
               f"{reconcile.MAX_SWEPT_JOBS}; a sweep out of time stops")
