"""One person per actor and copies of photos, judged on real photos without I/O.

The emulator tests (test_upload_validation.py) run the same rules through the
Firestore transaction; here the pure policy is driven photo by photo.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import pytest
from actorgen import identity, schema, uploads
from actorgen.config import Settings
from actorgen.schema import ImageField, ImageStatus
from actorgen.uploads import ImageFacts, Reason, UploadPolicy
from PIL import Image, ImageEnhance, ImageOps

from tests import photos

POLICY = UploadPolicy.from_settings(Settings())
NOW = datetime(2026, 12, 3, tzinfo=UTC)


@pytest.fixture(scope="module")
def analysed() -> dict[str, ImageFacts]:
    """Facts of the person's photos p0..p5 and of two other people."""
    out = {f"p{i}": uploads.analyse(photos.jpeg(photos.portrait(i)), POLICY)
           for i in range(photos.MAX_VALID_PHOTOS)}
    out["astronaut"] = uploads.analyse(photos.jpeg(photos.other_person(0)), POLICY)
    out["biden"] = uploads.analyse(photos.jpeg(photos.other_person(1)), POLICY)
    return out


def arrive(images: dict[str, dict[str, Any]], key: str, facts: ImageFacts,
           policy: UploadPolicy = POLICY) -> None:
    """What handle_upload's transaction does with one new photo."""
    others = {k: v for k, v in images.items() if k != key}
    verdict = uploads.judge(facts, others, policy)
    images[key] = uploads.image_record(schema.upload_path("u", "a", f"{key}.jpg"), 1, facts,
                                       verdict, NOW)
    images.update(uploads.rejudge_identity(images, policy))


def run(order: Iterable[str], analysed: dict[str, ImageFacts]) -> dict[str, dict[str, Any]]:
    images: dict[str, dict[str, Any]] = {}
    for key in order:
        arrive(images, key, analysed[key])
    return images


def statuses(images: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {k: r[ImageField.REASON_CODE] for k, r in sorted(images.items())}


def test_the_test_portraits_are_one_person_and_no_copies(
    analysed: dict[str, ImageFacts],
) -> None:
    images = run([f"p{i}" for i in range(photos.MAX_VALID_PHOTOS)], analysed)
    assert set(statuses(images).values()) == {Reason.OK}
    assert all(r[ImageField.IDENTITY_DISTANCE] < 0.6 for r in images.values())
    # Every record carries what the trainer and intake need, computed once.
    record = images["p0"]
    assert len(record[ImageField.EMBEDDING]) == 128 and len(record[ImageField.LANDMARKS]) == 5
    assert set(record[ImageField.FACE]) == {"x", "y", "w", "h"}


def test_a_different_person_is_rejected_whatever_the_order(
    analysed: dict[str, ImageFacts],
) -> None:
    keys = ["p0", "p1", "p2", "astronaut", "biden"]
    expected = {"p0": Reason.OK, "p1": Reason.OK, "p2": Reason.OK,
                "astronaut": Reason.DIFFERENT_PERSON, "biden": Reason.DIFFERENT_PERSON}
    for order in itertools.permutations(keys):
        assert statuses(run(order, analysed)) == expected, order
    images = run(keys, analysed)
    record = images["astronaut"]
    assert record[ImageField.STATUS] == ImageStatus.REJECTED
    assert record[ImageField.IDENTITY_DISTANCE] > 0.6
    assert record[ImageField.REASON].startswith(
        "This looks like a different person from your other photos (faces 0.")


def test_earlier_photos_are_judged_again_when_the_group_forms(
    analysed: dict[str, ImageFacts],
) -> None:
    images = run(["astronaut", "p0"], analysed)
    # Two photos, two people: nobody can tell who the actor is yet.
    assert statuses(images) == {"astronaut": Reason.OK, "p0": Reason.OK}
    arrive(images, "p1", analysed["p1"])
    assert statuses(images) == {"astronaut": Reason.DIFFERENT_PERSON, "p0": Reason.OK,
                                "p1": Reason.OK}
    assert uploads.accepted_count(images) == 2
    # p1 is deleted: the astronaut is no longer outvoted (handle_deleted does this).
    del images["p1"]
    images.update(uploads.rejudge_identity(images, POLICY))
    assert statuses(images) == {"astronaut": Reason.OK, "p0": Reason.OK}


def test_a_photo_judged_again_does_not_overfill_the_actor(
    analysed: dict[str, ImageFacts],
) -> None:
    policy = UploadPolicy(max_bytes=POLICY.max_bytes, min_side=512, max_images=2)
    images: dict[str, dict[str, Any]] = {}
    for key in ["astronaut", "p0", "p1", "p2"]:
        arrive(images, key, analysed[key], policy)
    assert statuses(images) == {"astronaut": Reason.DIFFERENT_PERSON, "p0": Reason.OK,
                                "p1": Reason.OK, "p2": Reason.TOO_MANY_IMAGES}
    assert uploads.accepted_count(images) == 2


def _copies(original: Image.Image) -> dict[str, bytes]:
    width, height = original.size
    cut_w, cut_h = width // 20, height // 20
    return {
        "mirrored": photos.jpeg(ImageOps.mirror(original)),
        "cropped 5%": photos.jpeg(original.crop((cut_w, cut_h, width - cut_w, height - cut_h))),
        "re-encoded": photos.encode(original, "WEBP", quality=70),
        "resized": photos.jpeg(original.resize((width * 3 // 4, height * 3 // 4)), quality=70),
        "recoloured": photos.jpeg(ImageEnhance.Color(original).enhance(1.5)),
    }


@pytest.mark.parametrize("index", [0, 3])
def test_copies_of_an_accepted_photo_are_caught(
    analysed: dict[str, ImageFacts], index: int
) -> None:
    key = f"p{index}"
    images = run([key], analysed)
    for name, data in _copies(photos.portrait(index)).items():
        found = uploads.analyse(data, POLICY)
        verdict = uploads.judge(found, images, POLICY)
        assert verdict.code == Reason.NEAR_DUPLICATE, (name, verdict.reason)
        assert f"{key}.jpg" in (verdict.reason or "")
        if name == "mirrored":  # the perceptual hash alone misses a mirror image
            assert uploads.hamming(found.phash, analysed[key].phash) > POLICY.near_duplicate_bits
            assert "mirrored, cropped or re-saved" in (verdict.reason or "")


def test_real_copies_shipped_with_the_photos_are_caught() -> None:
    # face_recognition ships obama2.jpg also as a 32-bit PNG: same photo, new file.
    original = uploads.analyse(photos.real_photo_bytes("obama2"), POLICY)
    images: dict[str, dict[str, Any]] = {}
    arrive(images, "obama2", original)
    assert statuses(images) == {"obama2": Reason.OK}
    copy = uploads.analyse(photos.real_photo_bytes("obama2-rgba"), POLICY)
    assert uploads.judge(copy, images, POLICY).code == Reason.NEAR_DUPLICATE
    # Crops of obama.jpg with the face cut by the frame are told so (they are 491 and
    # 551 pixels wide, so the short-side minimum is lowered for them).
    narrow = UploadPolicy(max_bytes=POLICY.max_bytes, min_side=480, max_images=30)
    for name in ("obama-cut-left", "obama-cut-right"):
        cut = uploads.analyse(photos.real_photo_bytes(name), narrow)
        assert uploads.judge(cut, {}, narrow).code == Reason.FACE_CUT_OFF, name


def test_a_real_group_photo_is_many_faces() -> None:
    out = io.BytesIO()
    photos.friends().save(out, "JPEG", quality=90)
    verdict = uploads.judge(uploads.analyse(out.getvalue(), POLICY), {}, POLICY)
    assert verdict.code == Reason.MANY_FACES and "shows 6 faces" in (verdict.reason or "")


def test_judge_identity_needs_a_majority(analysed: dict[str, ImageFacts]) -> None:
    emb = {k: f.faces[0].embedding for k, f in analysed.items()}
    tie = identity.judge_identity({k: emb[k] for k in ("p0", "astronaut")})
    assert not tie.decisive and tie.outsiders == frozenset()
    assert sorted(map(sorted, tie.groups)) == [["astronaut"], ["p0"]]
    two_two = identity.judge_identity({k: emb[k] for k in ("p0", "p1", "astronaut", "biden")})
    assert two_two.decisive and two_two.outsiders == {"astronaut", "biden"}
    alone = identity.judge_identity({"p0": emb["p0"]})
    assert alone.members == {"p0"} and alone.distance("p0") == 0.0
    assert identity.judge_identity({}).members == frozenset()
