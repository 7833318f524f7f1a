"""Identity score and the choice of the published checkpoint, with real photos.

The actor is the man of face_recognition's test photos (``tests.photos.portrait``:
two real photos of him are the actor's photos, a third real photo and turned,
mirrored and recoloured ones stand for what a good LoRA draws); other people are
scikit-image's astronaut, face_recognition's Biden and the people of the photos
that ship in the ``insightface`` wheel. bin/setup installs the photos; nothing is
committed. Distances and scores come from the real face analysis
(``actorgen.faces``); the choice is pure code fed with those scores, and the
tracker runs inside a real (tiny) training loop.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from actorgen import faces, schema
from lora_trainer import data, identity, models, training
from lora_trainer.config import TrainConfig
from PIL import Image

from tests import photos


@pytest.fixture(scope="module", autouse=True)
def _real_photos_installed() -> None:
    missing = photos.real_photos_missing()
    if missing:
        pytest.fail(missing)


@pytest.fixture(scope="module")
def references() -> list[list[float]]:
    """The actor's photos: two real photos of the man."""
    found = [faces.analyze_faces(photos.portrait(i)) for i in range(2)]
    assert all(found)
    return [f[0].embedding for f in found]


def _own_samples() -> list[Image.Image]:
    """The same man as the actor's photos, not among them (what a good LoRA renders):
    a third real photo, and turned, mirrored and recoloured ones."""
    return [photos.portrait(i) for i in (2, 3, 4, 5)]


def _other_people() -> list[Image.Image]:
    """The astronaut, Biden, Tom Hanks, and the largest of the friends at the table."""
    group = photos.friends()
    face = faces.analyze_faces(group)[0]
    crop = group.crop(faces.face_crop_box(face.box, group.size, margin=1.0))
    return [photos.other_person(0), photos.other_person(1), photos.real_photo("hanks"),
            crop.resize((384, 384), Image.Resampling.LANCZOS)]


def _no_face() -> list[Image.Image]:
    return [photos.no_face(), photos.background("rocket"),
            Image.effect_noise((256, 256), 60).convert("RGB"), photos.background("chelsea")]


@pytest.fixture(scope="module")
def distances(references: list[list[float]]) -> dict[str, list[float | None]]:
    return {
        "own": identity.face_distances(_own_samples(), references),
        "others": identity.face_distances(_other_people(), references),
        "none": identity.face_distances(_no_face(), references),
    }


def _score(step: int, values: list[float | None]) -> identity.CheckpointScore:
    return identity.score_checkpoint(step, values,
                                     same_person_max=faces.SAME_PERSON_MAX_DISTANCE)


# ------------------------------------------------------------------ real distances
def test_the_persons_own_photos_are_nearer_than_other_people(
        distances: dict[str, list[float | None]]) -> None:
    own, others = distances["own"], distances["others"]
    print("identity distances, own:", [round(d, 3) for d in own if d is not None],
          "others:", [round(d, 3) for d in others if d is not None])
    assert None not in own and None not in others
    assert max(own) < faces.SAME_PERSON_MAX_DISTANCE <= min(others)  # type: ignore[type-var]
    assert distances["none"] == [None] * 4


def test_score_ranks_the_person_above_others_above_no_face(
        distances: dict[str, list[float | None]]) -> None:
    own = _score(100, distances["own"])
    others = _score(200, distances["others"])
    none = _score(300, distances["none"])
    half = _score(400, [distances["own"][0], None, distances["own"][1], None])
    print(f"identity scores: own {own.score:.3f}, others {others.score:.3f}, "
          f"half without a face {half.score:.3f}, none {none.score:.3f}")
    assert own.score > half.score > none.score == 0.0
    assert own.score > others.score > none.score
    assert (own.faces, own.matches, own.samples) == (4, 4, 4)
    assert (others.faces, others.matches) == (4, 0)
    assert (none.faces, none.matches, none.mean_distance) == (0, 0, None)
    assert half.faces == 2 and half.mean_distance is not None


# ------------------------------------------------------------ the choice (pure)
def test_choice_follows_the_score_wherever_the_best_step_is(
        distances: dict[str, list[float | None]]) -> None:
    own, others = distances["own"], distances["others"]
    for best_step in (640, 720, 800):
        scores = [_score(step, own if step == best_step else others) for step in (640, 720, 800)]
        choice = identity.choose_checkpoint(scores, 800)
        assert choice.step == best_step and choice.reason == identity.BEST
        assert choice.score is not None and choice.score.step == best_step
        # Turned off: the last step, and the note says where the best one was.
        off = identity.choose_checkpoint(scores, 800, prefer_best=False)
        assert off.step == 800 and off.reason == identity.LAST_NOT_BEST
        assert f"step {best_step}" in off.note


def test_ties_go_to_the_later_step_and_faceless_steps_never_win(
        distances: dict[str, list[float | None]]) -> None:
    own = distances["own"]
    scores = [_score(640, own), _score(720, own), _score(800, distances["none"])]
    choice = identity.choose_checkpoint(scores, 800)
    assert choice.step == 720


def test_no_face_anywhere_keeps_the_last_step_and_says_so(
        distances: dict[str, list[float | None]]) -> None:
    scores = [_score(step, distances["none"]) for step in (8, 9, 10)]
    choice = identity.choose_checkpoint(scores, 10)
    assert choice.step == 10 and choice.reason == identity.LAST_NO_FACES
    assert "no identity sample had a face" in choice.note
    assert identity.choose_checkpoint([], 10).reason == identity.OFF


def test_evaluation_steps_cover_the_last_part_of_training() -> None:
    assert identity.evaluation_steps(800, 3, 0.3) == [640, 720, 800]
    assert identity.evaluation_steps(12, 3, 0.3) == [10, 11, 12]
    assert identity.evaluation_steps(1, 3, 0.3) == [1]
    assert identity.evaluation_steps(800, 0, 0.3) == []


# ------------------------------------------------------------------- references
def test_reference_embeddings_are_read_from_records_or_computed(tmp_path: Path) -> None:
    stored = faces.analyze_faces(photos.portrait(1))[0].as_record()
    refs, files = [], []
    for index in range(2):
        path = tmp_path / f"{index}.jpg"
        path.write_bytes(photos.jpeg(photos.portrait(index)))
        refs.append(data.ImageRef(f"id{index}", f"users/u/actors/a/images/{index}.jpg"))
        files.append(path)
    actor = {schema.Field.IMAGES: {
        "id0": {schema.ImageField.STATUS: schema.ImageStatus.ACCEPTED},  # no embedding
        "id1": {schema.ImageField.STATUS: schema.ImageStatus.ACCEPTED, **stored},
    }}
    embeddings, computed = identity.reference_embeddings(actor, refs, files)
    assert computed == 1 and len(embeddings) == 2
    assert embeddings[1] == faces.embedding_from_record(stored)
    # Two real photos of one man: one person, yet not the same photo.
    assert 0.25 < faces.embedding_distance(embeddings[0], embeddings[1]) < 0.6


# ------------------------------------------------------- the tracker in training
def test_tracker_keeps_the_best_steps_weights_through_a_checkpoint(
        tiny_sd: Path, face_pixels: torch.Tensor,
        distances: dict[str, list[float | None]]) -> None:
    config = TrainConfig(job_id="j", attempt=1, user_id="u", actor_id="a", instance_name="sks",
                         base_model_id=str(tiny_sd), learning_rate=1e-3, lora_rank=4,
                         lora_alpha=4, max_train_steps=6)
    model = models.load_base_model(config, torch.device("cpu"))
    trainer = training.build_trainer(model, config, face_pixels).trainer
    # The judge stands for the rendering: the real distances of other people at
    # steps 2 and 6, of the person at step 4.
    verdicts = iter([distances["others"], distances["own"], distances["others"]])
    tracker = identity.IdentityTracker(steps=[2, 4, 6], judge=lambda: next(verdicts),
                                       same_person_max=faces.SAME_PERSON_MAX_DISTANCE)
    at_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_step(step: int) -> None:
        tracker.maybe_evaluate(step, trainer.trainable_state)
        at_step[step] = trainer.trainable_state()

    trainer.run(6, report_every_seconds=1e9, progress_bar=False, on_step=on_step)
    assert [s.step for s in tracker.scores] == [2, 4, 6]
    choice = tracker.choose(6)
    assert choice.step == 4 and tracker.best_step == 4
    assert tracker.best_weights is not None
    assert all(torch.equal(tracker.best_weights[k], v) for k, v in at_step[4].items())
    assert any(not torch.equal(at_step[4][k], v) for k, v in at_step[6].items())
    metrics = tracker.metrics(choice, samples=4, sample_steps=20)
    assert metrics["publishedStep"] == 4 and metrics["choice"] == identity.BEST
    assert [c["faces"] for c in metrics["checkpoints"]] == [4, 4, 4]

    # The state travels in a checkpoint (torch.save, loaded with weights_only).
    buffer = io.BytesIO()
    torch.save({"step": 6, identity.STATE_KEY: tracker.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = identity.IdentityTracker(steps=[2, 4, 6], judge=lambda: [],
                                       same_person_max=faces.SAME_PERSON_MAX_DISTANCE)
    resumed.load_state_dict(state[identity.STATE_KEY])
    assert not resumed.due(4) and resumed.choose(6).step == 4
    assert resumed.best_weights is not None
    assert all(torch.equal(resumed.best_weights[k], v) for k, v in at_step[4].items())
    # Scores made with other identity settings (other samples) are not compared with new ones.
    other = identity.IdentityTracker(steps=[2, 4, 6], judge=lambda: [],
                                     same_person_max=faces.SAME_PERSON_MAX_DISTANCE,
                                     settings={"sampleSteps": 10})
    other.load_state_dict(state[identity.STATE_KEY])
    assert other.scores == [] and other.best_weights is None and other.due(4)


def test_a_failing_judge_costs_the_score_not_the_training() -> None:
    def broken() -> list[float | None]:
        raise RuntimeError("dlib could not run\nsecond line")

    tracker = identity.IdentityTracker(steps=[5], judge=broken, same_person_max=0.6)
    score = tracker.maybe_evaluate(5, dict)
    assert score is not None and score.error == "RuntimeError: dlib could not run"
    choice = tracker.choose(5)
    assert choice.step == 5 and choice.reason == identity.LAST_NO_FACES
