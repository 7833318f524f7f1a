"""What the operator command line computes and prints, from plain documents (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from actorgen.cli import views
from actorgen.schema import AttemptField, AttemptOutcome, Field, JobStatus, StatusChangeField

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def change(status: str, minutes: float) -> dict:
    return {StatusChangeField.STATUS: status, StatusChangeField.AT: at(minutes)}


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("2h", 7200), ("7d", 604800), ("1w", 604800),
                          (" 1.5h ", 5400)],
)
def test_ages(text: str, seconds: int) -> None:
    assert views.parse_age(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "2", "h", "2 hours", "-1d"])
def test_bad_ages_say_the_format(text: str) -> None:
    with pytest.raises(ValueError, match="e.g. 90s, 15m, 2h, 7d"):
        views.parse_age(text)


def test_timeline_is_the_status_history_or_else_the_timestamps() -> None:
    job = {
        Field.STATUS: JobStatus.TRAINING,
        Field.STATUS_HISTORY: [change(JobStatus.PENDING, 0), change(JobStatus.QUEUED, 0.1),
                               change(JobStatus.TRAINING, 5)],
    }
    assert views.timeline(job) == [
        {"status": JobStatus.PENDING, "at": at(0)},
        {"status": JobStatus.QUEUED, "at": at(0.1)},
        {"status": JobStatus.TRAINING, "at": at(5)},
    ]
    old = {Field.STATUS: JobStatus.FAILED, Field.CREATED_AT: at(0), Field.QUEUED_AT: at(1),
           Field.DISPATCHED_AT: at(2), Field.FINISHED_AT: at(9)}
    assert [(e["status"], e["at"], e["derived"]) for e in views.timeline(old)] == [
        (JobStatus.PENDING, at(0), True), (JobStatus.QUEUED, at(1), True),
        (JobStatus.DISPATCHED, at(2), True), (JobStatus.FAILED, at(9), True),
    ]


def test_attempts_list_the_history_and_the_running_one() -> None:
    job = {
        Field.ATTEMPT: 2, Field.EXECUTOR_JOB_NAME: "projects/p/customJobs/2",
        Field.EXECUTOR_STATE: "JOB_STATE_RUNNING",
        Field.ATTEMPT_HISTORY: [{
            AttemptField.ATTEMPT: 1, AttemptField.EXECUTOR_JOB_NAME: "projects/p/customJobs/1",
            AttemptField.OUTCOME: AttemptOutcome.STALE, AttemptField.ERROR: "no heartbeat",
            AttemptField.ENDED_AT: at(30),
        }],
    }
    first, running = views.attempts(job)
    assert (first["attempt"], first["outcome"], first["error"]) == (1, "stale", "no heartbeat")
    assert running == {"attempt": 2, "executorJobName": "projects/p/customJobs/2",
                       "outcome": None, "executorState": "JOB_STATE_RUNNING", "error": None,
                       "endedAt": None}
    text = "\n".join(views.job_lines(views.job_detail("j1", job)))
    assert "#1  stale" in text and "executor job: projects/p/customJobs/1" in text
    assert "#2  running (JOB_STATE_RUNNING)" in text


def test_progress_bar() -> None:
    line = views.progress_line({Field.STATUS: JobStatus.TRAINING, Field.PROGRESS: 50,
                                Field.STEP: 400, Field.TOTAL_STEPS: 800, Field.LOSS: 0.12345,
                                Field.ETA_SECONDS: 192}, width=10)
    assert line == "[#####.....]  50%  training  step 400/800  loss 0.1235  eta 3m12s"
    done = views.progress_line({Field.STATUS: JobStatus.COMPLETED, Field.PROGRESS: 100,
                                Field.ETA_SECONDS: 0}, width=4)
    assert done == "[####] 100%  completed"


def test_stats_count_statuses_queue_attempts_and_cost() -> None:
    now = at(120)
    period = [
        {Field.STATUS: JobStatus.COMPLETED, Field.ATTEMPT: 1, Field.GPU_SECONDS: 600.0,
         Field.ESTIMATED_COST_USD: 0.5,
         Field.STATUS_HISTORY: [change(JobStatus.QUEUED, 0), change(JobStatus.DISPATCHING, 2)]},
        {Field.STATUS: JobStatus.COMPLETED, Field.ATTEMPT: 3, Field.GPU_SECONDS: 1800,
         Field.ESTIMATED_COST_USD: 1.5,
         Field.STATUS_HISTORY: [change(JobStatus.QUEUED, 0), change(JobStatus.DISPATCHING, 10)]},
        {Field.STATUS: JobStatus.FAILED, Field.ATTEMPT: 3, Field.GPU_SECONDS: 60},
        {Field.STATUS: JobStatus.REJECTED, Field.ATTEMPT: 0},
    ]
    queued = [{Field.QUEUED_AT: at(60), Field.NEXT_ATTEMPT_AT: at(60)},
              {Field.QUEUED_AT: at(100), Field.NEXT_ATTEMPT_AT: at(130)}]
    s = views.stats(period, queued, now, at(0))
    assert s["jobs"] == 4
    assert s["perStatus"] == {"completed": 2, "failed": 1, "rejected": 1}
    assert s["queue"]["queued"] == 2 and s["queue"]["inBackoff"] == 1
    assert s["queue"]["oldestAgeSeconds"] == 3600
    assert s["queue"]["waitSeconds"] == {"count": 2, "median": 360, "p90": 600, "max": 600}
    assert s["attempts"] == {"jobsDispatched": 3, "mean": pytest.approx(7 / 3), "max": 3,
                             "histogram": {"1": 1, "3": 2}}
    assert s["gpuSeconds"] == 2460 and s["estimatedCostUsd"] == 2.0
    assert s["jobsWithoutCostEstimate"] == 1
    assert s["meanCostPerCompletedJobUsd"] == 1.0
    text = "\n".join(views.stats_lines(s))
    assert "estimated cost $2.00" in text and "1 jobs with GPU time but no estimate" in text


def test_json_values_are_plain() -> None:
    assert views.plain({"a": [at(0)], "b": float("nan"), "c": 1}) == {
        "a": ["2026-12-01T12:00:00+00:00"], "b": None, "c": 1
    }


@pytest.mark.parametrize(
    "filters",
    [{"statuses": ["failed"]}, {"statuses": ["queued", "failed"], "created_after": T0},
     {"user": "u", "statuses": ["failed"]}, {"user": "u", "created_before": T0},
     {"actor": "a"}, {"actor": "a", "user": "u", "created_after": T0, "created_before": T0}],
)
def test_every_jobs_query_with_a_filter_has_its_composite_index(filters: dict) -> None:
    from actorgen.cli import store

    from tests.functions.test_dispatch_plan import declared_indexes, offline_jobs, required_index

    query = store.jobs_query(offline_jobs(), **filters)
    assert required_index(query) in declared_indexes()
