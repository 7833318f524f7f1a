"""The dispatcher against the Firestore emulator and a LocalExecutor running real processes."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from actorgen import dispatch, schema, tasks
from actorgen.config import Settings
from actorgen.executors import ExecutorError, ExecutorState, SubmitRequest
from actorgen.executors.local import job_dir_name
from actorgen.executors.settings import TRAINER_IDENTITY_MISSING
from actorgen.schema import AttemptField, AttemptOutcome, Field, JobStatus, ModelStatus

from tests.functions.jobdocs import put_queued_job, read

JOBS = schema.TRAINING_JOBS


class Recording:
    """Wraps a real executor and records every submit (to count GPU jobs started)."""

    def __init__(self, inner: Any, fail_with: ExecutorError | None = None) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.fail_with = fail_with
        self.submits: list[tuple[str, int]] = []
        #: Runs once, inside the next submit, before the create: "while it is in flight".
        self.during_submit: Callable[[SubmitRequest], Any] | None = None
        self._lock = threading.Lock()

    def submit(self, request: SubmitRequest) -> Any:
        with self._lock:
            self.submits.append((request.job_id, request.attempt))
        if self.fail_with is not None:
            raise self.fail_with
        hook, self.during_submit = self.during_submit, None
        if hook is not None:
            replaced = hook(request)
            if replaced is not None:
                return replaced
        return self.inner.submit(request)

    def find(self, job_id: str, attempt: int) -> Any:
        return self.inner.find(job_id, attempt)

    def get(self, name: str) -> Any:
        return self.inner.get(name)

    def cancel(self, name: str) -> None:
        self.inner.cancel(name)


def started_processes(executor: Any) -> list[str]:
    return sorted(p.name for p in executor.workdir.glob("j*-a*"))


def test_claims_in_priority_then_fifo_order_under_both_caps(
    db: Any, executor_factory: Any
) -> None:
    executor = executor_factory()
    settings = Settings(executor_kind="local", max_running_jobs=2, max_running_jobs_per_user=1)
    now = datetime.now(UTC)
    alice_old = put_queued_job(db, "alice", queued_at=now - timedelta(minutes=9))
    alice_new = put_queued_job(db, "alice", queued_at=now - timedelta(minutes=5))
    bob = put_queued_job(db, "bob", queued_at=now - timedelta(minutes=1))
    carol_low = put_queued_job(db, "carol", queued_at=now - timedelta(minutes=20), priority=-0)
    dave_urgent = put_queued_job(db, "dave", queued_at=now, priority=5)

    report = dispatch.run_dispatch_pass(settings, db=db, executor=executor, now=now)
    # Priority first, then the oldest; two slots in all.
    assert report.submitted == [dave_urgent, carol_low]
    for job_id in report.submitted:
        job = read(db, JOBS, job_id)
        assert job[Field.STATUS] == JobStatus.DISPATCHED
        assert job[Field.ATTEMPT] == 1
        assert job[Field.EXECUTOR_JOB_NAME] == job_dir_name(job_id, 1)
        assert job[Field.EXECUTOR] == "local"
        assert job[Field.LEASE_OWNER] is None and job[Field.DISPATCHED_AT]
    assert started_processes(executor) == sorted(job_dir_name(j, 1) for j in report.submitted)

    # Full: a second pass starts nothing.
    assert dispatch.run_dispatch_pass(settings, db=db, executor=executor, now=now).submitted == []
    # Room for one more, per user: alice's older job goes before bob's newer one.
    roomy = Settings(executor_kind="local", max_running_jobs=4, max_running_jobs_per_user=1)
    later = dispatch.run_dispatch_pass(roomy, db=db, executor=executor, now=now)
    assert later.submitted == [alice_old, bob]
    assert read(db, JOBS, alice_new)[Field.STATUS] == JobStatus.QUEUED


def test_concurrent_dispatchers_never_submit_a_job_twice(
    db: Any, executor_factory: Any
) -> None:
    executor = Recording(executor_factory())
    settings = Settings(executor_kind="local", max_running_jobs=4, max_running_jobs_per_user=10)
    now = datetime.now(UTC)
    job_ids = [put_queued_job(db, f"user{i % 3}", queued_at=now - timedelta(seconds=i))
               for i in range(7)]
    reports: list[dispatch.DispatchReport] = []

    def run_pass() -> None:
        reports.append(dispatch.run_dispatch_pass(settings, db=db, executor=executor, now=now))

    threads = [threading.Thread(target=run_pass) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Each job submitted at most once, and the global cap held across the passes.
    assert max(Counter(executor.submits).values()) == 1
    dispatched = [j for j in job_ids if read(db, JOBS, j)[Field.STATUS] == JobStatus.DISPATCHED]
    assert len(dispatched) == 4 == len(executor.submits)
    assert sorted(sum((r.submitted for r in reports), [])) == sorted(dispatched)
    assert len(started_processes(executor.inner)) == 4


def test_expired_lease_is_redriven_without_a_second_gpu_job(
    db: Any, executor_factory: Any
) -> None:
    inner = executor_factory()
    settings = Settings(executor_kind="local", dispatch_lease_seconds=60)
    job_id = put_queued_job(db, "alice")
    now = datetime.now(UTC)
    # A dispatcher claimed it, submitted, then died before recording anything.
    db.collection(JOBS).document(job_id).update(
        {Field.STATUS: JobStatus.DISPATCHING, Field.ATTEMPT: 1, Field.LEASE_OWNER: "dead",
         Field.LEASE_EXPIRES_AT: now + timedelta(seconds=60), Field.NEXT_ATTEMPT_AT: None}
    )
    first = inner.submit(SubmitRequest(job_id, 1, "alice"))
    executor = Recording(inner)

    # While the lease holds, nobody touches it.
    assert dispatch.run_dispatch_pass(settings, db=db, executor=executor, now=now).redriven == []
    later = now + timedelta(seconds=61)
    report = dispatch.run_dispatch_pass(
        settings, db=db, executor=executor, now=later, clock=lambda: later
    )
    assert report.redriven == [job_id] and report.submitted == [job_id]
    job = read(db, JOBS, job_id)
    assert job[Field.STATUS] == JobStatus.DISPATCHED
    assert job[Field.ATTEMPT] == 1  # the same attempt, not a new one
    assert job[Field.EXECUTOR_JOB_NAME] == first.name
    assert started_processes(inner) == [first.name]  # still one process


def test_retryable_submit_error_requeues_without_using_an_attempt(
    db: Any, executor_factory: Any
) -> None:
    settings = Settings(executor_kind="local", backoff_base_seconds=30)
    flaky = Recording(executor_factory(), ExecutorError("Vertex unavailable", retryable=True))
    job_id = put_queued_job(db, "alice")
    now = datetime.now(UTC)

    report = dispatch.run_dispatch_pass(settings, db=db, executor=flaky, now=now)
    assert report.retrying == [job_id]
    job = read(db, JOBS, job_id)
    assert job[Field.STATUS] == JobStatus.QUEUED
    assert job[Field.ATTEMPT] == 0
    assert job[Field.NEXT_ATTEMPT_AT] == now + timedelta(seconds=30)
    entry = job[Field.ATTEMPT_HISTORY][-1]
    assert entry[AttemptField.OUTCOME] == AttemptOutcome.SUBMIT_RETRY
    assert entry[AttemptField.ERROR] == "Vertex unavailable"

    # Backoff holds it; afterwards the same attempt number is submitted again.
    flaky.fail_with = None
    assert dispatch.run_dispatch_pass(settings, db=db, executor=flaky, now=now).submitted == []
    after = now + timedelta(seconds=31)
    assert dispatch.run_dispatch_pass(settings, db=db, executor=flaky, now=after).submitted == [
        job_id
    ]
    assert flaky.submits == [(job_id, 1), (job_id, 1)]
    assert read(db, JOBS, job_id)[Field.STATUS] == JobStatus.DISPATCHED


def test_submit_retries_are_bounded(db: Any, executor_factory: Any) -> None:
    settings = Settings(executor_kind="local", backoff_base_seconds=1, backoff_max_seconds=1)
    flaky = Recording(executor_factory(), ExecutorError("quota exceeded", retryable=True))
    job_id = put_queued_job(db, "alice")
    now = datetime.now(UTC)
    for i in range(dispatch.MAX_SUBMIT_RETRIES + 1):
        dispatch.run_dispatch_pass(settings, db=db, executor=flaky,
                                   now=now + timedelta(seconds=2 * i))
    job = read(db, JOBS, job_id)
    assert job[Field.STATUS] == JobStatus.FAILED
    assert job[Field.ERROR] == (
        f"Training could not be started after {dispatch.MAX_SUBMIT_RETRIES + 1} tries: "
        "the training service is unavailable. Start the training again or contact support."
    )
    assert job[Field.ATTEMPT_HISTORY][-1][AttemptField.ERROR] == "quota exceeded"
    assert job[Field.NEXT_ATTEMPT_AT] is None


def test_bad_configuration_fails_the_job_with_a_short_message(db: Any) -> None:
    # Vertex without a trainer image: refused before any network call.
    settings = Settings(executor_kind="vertex", project="demo-actorgen", bucket="b")
    job_id = put_queued_job(db, "alice")
    report = dispatch.run_dispatch_pass(settings, db=db)
    assert report.failed == [job_id]
    job = read(db, JOBS, job_id)
    assert job[Field.STATUS] == JobStatus.FAILED
    assert job[Field.ERROR] == (
        "Training could not be started: the training service refused the job. "
        "Start the training again or contact support."
    )
    # The executor's own words are for admins.
    entry = job[Field.ATTEMPT_HISTORY][-1]
    assert entry[AttemptField.OUTCOME] == AttemptOutcome.SUBMIT_FAILED
    assert entry[AttemptField.ERROR] == (
        "the Vertex executor is misconfigured: the Vertex executor needs trainer_image_uri "
        f"to be set; {TRAINER_IDENTITY_MISSING}"
    )
    assert job[Field.NEXT_ATTEMPT_AT] is None
    actor = read(db, schema.ACTORS, job[Field.ACTOR_ID])
    assert actor[Field.MODEL_STATUS] == ModelStatus.FAILED
    assert actor[Field.MODEL_ERROR] == job[Field.ERROR]


def test_a_claim_late_in_a_long_pass_still_gets_a_full_lease(
    db: Any, executor_factory: Any
) -> None:
    inner = executor_factory()
    executor = Recording(inner)
    settings = Settings(executor_kind="local", dispatch_lease_seconds=300,
                        max_running_jobs=4, max_running_jobs_per_user=4)
    # This pass started long ago (a slow reconcile, many submits before this one).
    started = datetime.now(UTC) - timedelta(seconds=400)
    job_id = put_queued_job(db, "alice", queued_at=started)
    rivals: list[dispatch.DispatchReport] = []
    leases: list[datetime] = []

    def another_pass_meanwhile(request: SubmitRequest) -> None:
        # While this create is in flight, the next minute's pass runs (real time).
        leases.append(read(db, JOBS, job_id)[Field.LEASE_EXPIRES_AT])
        rivals.append(dispatch.run_dispatch_pass(settings, db=db, executor=executor))

    executor.during_submit = another_pass_meanwhile
    report = dispatch.run_dispatch_pass(settings, db=db, executor=executor, now=started)
    assert report.submitted == [job_id]
    assert leases[0] > datetime.now(UTC) + timedelta(seconds=200)  # from the claim, not the pass
    assert rivals[0].redriven == [] and rivals[0].submitted == []
    assert executor.submits == [(job_id, 1)]  # one GPU job
    assert started_processes(inner) == [job_dir_name(job_id, 1)]


def test_a_second_executor_job_for_one_attempt_is_cancelled(
    db: Any, executor_factory: Any
) -> None:
    inner = executor_factory()
    executor = Recording(inner)
    settings = Settings(executor_kind="local")
    job_id = put_queued_job(db, "alice")
    recorded: list[Any] = []

    def two_creates_raced(request: SubmitRequest) -> Any:
        # Another dispatcher created and recorded an executor job for this attempt
        # first; this create does not see it (e.g. Vertex had not listed it yet) and
        # makes a second one, under another name.
        first = inner.submit(request)
        db.collection(JOBS).document(job_id).update(
            {Field.STATUS: JobStatus.DISPATCHED, Field.EXECUTOR_JOB_NAME: first.name,
             Field.LEASE_OWNER: None, Field.LEASE_EXPIRES_AT: None}
        )
        recorded.append(first)
        return inner.submit(SubmitRequest(request.job_id, request.attempt + 50, "alice"))

    executor.during_submit = two_creates_raced
    report = dispatch.run_dispatch_pass(settings, db=db, executor=executor)
    assert inner.get(job_dir_name(job_id, 51)).state == ExecutorState.CANCELLED
    assert inner.get(recorded[0].name).state == ExecutorState.RUNNING
    job = read(db, JOBS, job_id)
    assert job[Field.EXECUTOR_JOB_NAME] == recorded[0].name  # the recorded one stays
    assert report.duplicates == [job_id] and report.submitted == []


def test_a_redriven_job_with_cancel_requested_is_cancelled_not_submitted(
    db: Any, executor_factory: Any
) -> None:
    inner = executor_factory()
    settings = Settings(executor_kind="local")
    job_id = put_queued_job(db, "alice")
    now = datetime.now(UTC)
    # A dispatcher claimed it, created the executor job, then died; then the user cancelled.
    db.collection(JOBS).document(job_id).update(
        {Field.STATUS: JobStatus.DISPATCHING, Field.ATTEMPT: 1, Field.LEASE_OWNER: "dead",
         Field.LEASE_EXPIRES_AT: now - timedelta(seconds=1), Field.NEXT_ATTEMPT_AT: None,
         Field.CANCEL_REQUESTED: True}
    )
    orphan = inner.submit(SubmitRequest(job_id, 1, "alice"))
    executor = Recording(inner)

    report = dispatch.run_dispatch_pass(settings, db=db, executor=executor)
    job = read(db, JOBS, job_id)
    assert job[Field.STATUS] == JobStatus.CANCELLED
    assert executor.submits == [] and report.redriven == [] and report.submitted == []
    assert inner.get(orphan.name).state == ExecutorState.CANCELLED
    assert report.cancelled == [job_id]
    assert job[Field.LEASE_OWNER] is None and job[Field.FINISHED_AT]
    entry = job[Field.ATTEMPT_HISTORY][-1]
    assert entry[AttemptField.OUTCOME] == AttemptOutcome.CANCELLED
    assert entry[AttemptField.EXECUTOR_JOB_NAME] == orphan.name
    assert read(db, schema.ACTORS, job[Field.ACTOR_ID])[Field.MODEL_STATUS] == ModelStatus.NONE


def test_only_due_jobs_are_scanned_highest_priority_first(
    db: Any, executor_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    executor = executor_factory()
    settings = Settings(executor_kind="local", max_running_jobs=1)
    monkeypatch.setattr(dispatch, "QUEUED_SCAN_LIMIT", 2)
    now = datetime.now(UTC)
    # Jobs that cannot run now, named to come first in any unordered scan.
    for i in range(3):  # backing off, at the top priority
        put_queued_job(db, f"waiting{i}", job_id=f"a-waiting-{i}", priority=9,
                       queued_at=now - timedelta(hours=1),
                       **{Field.NEXT_ATTEMPT_AT: now + timedelta(hours=1)})
    put_queued_job(db, "held", job_id="a-unreleased", **{Field.NEXT_ATTEMPT_AT: None})
    put_queued_job(db, "low", job_id="z-low", queued_at=now - timedelta(minutes=10))
    put_queued_job(db, "high", job_id="z-high", queued_at=now, priority=5)

    report = dispatch.run_dispatch_pass(settings, db=db, executor=executor, now=now)
    assert report.submitted == ["z-high"]
    roomy = Settings(executor_kind="local", max_running_jobs=2)
    assert dispatch.run_dispatch_pass(roomy, db=db, executor=executor, now=now).submitted == [
        "z-low"
    ]


def test_unreleased_queued_job_is_not_dispatched(db: Any, executor_factory: Any) -> None:
    executor = executor_factory()
    job_id = put_queued_job(db, "alice", **{Field.NEXT_ATTEMPT_AT: None})
    report = dispatch.run_dispatch_pass(Settings(executor_kind="local"), db=db, executor=executor)
    assert report.submitted == [] and read(db, JOBS, job_id)[Field.STATUS] == JobStatus.QUEUED


def test_a_failed_nudge_is_only_logged(emulators: Any, monkeypatch: Any) -> None:
    # This suite runs no Functions emulator, so the Tasks emulator has no such queue
    # (404): the nudge fails, says so, and raises nothing. The e2e test sees it work.
    assert tasks.nudge_dispatcher("job-1", Settings()) is False
    monkeypatch.setenv("CLOUD_TASKS_EMULATOR_HOST", "127.0.0.1:9")  # nothing listens there
    assert tasks.nudge_dispatcher("job-1", Settings()) is False


def test_more_than_one_gpu_per_job_is_refused_at_dispatch_with_the_reason(db: Any) -> None:
    # The trainer trains on one GPU; ACCELERATOR_COUNT=2 would pay for an idle one.
    settings = Settings(executor_kind="vertex", project="demo-actorgen", bucket="b",
                        trainer_image_uri="r/actorgen/trainer:t", accelerator_count=2)
    job_id = put_queued_job(db, "alice")
    report = dispatch.run_dispatch_pass(settings, db=db)
    assert report.failed == [job_id]
    entry = read(db, JOBS, job_id)[Field.ATTEMPT_HISTORY][-1]
    assert entry[AttemptField.OUTCOME] == AttemptOutcome.SUBMIT_FAILED
    assert "accelerator_count is 2, but the trainer trains on one GPU" in entry[AttemptField.ERROR]
    assert "ACCELERATOR_COUNT to 1" in entry[AttemptField.ERROR]
