"""Job intake against the Firestore emulator."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from actorgen import intake, reconcile, schema
from actorgen.config import Settings
from actorgen.intake import IntakeOutcome
from actorgen.schema import Field, JobStatus, ModelStatus

from tests.functions.jobdocs import new_id, put_actor

SETTINGS = Settings()


@pytest.fixture
def owner() -> str:
    return new_id("user")


def make_job(db: Any, owner: str, actor_id: str, **fields: Any) -> str:
    """Create the job document the way the app does."""
    job_id = new_id("job")
    data = {
        Field.USER_ID: owner,
        Field.ACTOR_ID: actor_id,
        Field.INSTANCE_NAME: "sks_person",
        Field.BASE_MODEL_ID: "stable-diffusion-v1-5/stable-diffusion-v1-5",
        Field.TRAINING_STEPS: 600,
        Field.TRAINING_BATCH_SIZE: 1,
        Field.LEARNING_RATE: 1e-4,
        Field.STATUS: JobStatus.PENDING,
    }
    data.update(fields)
    db.collection(schema.TRAINING_JOBS).document(job_id).set(
        {k: v for k, v in data.items() if v is not ...}
    )
    return job_id


def get(db: Any, collection: str, doc_id: str) -> dict[str, Any]:
    return db.collection(collection).document(doc_id).get().to_dict()


def take_in(db: Any, job_id: str) -> str:
    return intake.process_job(job_id, SETTINGS, db=db, nudge=False)


def test_good_job_is_queued_with_defaults(db: Any, owner: str) -> None:
    actor_id = put_actor(db, owner)
    job_id = make_job(db, owner, actor_id)
    assert take_in(db, job_id) == IntakeOutcome.QUEUED
    job = get(db, schema.TRAINING_JOBS, job_id)
    assert job[Field.STATUS] == JobStatus.QUEUED
    assert job[Field.ERROR] is None
    assert job[Field.TRAINING_STEPS] == 600  # kept
    assert job[Field.LORA_RANK] == 16 and job[Field.CLASS_WORD] == "person"  # filled
    assert job[Field.ATTEMPT] == 0 and job[Field.MAX_ATTEMPTS] == SETTINGS.max_attempts
    assert job[Field.QUEUED_AT] and job[Field.NEXT_ATTEMPT_AT]
    actor = get(db, schema.ACTORS, actor_id)
    assert actor[Field.MODEL_STATUS] == ModelStatus.QUEUED
    assert actor[Field.LATEST_JOB_ID] == job_id


def test_job_without_status_is_taken_in_too(db: Any, owner: str) -> None:
    job_id = make_job(db, owner, put_actor(db, owner), **{Field.STATUS: ...})
    assert take_in(db, job_id) == IntakeOutcome.QUEUED


def test_bad_job_is_rejected_with_what_to_fix(db: Any, owner: str) -> None:
    actor_id = put_actor(db, owner, accepted=3)
    job_id = make_job(db, owner, actor_id, **{Field.INSTANCE_NAME: "../x",
                                              Field.LEARNING_RATE: 0.1})
    assert take_in(db, job_id) == IntakeOutcome.REJECTED
    job = get(db, schema.TRAINING_JOBS, job_id)
    assert job[Field.STATUS] == JobStatus.REJECTED
    assert "looks like a file path" in job[Field.ERROR]
    assert "learningRate must be between" in job[Field.ERROR]
    assert "upload 2 more" in job[Field.ERROR]
    actor = get(db, schema.ACTORS, actor_id)
    assert actor[Field.MODEL_STATUS] == ModelStatus.FAILED
    assert actor[Field.MODEL_ERROR] == job[Field.ERROR]


def test_job_for_someone_elses_actor_leaves_it_untouched(db: Any, owner: str) -> None:
    victim_actor = put_actor(db, "victim")
    ref = db.collection(schema.ACTORS).document(victim_actor)
    before = ref.get().update_time
    job_id = make_job(db, owner, victim_actor)
    assert take_in(db, job_id) == IntakeOutcome.REJECTED
    assert "does not belong to you" in get(db, schema.TRAINING_JOBS, job_id)[Field.ERROR]
    assert ref.get().update_time == before


def test_job_for_a_missing_actor_creates_none(db: Any, owner: str) -> None:
    job_id = make_job(db, owner, "ghost-actor")
    assert take_in(db, job_id) == IntakeOutcome.REJECTED
    assert "does not exist" in get(db, schema.TRAINING_JOBS, job_id)[Field.ERROR]
    assert not db.collection(schema.ACTORS).document("ghost-actor").get().exists


def test_path_like_actor_id_is_just_missing(db: Any, owner: str) -> None:
    job_id = make_job(db, owner, "../actors/x")
    assert take_in(db, job_id) == IntakeOutcome.REJECTED


def test_duplicate_job_is_rejected_and_the_first_keeps_the_actor(db: Any, owner: str) -> None:
    actor_id = put_actor(db, owner)
    first, second = make_job(db, owner, actor_id), make_job(db, owner, actor_id)
    assert take_in(db, first) == IntakeOutcome.QUEUED
    assert take_in(db, second) == IntakeOutcome.REJECTED
    assert f"already has a training job in progress ({first})" in get(
        db, schema.TRAINING_JOBS, second
    )[Field.ERROR]
    actor = get(db, schema.ACTORS, actor_id)
    assert actor[Field.LATEST_JOB_ID] == first
    assert actor[Field.MODEL_STATUS] == ModelStatus.QUEUED


def test_two_jobs_created_at_once_queue_exactly_one(db: Any, owner: str) -> None:
    actor_id = put_actor(db, owner)
    job_ids = [make_job(db, owner, actor_id) for _ in range(2)]
    outcomes: list[str] = []
    threads = [threading.Thread(target=lambda j=j: outcomes.append(take_in(db, j)))
               for j in job_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == [IntakeOutcome.QUEUED, IntakeOutcome.REJECTED]


def test_redelivered_trigger_changes_nothing(db: Any, owner: str) -> None:
    job_id = make_job(db, owner, put_actor(db, owner))
    take_in(db, job_id)
    ref = db.collection(schema.TRAINING_JOBS).document(job_id)
    before = ref.get().update_time
    assert take_in(db, job_id) == IntakeOutcome.ALREADY_TAKEN
    assert ref.get().update_time == before
    assert take_in(db, "no-such-job") == IntakeOutcome.MISSING


def test_sweeper_takes_in_jobs_whose_trigger_was_lost(db: Any, owner: str) -> None:
    job_id = make_job(db, owner, put_actor(db, owner))
    now = datetime.now(UTC)
    assert job_id not in reconcile.sweep_pending_jobs(SETTINGS, db=db, now=now)
    later = now + timedelta(seconds=SETTINGS.sweep_after_seconds + 5)
    assert job_id in reconcile.sweep_pending_jobs(SETTINGS, db=db, now=later)
    assert get(db, schema.TRAINING_JOBS, job_id)[Field.STATUS] == JobStatus.QUEUED


def test_a_job_whose_accepted_photos_are_two_people_is_rejected(db: Any, owner: str) -> None:
    from tests import photos
    from tests.functions.jobdocs import real_records

    images = real_records(owner, "actor-x", **{f"me{i}": photos.jpeg(photos.portrait(i)) for i in range(4)},
                          stranger=photos.jpeg(photos.other_person(0)))
    actor_id = put_actor(db, owner, **{Field.IMAGES: images, Field.ACCEPTED_IMAGE_COUNT: 5})
    job_id = make_job(db, owner, actor_id)
    assert take_in(db, job_id) == IntakeOutcome.REJECTED
    job = get(db, schema.TRAINING_JOBS, job_id)
    assert job[Field.ERROR] == (
        "the photos 'stranger.jpg' show a different person from the other 4; remove them (or "
        "replace them with photos of the person)"
    )
    assert get(db, schema.ACTORS, actor_id)[Field.MODEL_ERROR] == job[Field.ERROR]
