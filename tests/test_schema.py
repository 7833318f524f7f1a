"""The shared schema: state machine, hyper-parameter validation, paths and labels."""

from __future__ import annotations

import re

import pytest

from actorgen import schema
from actorgen.schema import Field, JobStatus, ModelStatus


def test_every_status_has_transitions_and_a_model_status() -> None:
    for status in schema.ALL_JOB_STATUSES:
        assert status in schema._TRANSITIONS
        assert schema.model_status_for_job(status) in vars(ModelStatus).values()


@pytest.mark.parametrize(
    ("current", "new"),
    [
        (None, JobStatus.QUEUED),
        (JobStatus.PENDING, JobStatus.REJECTED),
        (JobStatus.QUEUED, JobStatus.DISPATCHING),
        (JobStatus.DISPATCHING, JobStatus.DISPATCHED),
        (JobStatus.DISPATCHED, JobStatus.PREPARING),
        (JobStatus.PREPARING, JobStatus.TRAINING),
        (JobStatus.TRAINING, JobStatus.PREPARING),  # a restarted worker
        (JobStatus.TRAINING, JobStatus.UPLOADING),
        (JobStatus.UPLOADING, JobStatus.COMPLETED),
        (JobStatus.TRAINING, JobStatus.QUEUED),  # retry after a failed attempt
        (JobStatus.FAILED, JobStatus.QUEUED),  # admin re-dispatch
        (JobStatus.TRAINING, JobStatus.TRAINING),  # progress updates
        (JobStatus.DISPATCHED, JobStatus.COMPLETED),  # the trainer's word wins
        (JobStatus.QUEUED, JobStatus.COMPLETED),  # ... even after a stale-heartbeat retry
        (JobStatus.FAILED, JobStatus.COMPLETED),
    ],
)
def test_allowed_transitions(current: str | None, new: str) -> None:
    assert schema.can_transition(current, new)
    schema.check_transition(current, new)


@pytest.mark.parametrize(
    ("current", "new"),
    [
        (JobStatus.COMPLETED, JobStatus.QUEUED),
        (JobStatus.COMPLETED, JobStatus.FAILED),
        (JobStatus.COMPLETED, JobStatus.COMPLETED),
        (JobStatus.REJECTED, JobStatus.QUEUED),
        (JobStatus.CANCELLED, JobStatus.QUEUED),
        (JobStatus.FAILED, JobStatus.TRAINING),
        (JobStatus.PENDING, JobStatus.TRAINING),
        (JobStatus.PENDING, JobStatus.COMPLETED),
        # No pipeline path needs it; a stale trainer must not fail a re-queued job.
        (JobStatus.QUEUED, JobStatus.FAILED),
        (JobStatus.QUEUED, "bogus"),
        ("bogus", JobStatus.QUEUED),
    ],
)
def test_forbidden_transitions(current: str, new: str) -> None:
    assert not schema.can_transition(current, new)
    with pytest.raises(schema.InvalidTransition, match="cannot go from"):
        schema.check_transition(current, new)


def test_final_statuses_go_nowhere() -> None:
    for final in schema.FINAL_JOB_STATUSES:
        assert not any(schema.can_transition(final, s) for s in schema.ALL_JOB_STATUSES)


def test_rejected_retrain_keeps_a_ready_model_visible() -> None:
    assert schema.model_status_for_job(JobStatus.REJECTED) == ModelStatus.FAILED
    assert (
        schema.model_status_for_job(JobStatus.REJECTED, actor_has_model=True)
        == ModelStatus.READY
    )
    assert schema.model_status_for_job(JobStatus.TRAINING) == ModelStatus.TRAINING


def test_defaults_fill_missing_hyperparameters() -> None:
    values, problems = schema.normalize_hyperparameters({Field.TRAINING_STEPS: 400})
    assert problems == []
    assert values[Field.TRAINING_STEPS] == 400
    assert values[Field.LEARNING_RATE] == pytest.approx(1e-4)
    assert set(values) == set(schema.HYPERPARAMETER_SPECS)


@pytest.mark.parametrize(
    ("job", "fragment"),
    [
        ({Field.LEARNING_RATE: 5e-2}, "learningRate must be between"),
        ({Field.TRAINING_STEPS: 10}, "trainingSteps must be between 50 and 5000, got 10"),
        ({Field.TRAINING_STEPS: 100.5}, "whole number"),
        ({Field.TRAINING_BATCH_SIZE: "4"}, "must be a number"),
        ({Field.TRAINING_BATCH_SIZE: True}, "must be a number"),
        ({Field.LEARNING_RATE: float("nan")}, "finite"),
        ({Field.TRAIN_TEXT_ENCODER: "yes"}, "true or false"),
        ({Field.RESOLUTION: 500}, "multiple of 8"),
    ],
)
def test_bad_hyperparameters_name_the_field(job: dict, fragment: str) -> None:
    _, problems = schema.normalize_hyperparameters(job)
    assert len(problems) == 1
    assert fragment in problems[0]


def test_upload_paths_round_trip() -> None:
    path = schema.upload_path("u1", "a1", "IMG_0001.HEIC")
    parsed = schema.parse_upload_path(path)
    assert parsed == schema.UploadPath("u1", "a1", "IMG_0001.HEIC")
    assert schema.parse_upload_path("users/u1/actors/a1/models/j/x") is None
    assert schema.parse_upload_path("users/u1/actors/a1/images/sub/x.jpg") is None


def test_image_ids_are_stable_and_dot_free() -> None:
    a = schema.image_id("users/u/actors/a/images/me.v2.jpg")
    assert a == schema.image_id("users/u/actors/a/images/me.v2.jpg")
    assert "." not in a and "/" not in a
    assert a != schema.image_id("users/u/actors/a/images/me.v3.jpg")


def test_executor_labels_are_valid_gcp_labels() -> None:
    labels = schema.executor_labels("MixedCaseFirestoreId123", 3)
    for key, value in labels.items():
        assert re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", key)
        assert re.fullmatch(r"[a-z0-9_-]{0,63}", value)
    assert labels[schema.LABEL_ATTEMPT] == "3"
    assert labels != schema.executor_labels("mixedcasefirestoreid123", 3)


def test_status_fields_record_each_change_once_with_its_time() -> None:
    from datetime import UTC, datetime, timedelta

    from actorgen.schema import Field, JobStatus, StatusChangeField, status_fields

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    job: dict = {Field.STATUS: JobStatus.PENDING, Field.CREATED_AT: t0 - timedelta(minutes=1)}
    job.update(status_fields(job, JobStatus.QUEUED, t0))
    assert job[Field.STATUS] == JobStatus.QUEUED
    assert job[Field.STATUS_HISTORY] == [
        {StatusChangeField.STATUS: JobStatus.PENDING, StatusChangeField.AT: t0 - timedelta(minutes=1)},
        {StatusChangeField.STATUS: JobStatus.QUEUED, StatusChangeField.AT: t0},
    ]
    # The same status again (a heartbeat, a redelivered event) adds nothing.
    assert status_fields(job, JobStatus.QUEUED, t0 + timedelta(seconds=5)) == {
        Field.STATUS: JobStatus.QUEUED
    }
    # A job that predates the history starts it at its current change.
    old = {Field.STATUS: JobStatus.TRAINING, Field.CREATED_AT: t0}
    assert status_fields(old, JobStatus.UPLOADING, t0)[Field.STATUS_HISTORY] == [
        {StatusChangeField.STATUS: JobStatus.UPLOADING, StatusChangeField.AT: t0}
    ]


def test_status_history_is_bounded_keeping_the_newest() -> None:
    from actorgen.schema import STATUS_HISTORY_LIMIT, Field, JobStatus, status_fields

    job: dict = {Field.STATUS: JobStatus.QUEUED}
    for i in range(STATUS_HISTORY_LIMIT + 10):
        job.update(status_fields(job, JobStatus.DISPATCHING if i % 2 else JobStatus.QUEUED, i))
    history = job[Field.STATUS_HISTORY]
    assert len(history) == STATUS_HISTORY_LIMIT
    assert history[-1]["at"] == STATUS_HISTORY_LIMIT + 9


@pytest.mark.parametrize(("raw", "expected"), [(None, 0), (7, 7), (7.0, 7), (50, 0), (-1, 0),
                                                ("high", 0), (True, 0)])
def test_job_priority_is_the_valid_value_or_the_default(raw: object, expected: int) -> None:
    job = {} if raw is None else {Field.PRIORITY: raw}
    assert schema.job_priority(job) == expected
    assert Field.PRIORITY not in schema.HYPERPARAMETER_SPECS  # scheduling, not training
