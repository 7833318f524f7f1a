"""Photos: which ones are used, face-centred crops, and corrupt files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from actorgen import faces, schema
from lora_trainer import data
from lora_trainer.errors import DataError

from tests import photos
from tests.trainer.seed import seed_job

IF = schema.ImageField


def _record(path: str, status: str) -> dict[str, object]:
    return {IF.PATH: path, IF.STATUS: status}


def test_only_accepted_images_are_used_in_path_order() -> None:
    actor = {schema.Field.IMAGES: {
        "b": _record("users/u/actors/a/images/2.jpg", schema.ImageStatus.ACCEPTED),
        "a": _record("users/u/actors/a/images/1.jpg", schema.ImageStatus.ACCEPTED),
        "c": _record("users/u/actors/a/images/3.jpg", schema.ImageStatus.REJECTED),
    }}
    refs = data.accepted_images(actor)
    assert [r.image_id for r in refs] == ["a", "b"]
    assert refs[0].file_name == "1.jpg"


def test_no_accepted_photo_is_a_data_error() -> None:
    with pytest.raises(DataError, match="no accepted photos"):
        data.accepted_images({schema.Field.IMAGES: {}})


def test_crop_is_centred_on_the_face_and_resized() -> None:
    photo = photos.portrait(2)  # head placed right of centre
    face = faces.detect_faces(photo)[0]
    ref = data.ImageRef("x", "users/u/actors/a/images/x.jpg")
    left, top, right, bottom = data.crop_box(photo, ref, margin=1.0)
    assert right - left == bottom - top  # square
    assert left <= face.x and right >= face.x + face.w
    assert top <= face.y and bottom >= face.y + face.h
    image = data.prepare_image(photos.jpeg(photo), ref, 64, 1.0)
    assert image.size == (64, 64)
    # The crop around the face again contains a detectable face, centred-ish.
    big = data.prepare_image(photos.jpeg(photo), ref, 256, 1.0)
    found = faces.detect_faces(big)
    assert found and abs(found[0].center[0] - 128) < 40


def test_exif_rotated_photo_is_upright_before_cropping() -> None:
    ref = data.ImageRef("x", "p/rotated.png")
    image = data.prepare_image(photos.with_exif_rotation(photos.portrait(0)), ref, 256, 1.0)
    assert faces.detect_faces(image), "the face must be upright after EXIF orientation"


def test_corrupt_photo_names_the_file() -> None:
    ref = data.ImageRef("x", "users/u/actors/a/images/IMG_0042.jpg")
    broken = photos.truncated(photos.jpeg(photos.portrait(0)), keep=0.3)
    with pytest.raises(DataError, match="IMG_0042.jpg"):
        data.prepare_image(broken, ref, 64, 1.0)
    with pytest.raises(DataError, match="IMG_0042.jpg"):
        data.prepare_image(photos.text_as_jpg(), ref, 64, 1.0)


def test_photo_without_face_uses_stored_box_else_centre() -> None:
    image = photos.no_face()
    stored = data.ImageRef("x", "p/x.jpg", face={"x": 10, "y": 20, "w": 100, "h": 100})
    assert data.crop_box(image, stored, margin=0.5) == (0, 0, 200, 200)
    width, height = image.size
    left, top, right, bottom = data.crop_box(image, data.ImageRef("x", "p/x.jpg"), margin=1.0)
    assert right - left == min(width, height) and left == (width - height) // 2


def test_stored_face_box_is_used_without_detecting_again(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    photo = photos.portrait(2)
    face = faces.detect_faces(photo)[0]

    def no_detection(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the stored face box must be used without detecting again")

    monkeypatch.setattr(faces, "detect_faces", no_detection)
    stored = data.ImageRef("x", "p/x.jpg", face=face.as_dict())
    assert data.crop_box(photo, stored, margin=1.0) == faces.face_crop_box(
        face, photo.size, margin=1.0)


def test_stored_face_box_outside_the_image_is_ignored() -> None:
    photo = photos.portrait(2)
    face = faces.detect_faces(photo)[0]
    width, _ = photo.size
    outside = data.ImageRef("x", "p/x.jpg", face={"x": width, "y": 0, "w": 50, "h": 50})
    assert data.crop_box(photo, outside, margin=1.0) == faces.face_crop_box(
        face, photo.size, margin=1.0)


def test_tensor_range(face_pixels: object) -> None:
    import torch

    assert isinstance(face_pixels, torch.Tensor)
    assert face_pixels.shape == (4, 3, 64, 64)
    assert -1.0 <= float(face_pixels.min()) and float(face_pixels.max()) <= 1.0


def _refs(db: Any, job: Any) -> list[data.ImageRef]:
    return data.accepted_images(job.actor(db))


def test_photos_are_read_at_the_judged_generation(emulators: Any, db: Any, bucket: Any,
                                                  tmp_path: Path) -> None:
    job = seed_job(db, bucket, tmp_path, images=2)
    refs = _refs(db, job)
    assert all(ref.generation for ref in refs)
    files = data.download_images(bucket, refs, tmp_path / "ok")
    for ref, file in zip(refs, files, strict=True):
        assert file.read_bytes() == bucket.blob(ref.path).download_as_bytes()


@pytest.mark.parametrize("change", ["replaced", "deleted"])
def test_a_photo_changed_since_its_check_is_a_data_error(
        emulators: Any, db: Any, bucket: Any, tmp_path: Path, change: str) -> None:
    """Never train on a different photo than the one judged (GCS answers 404 for a
    generation that is gone; the emulator serves the live one, caught by its generation)."""
    job = seed_job(db, bucket, tmp_path, images=2)
    refs = _refs(db, job)
    blob = bucket.blob(refs[1].path)
    if change == "replaced":
        blob.upload_from_string(photos.jpeg(photos.no_face()), content_type="image/jpeg")
    else:
        blob.delete()
    with pytest.raises(DataError, match="replaced or deleted after it was checked") as caught:
        data.download_images(bucket, refs, tmp_path / "dl")
    assert repr(refs[1].file_name) in str(caught.value)
    assert not (tmp_path / "dl" / refs[1].image_id).exists()


def test_records_without_a_generation_read_the_live_photo(emulators: Any, db: Any,
                                                          bucket: Any, tmp_path: Path) -> None:
    job = seed_job(db, bucket, tmp_path, images=1)
    [ref] = _refs(db, job)
    legacy = data.ImageRef(image_id=ref.image_id, path=ref.path)
    [file] = data.download_images(bucket, [legacy], tmp_path / "dl")
    assert file.stat().st_size > 0
    bucket.blob(ref.path).delete()
    with pytest.raises(DataError, match="no longer in storage"):
        data.download_images(bucket, [legacy], tmp_path / "again")
