"""review_job(): every reason a job is refused, and the defaults a good job gets."""

from __future__ import annotations

from typing import Any

import pytest
from actorgen import intake, schema
from actorgen.config import Settings
from actorgen.schema import Field, ImageField, ImageStatus

from tests.functions.jobdocs import real_records

SETTINGS = Settings()
UID = "user-1"


def actor(accepted: int = 6, rejected: int = 0, owner: str = UID) -> dict[str, Any]:
    images = {f"a{i}": {ImageField.STATUS: ImageStatus.ACCEPTED} for i in range(accepted)}
    images.update({f"r{i}": {ImageField.STATUS: ImageStatus.REJECTED} for i in range(rejected)})
    return {Field.USER_ID: owner, Field.IMAGES: images}


def job(**overrides: Any) -> dict[str, Any]:
    base = {
        Field.USER_ID: UID,
        Field.ACTOR_ID: "actor-1",
        Field.INSTANCE_NAME: "sks_anna",
        Field.BASE_MODEL_ID: "stable-diffusion-v1-5/stable-diffusion-v1-5",
        Field.STATUS: schema.JobStatus.PENDING,
    }
    base.update(overrides)
    return base


def test_good_job_is_accepted_with_person_lora_defaults() -> None:
    review = intake.review_job(job(), actor(), SETTINGS)
    assert review.accepted and review.error is None
    values = review.values
    assert values[Field.LEARNING_RATE] == 1e-4  # not the seed's full fine-tune 1e-6
    assert values[Field.TRAINING_STEPS] == 800
    assert values[Field.CLASS_WORD] == schema.DEFAULT_CLASS_WORD
    assert values[Field.INSTANCE_NAME] == "sks_anna"
    assert values[Field.PRIORITY] == 0


def test_given_hyperparameters_are_kept() -> None:
    review = intake.review_job(
        job(**{Field.TRAINING_STEPS: 1200, Field.LEARNING_RATE: 5e-5}), actor(), SETTINGS
    )
    assert review.values[Field.TRAINING_STEPS] == 1200
    assert review.values[Field.LEARNING_RATE] == 5e-5


@pytest.mark.parametrize(
    ("the_job", "the_actor", "words", "may_update_actor"),
    [
        (job(**{Field.ACTOR_ID: "nope"}), None, "actor 'nope' does not exist", False),
        (job(), actor(owner="someone-else"), "does not belong to you", False),
        (job(**{Field.USER_ID: None}), actor(), "userId is missing", False),
        (job(**{Field.ACTOR_ID: ""}), None, "actorId is missing", False),
        (job(**{Field.BASE_MODEL_ID: "evil/model"}), actor(),
         "baseModelId 'evil/model' is not available; use one of: "
         "stable-diffusion-v1-5/stable-diffusion-v1-5", True),
        (job(**{Field.BASE_MODEL_ID: None}), actor(), "baseModelId is missing", True),
        (job(), actor(accepted=3, rejected=2),
         "the actor has 3 accepted photos; at least 5 are needed: upload 2 more "
         "(2 uploaded photos were rejected", True),
        (job(), actor(accepted=1), "has 1 accepted photo; at least 5 are needed: upload 4 more",
         True),
        (job(), actor(accepted=31), "at most 30 can be used: remove 1", True),
        (job(**{Field.INSTANCE_NAME: "../../etc/passwd"}), actor(), "looks like a file path",
         True),
        (job(**{Field.INSTANCE_NAME: "a/b"}), actor(), "looks like a file path", True),
        (job(**{Field.INSTANCE_NAME: "my name"}), actor(), "'my name' is not allowed", True),
        (job(**{Field.INSTANCE_NAME: None}), actor(), "instanceName is missing", True),
        (job(**{Field.CLASS_WORD: "Person!"}), actor(), "classWord must be", True),
        (job(**{Field.LEARNING_RATE: 0.5}), actor(), "learningRate must be between", True),
        (job(**{Field.TRAINING_STEPS: 10**9}), actor(), "trainingSteps must be between", True),
        (job(**{Field.TRAINING_BATCH_SIZE: "2"}), actor(), "trainingBatchSize must be a number",
         True),
        (job(**{Field.RESOLUTION: 500}), actor(), "resolution must be 0 (native) or a multiple",
         True),
    ],
)
def test_each_problem_is_named(
    the_job: dict[str, Any], the_actor: dict[str, Any] | None, words: str, may_update_actor: bool
) -> None:
    review = intake.review_job(the_job, the_actor, SETTINGS)
    assert not review.accepted
    assert words in (review.error or ""), review.error
    assert review.may_update_actor is may_update_actor


def test_duplicate_job_is_refused_and_leaves_the_actor_to_the_running_one() -> None:
    review = intake.review_job(job(), actor(), SETTINGS, other_active_jobs=["job-0"])
    assert "already has a training job in progress (job-0)" in (review.error or "")
    assert review.may_update_actor is False


def test_foreign_actor_is_not_described() -> None:
    review = intake.review_job(job(), actor(owner="victim"), SETTINGS)
    assert "victim" not in (review.error or "")
    assert "accepted" not in (review.error or "")  # nothing about their photos either


def test_all_problems_are_listed_together() -> None:
    review = intake.review_job(
        job(**{Field.INSTANCE_NAME: "x", Field.LEARNING_RATE: 1.0}), actor(accepted=2), SETTINGS
    )
    assert len(review.problems) == 3
    assert review.error == "; ".join(review.problems)


def test_allow_list_comes_from_settings() -> None:
    settings = Settings(allowed_base_models=("my/model",))
    assert intake.review_job(job(**{Field.BASE_MODEL_ID: "my/model"}), actor(), settings).accepted
    assert not intake.review_job(job(), actor(), settings).accepted


def test_minimum_comes_from_settings() -> None:
    assert intake.review_job(job(), actor(accepted=2), Settings(min_images=2)).accepted


# ------------------------------------------------ the accepted photos must be one person
@pytest.fixture(scope="module")
def person_and_strangers() -> dict[str, dict[str, Any]]:
    from tests import photos

    return real_records(
        UID, "actor-1",
        **{f"me{i}": photos.jpeg(photos.portrait(i)) for i in range(5)},
        stranger=photos.jpeg(photos.other_person(0)),
        other=photos.jpeg(photos.other_person(1)),
    )


def test_accepted_photos_of_other_people_are_named(
    person_and_strangers: dict[str, dict[str, Any]],
) -> None:
    # Records accepted before the one-person rule existed, or edited: intake looks again.
    images = dict(person_and_strangers)
    review = intake.review_job(job(), {Field.USER_ID: UID, Field.IMAGES: images}, SETTINGS)
    assert not review.accepted
    assert review.error == (
        "the photos 'other.jpg', 'stranger.jpg' show a different person from the other 5; remove "
        "them (or replace them with photos of the person)"
    )
    one_person = {k: v for k, v in images.items() if v[ImageField.FILE_NAME].startswith("me")}
    assert intake.review_job(job(), {Field.USER_ID: UID, Field.IMAGES: one_person},
                             SETTINGS).accepted


def test_an_undecided_set_names_who_is_who(
    person_and_strangers: dict[str, dict[str, Any]],
) -> None:
    picked = ("me0.jpg", "me1.jpg", "me2.jpg", "stranger.jpg", "other.jpg")
    images = {k: v for k, v in person_and_strangers.items()
              if v[ImageField.FILE_NAME] in picked}
    # Three of one person against two others is decisive; two against two is not.
    del images[next(k for k, v in images.items() if v[ImageField.FILE_NAME] == "me2.jpg")]
    review = intake.review_job(job(), {Field.USER_ID: UID, Field.IMAGES: images},
                               Settings(min_images=4))
    assert review.error is not None and "'other.jpg', 'stranger.jpg' show a different" in review.error
    tie = {k: v for k, v in images.items()
           if v[ImageField.FILE_NAME] in ("me0.jpg", "stranger.jpg")}
    review = intake.review_job(job(), {Field.USER_ID: UID, Field.IMAGES: tie},
                               Settings(min_images=2))
    assert review.error == (
        "the accepted photos show 2 different people: ('me0.jpg'); ('stranger.jpg'); keep the "
        "photos of one person and remove the others"
    )


def test_a_long_file_name_is_cut_in_the_message(
    person_and_strangers: dict[str, dict[str, Any]],
) -> None:
    from tests import photos

    images = {k: v for k, v in person_and_strangers.items()
              if v[ImageField.FILE_NAME].startswith("me")}
    images.update(real_records(UID, "actor-1", **{"x" * 900: photos.jpeg(photos.other_person(0))}))
    review = intake.review_job(job(), {Field.USER_ID: UID, Field.IMAGES: images}, SETTINGS)
    assert review.error is not None
    assert "'" + "x" * 40 + "'... (904 characters) show a different person" in review.error
