"""decide() and apply_update(): what the reconciler does for each executor state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from actorgen import reconcile
from actorgen.config import Settings
from actorgen.executors import ExecutorJob, ExecutorState
from actorgen.reconcile import Action
from actorgen.schema import AttemptField, AttemptOutcome, Field, JobStatus

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
SETTINGS = Settings(heartbeat_timeout_seconds=600, backoff_base_seconds=60)


def job(status: str = JobStatus.TRAINING, attempt: int = 1, **kw: Any) -> dict[str, Any]:
    base = {
        Field.STATUS: status,
        Field.ATTEMPT: attempt,
        Field.MAX_ATTEMPTS: 3,
        Field.EXECUTOR_JOB_NAME: "exec-1",
        Field.EXECUTOR_STATE: "running",
        Field.DISPATCHED_AT: NOW - timedelta(minutes=30),
        Field.HEARTBEAT_AT: NOW - timedelta(seconds=20),
        Field.ATTEMPT_HISTORY: [],
    }
    base.update(kw)
    return base


def ex(state: ExecutorState, error: str | None = None, raw: str = "") -> ExecutorJob:
    return ExecutorJob("exec-1", state, error, raw or state.value)


def test_healthy_running_job_is_left_alone() -> None:
    assert reconcile.decide(job(), ex(ExecutorState.RUNNING), SETTINGS, NOW).action == Action.NONE


def test_queued_executor_job_has_no_heartbeat_deadline() -> None:
    waiting = job(JobStatus.DISPATCHED, **{Field.HEARTBEAT_AT: None,
                                           Field.EXECUTOR_STATE: "queued"})
    decision = reconcile.decide(waiting, ex(ExecutorState.QUEUED), SETTINGS, NOW)
    assert decision.action == Action.NONE


def test_new_executor_state_is_observed() -> None:
    decision = reconcile.decide(job(**{Field.EXECUTOR_STATE: "queued"}),
                                ex(ExecutorState.RUNNING), SETTINGS, NOW)
    assert decision.action == Action.OBSERVE


def observe(doc: dict[str, Any], executor_job: ExecutorJob, now: datetime) -> dict[str, Any]:
    """The document after the reconciler recorded what it saw (asserts it was an OBSERVE)."""
    decision = reconcile.decide(doc, executor_job, SETTINGS, now)
    assert decision.action == Action.OBSERVE, decision
    _, update = reconcile.apply_update(doc, decision, executor_job, SETTINGS, now)
    return {**doc, **update}


def test_a_job_that_waited_in_the_executor_queue_is_not_stale_when_it_starts() -> None:
    # Dispatched 30 minutes ago (timeout 10), provisioning (FLEX_START/SPOT) all along.
    waited = job(JobStatus.DISPATCHED, **{Field.HEARTBEAT_AT: None,
                                          Field.EXECUTOR_STATE: "JOB_STATE_PENDING"})
    pending = ExecutorJob("exec-1", ExecutorState.QUEUED, None, "JOB_STATE_PENDING")
    running = ExecutorJob("exec-1", ExecutorState.RUNNING, None, "JOB_STATE_RUNNING")
    assert reconcile.decide(waited, pending, SETTINGS, NOW).action == Action.NONE
    # First seen running: recorded with its time, never stale on that pass.
    seen = observe(waited, running, NOW)
    assert seen[Field.EXECUTOR_STATE] == "JOB_STATE_RUNNING"
    assert seen[Field.EXECUTOR_STATE_AT] == NOW
    assert reconcile.heartbeat_reference(seen) == NOW
    # The trainer now has the full timeout to write its first heartbeat...
    assert reconcile.decide(seen, running, SETTINGS, NOW + timedelta(minutes=9)).action == (
        Action.NONE
    )
    # ...and is stale after it.
    late = reconcile.decide(seen, running, SETTINGS, NOW + timedelta(minutes=11))
    assert (late.action, late.outcome) == (Action.RETRY, AttemptOutcome.STALE)


def test_a_worker_restarted_after_preemption_is_not_killed() -> None:
    # Training, last heartbeat 8 minutes ago; the VM is preempted and Vertex restarts it.
    training = job(**{Field.EXECUTOR_STATE: "JOB_STATE_RUNNING",
                      Field.HEARTBEAT_AT: NOW - timedelta(minutes=8)})
    restarting = ExecutorJob("exec-1", ExecutorState.QUEUED, None, "JOB_STATE_PENDING")
    running = ExecutorJob("exec-1", ExecutorState.RUNNING, None, "JOB_STATE_RUNNING")
    preempted = observe(training, restarting, NOW)
    # Running again 6 minutes later: 14 minutes without a heartbeat, but just restarted.
    back = observe(preempted, running, NOW + timedelta(minutes=6))
    assert reconcile.decide(back, running, SETTINGS, NOW + timedelta(minutes=8)).action == (
        Action.NONE
    )
    # The restarted trainer does have to report within the timeout.
    stale = reconcile.decide(back, running, SETTINGS, NOW + timedelta(minutes=17))
    assert stale.outcome == AttemptOutcome.STALE


def test_unchanged_state_is_not_stamped_again() -> None:
    doc = job(**{Field.EXECUTOR_JOB_NAME: None, Field.EXECUTOR_STATE_AT: NOW})
    later = NOW + timedelta(seconds=1)
    decision = reconcile.decide(doc, ex(ExecutorState.RUNNING), SETTINGS, later)
    assert decision.action == Action.OBSERVE  # only the name was missing
    _, update = reconcile.apply_update(doc, decision, ex(ExecutorState.RUNNING), SETTINGS, later)
    assert Field.EXECUTOR_STATE_AT not in update


@pytest.mark.parametrize(
    ("state", "error", "outcome", "words"),
    [
        (ExecutorState.FAILED, "CUDA out of memory", AttemptOutcome.EXECUTOR_FAILED,
         "CUDA out of memory"),
        (ExecutorState.CANCELLED, None, AttemptOutcome.EXECUTOR_FAILED, "cancelled"),
        (ExecutorState.EXPIRED, "no capacity", AttemptOutcome.EXECUTOR_FAILED, "no capacity"),
        (ExecutorState.SUCCEEDED, None, AttemptOutcome.NO_COMPLETION,
         "without the trainer reporting completion"),
    ],
)
def test_executor_endings_are_failed_attempts(
    state: ExecutorState, error: str | None, outcome: str, words: str
) -> None:
    decision = reconcile.decide(job(), ex(state, error), SETTINGS, NOW)
    assert decision.action == Action.RETRY
    assert decision.outcome == outcome
    assert words in (decision.error or "")


def test_lost_executor_job_is_a_failed_attempt() -> None:
    decision = reconcile.decide(job(), None, SETTINGS, NOW)
    assert (decision.action, decision.outcome) == (Action.RETRY, AttemptOutcome.LOST)


def test_stale_heartbeat_while_running_cancels_and_retries() -> None:
    stale = job(**{Field.HEARTBEAT_AT: NOW - timedelta(minutes=11)})
    decision = reconcile.decide(stale, ex(ExecutorState.RUNNING), SETTINGS, NOW)
    assert (decision.action, decision.outcome) == (Action.RETRY, AttemptOutcome.STALE)
    assert decision.cancel_executor
    assert "no heartbeat for 11 minutes" in (decision.error or "")


def test_trainer_that_never_started_goes_stale_from_dispatch_time() -> None:
    silent = job(JobStatus.DISPATCHED, **{Field.HEARTBEAT_AT: None})
    assert reconcile.decide(silent, ex(ExecutorState.RUNNING), SETTINGS, NOW).outcome == (
        AttemptOutcome.STALE
    )


def test_last_attempt_fails_the_job_with_a_short_message_and_keeps_the_raw_error() -> None:
    last = job(attempt=3, **{Field.NEXT_ATTEMPT_AT: NOW - timedelta(hours=1)})
    raw = "trainer exited with code 1: Traceback (most recent call last): ... gs://b/jobs/x"
    decision = reconcile.decide(last, ex(ExecutorState.FAILED, raw), SETTINGS, NOW)
    assert decision.action == Action.FAIL
    status, update = reconcile.apply_update(last, decision, ex(ExecutorState.FAILED), SETTINGS,
                                            NOW)
    assert status == JobStatus.FAILED
    # The user sees a short sentence; the executor's text is for admins, in the history.
    assert update[Field.ERROR] == (
        "Training failed after 3 attempts: the training machine stopped unexpectedly. "
        "Start the training again or contact support."
    )
    entry = update[Field.ATTEMPT_HISTORY][-1]
    assert entry[AttemptField.OUTCOME] == AttemptOutcome.EXECUTOR_FAILED
    assert entry[AttemptField.ERROR] == raw
    assert update[Field.NEXT_ATTEMPT_AT] is None  # a failed job is never due


def test_the_trainers_own_message_is_what_a_failed_job_shows() -> None:
    said = "The base model could not be downloaded: it is gated; ask an admin for access."
    last = job(attempt=3, **{Field.ERROR: said})
    decision = reconcile.decide(last, ex(ExecutorState.FAILED, "exit code 1"), SETTINGS, NOW)
    _, update = reconcile.apply_update(last, decision, ex(ExecutorState.FAILED), SETTINGS, NOW)
    assert update[Field.ERROR] == f"Training failed after 3 attempts: {said}"
    assert update[Field.ATTEMPT_HISTORY][-1][AttemptField.ERROR] == said


@pytest.mark.parametrize(
    ("state", "outcome", "words"),
    [
        (None, AttemptOutcome.LOST, "disappeared from the training service"),
        (ExecutorState.SUCCEEDED, AttemptOutcome.NO_COMPLETION, "without producing a model"),
        (ExecutorState.EXPIRED, AttemptOutcome.EXECUTOR_FAILED, "no training machine became"),
        (ExecutorState.RUNNING, AttemptOutcome.STALE, "stopped responding"),
    ],
)
def test_failed_jobs_never_show_raw_executor_text(
    state: ExecutorState | None, outcome: str, words: str
) -> None:
    last = job(attempt=1, **{Field.MAX_ATTEMPTS: 1,
                              Field.HEARTBEAT_AT: NOW - timedelta(hours=1)})
    executor_job = ex(state, "projects/p/locations/l/customJobs/123: gs://bucket/x") if state else (
        None
    )
    decision = reconcile.decide(last, executor_job, SETTINGS, NOW)
    assert (decision.action, decision.outcome) == (Action.FAIL, outcome)
    _, update = reconcile.apply_update(last, decision, executor_job, SETTINGS, NOW)
    assert update[Field.ERROR].startswith("Training failed in its only attempt: ")
    assert words in update[Field.ERROR]
    assert "gs://" not in update[Field.ERROR] and "projects/" not in update[Field.ERROR]


def test_retry_requeues_with_exponential_backoff_and_history() -> None:
    second = job(attempt=2, **{Field.ATTEMPT_HISTORY: [{AttemptField.ATTEMPT: 1}]})
    decision = reconcile.decide(second, ex(ExecutorState.FAILED, "boom"), SETTINGS, NOW)
    status, update = reconcile.apply_update(second, decision, ex(ExecutorState.FAILED),
                                            SETTINGS, NOW)
    assert status == JobStatus.QUEUED
    assert update[Field.NEXT_ATTEMPT_AT] == NOW + timedelta(seconds=120)  # 60 * 2**(2-1)
    assert update[Field.EXECUTOR_JOB_NAME] is None
    assert [e[AttemptField.ATTEMPT] for e in update[Field.ATTEMPT_HISTORY]] == [1, 2]
    assert update[Field.ATTEMPT_HISTORY][-1][AttemptField.EXECUTOR_JOB_NAME] == "exec-1"


@pytest.mark.parametrize(
    "status", [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.QUEUED, JobStatus.DISPATCHING]
)
def test_jobs_outside_the_reconciled_states_are_never_touched(status: str) -> None:
    assert reconcile.decide(job(status), ex(ExecutorState.FAILED), SETTINGS, NOW).action == (
        Action.NONE
    )


def test_completed_wins_even_against_a_failed_executor() -> None:
    done = job(JobStatus.COMPLETED, **{Field.HEARTBEAT_AT: NOW - timedelta(days=1)})
    for state in ExecutorState:
        assert reconcile.decide(done, ex(state), SETTINGS, NOW).action == Action.NONE


def test_cancel_request_wins_over_a_healthy_job() -> None:
    wanted = job(**{Field.CANCEL_REQUESTED: True})
    decision = reconcile.decide(wanted, ex(ExecutorState.RUNNING), SETTINGS, NOW)
    assert decision.action == Action.CANCEL and decision.cancel_executor
    status, update = reconcile.apply_update(wanted, decision, ex(ExecutorState.RUNNING),
                                            SETTINGS, NOW)
    assert status == JobStatus.CANCELLED and update[Field.FINISHED_AT] == NOW
