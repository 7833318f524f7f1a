"""Upload policy without I/O: what analyse() measures and what judge() decides."""

from __future__ import annotations

import pytest
from actorgen import uploads
from actorgen.config import Settings
from actorgen.faces import FaceAnalysis, FaceBox, FaceQuality
from actorgen.schema import ImageField, ImageStatus
from actorgen.uploads import ImageFacts, Reason, UploadPolicy

from tests import photos

POLICY = UploadPolicy.from_settings(Settings())
#: A usable face's measurements (sharp, well lit, frontal, inside the photo).
GOOD_QUALITY = FaceQuality(sharpness=200, brightness=130, clipped=0.0, yaw=0.05, cut_off=0.0)


def face(x: int, y: int, w: int, h: int, quality: FaceQuality = GOOD_QUALITY,
         embedding: list[float] | None = None) -> FaceAnalysis:
    """A face found at (x, y, w, h); the judge's rules here look at its box and quality."""
    return FaceAnalysis(FaceBox(x, y, w, h), [(x + w * 0.3, y + h * 0.4)] * 5,
                        embedding or [0.0] * 128, quality)


def facts(**overrides: object) -> ImageFacts:
    """Facts of a good 768x640 JPEG with one 150-pixel face, changed by ``overrides``."""
    base: dict[str, object] = {
        "size_bytes": 120_000,
        "sha256": "a" * 64,
        "format": "JPEG",
        "width": 768,
        "height": 640,
        "phash": "f0f0f0f0f0f0f0f0",
        "faces": (face(300, 180, 150, 150),),
    }
    base.update(overrides)
    return ImageFacts(**base)  # type: ignore[arg-type]


def accepted_record(name: str, sha: str, phash: str) -> dict[str, object]:
    return {
        ImageField.FILE_NAME: name,
        ImageField.STATUS: ImageStatus.ACCEPTED,
        ImageField.SHA256: sha,
        ImageField.PHASH: phash,
    }


def test_good_photo_is_accepted_with_its_face() -> None:
    verdict = uploads.judge(facts(), {}, POLICY)
    assert verdict.accepted and verdict.code == Reason.OK and verdict.reason is None
    assert verdict.face is not None and verdict.face.box == FaceBox(300, 180, 150, 150)


@pytest.mark.parametrize(
    ("overrides", "code", "words"),
    [
        ({"size_bytes": 0}, Reason.EMPTY, "empty"),
        ({"size_bytes": 25 * 1024 * 1024}, Reason.TOO_LARGE, "25.0 MB; photos up to 20.0 MB"),
        ({"decode_error": "The file is incomplete (truncated)"}, Reason.UNREADABLE, "truncated"),
        ({"width": 320, "height": 240}, Reason.TOO_SMALL, "320x240; at least 512 pixels"),
        ({"faces": ()}, Reason.NO_FACE, "No face was found"),
        (
            {"faces": (face(0, 0, 150, 150), face(400, 0, 140, 140))},
            Reason.MANY_FACES,
            "shows 2 faces; upload photos with only the person",
        ),
        ({"faces": (face(10, 10, 50, 50),)}, Reason.SMALL_FACE, "face is too small"),
        ({"analysis_error": uploads.UNPROCESSABLE}, Reason.UNPROCESSABLE, "could not be processed"),
    ] + [
        ({"faces": (face(300, 180, 150, 150, quality),)}, code, words)
        for quality, code, words in [
            (FaceQuality(3, 130, 0, 0.05, 0), Reason.BLURRY, "blurry; upload a sharp photo"),
            (FaceQuality(200, 20, 0, 0.05, 0), Reason.TOO_DARK, "better light"),
            (FaceQuality(200, 240, 0.6, 0.05, 0), Reason.OVEREXPOSED, "washed out"),
            (FaceQuality(200, 130, 0, 0.8, 0), Reason.PROFILE, "both eyes are visible"),
            (FaceQuality(200, 130, 0, 0.05, 0.3), Reason.FACE_CUT_OFF, "the whole face"),
        ]
    ],
)
def test_each_rejection_says_why(overrides: dict[str, object], code: str, words: str) -> None:
    verdict = uploads.judge(facts(**overrides), {}, POLICY)
    assert verdict.status == ImageStatus.REJECTED
    assert verdict.code == code
    assert words in (verdict.reason or "")


def test_small_background_detection_is_not_a_second_person() -> None:
    crowd = (face(300, 180, 150, 150), face(20, 20, 40, 40))
    assert uploads.judge(facts(faces=crowd), {}, POLICY).accepted


def test_exact_duplicate_names_the_earlier_photo() -> None:
    others = {"id1": accepted_record("IMG_0012.jpg", "a" * 64, "0000000000000000")}
    verdict = uploads.judge(facts(), others, POLICY)
    assert verdict.code == Reason.DUPLICATE
    assert "IMG_0012.jpg" in (verdict.reason or "")


def test_near_duplicate_within_threshold_but_not_beyond() -> None:
    near = "f0f0f0f0f0f0f0f3"  # 2 bits away
    far = "0f0f0f0f0f0f0f0f"  # 64 bits away
    verdict = uploads.judge(facts(), {"id1": accepted_record("IMG_0012.jpg", "b", near)}, POLICY)
    assert verdict.code == Reason.NEAR_DUPLICATE
    assert "looks like the same photo as IMG_0012.jpg" in (verdict.reason or "")
    assert uploads.judge(facts(), {"id1": accepted_record("x.jpg", "b", far)}, POLICY).accepted


def test_duplicates_of_rejected_photos_do_not_count() -> None:
    rejected = {**accepted_record("bad.jpg", "a" * 64, "f0f0f0f0f0f0f0f0"),
                ImageField.STATUS: ImageStatus.REJECTED}
    assert uploads.judge(facts(), {"id1": rejected}, POLICY).accepted


def test_actor_full_rejects_further_photos() -> None:
    policy = UploadPolicy(max_bytes=POLICY.max_bytes, min_side=512, max_images=2)
    others = {
        f"id{i}": accepted_record(f"{i}.jpg", f"{i}", f"{i:016x}") for i in range(2)
    }
    verdict = uploads.judge(facts(phash="ffffffffffffffff"), others, policy)
    assert verdict.code == Reason.TOO_MANY_IMAGES
    assert "2 accepted photos, the most allowed (2)" in (verdict.reason or "")


def test_hamming_and_accepted_count() -> None:
    assert uploads.hamming("ff", "0f") == 4
    images = {"a": {ImageField.STATUS: ImageStatus.ACCEPTED},
              "b": {ImageField.STATUS: ImageStatus.REJECTED}}
    assert uploads.accepted_count(images) == 1


# ------------------------------------------------------------ analyse() on real bytes
def judge_bytes(data: bytes) -> uploads.Verdict:
    return uploads.judge(uploads.analyse(data, POLICY), {}, POLICY)


@pytest.mark.parametrize("index", range(photos.MAX_VALID_PHOTOS))
def test_every_test_portrait_is_accepted(index: int) -> None:
    verdict = judge_bytes(photos.jpeg(photos.portrait(index)))
    assert verdict.accepted, verdict.reason


def test_test_portraits_are_not_near_duplicates_of_each_other() -> None:
    hashes = [
        uploads.analyse(photos.jpeg(photos.portrait(i)), POLICY).phash
        for i in range(photos.MAX_VALID_PHOTOS)
    ]
    distances = [
        uploads.hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]
    ]
    assert min(distances) > uploads.NEAR_DUPLICATE_BITS


def test_resaved_smaller_copy_is_a_near_duplicate() -> None:
    original = uploads.analyse(photos.jpeg(photos.portrait(0)), POLICY)
    copy = uploads.analyse(
        photos.jpeg(photos.portrait(0).resize((700, 583)), quality=60), POLICY
    )
    assert original.sha256 != copy.sha256
    assert uploads.hamming(original.phash, copy.phash) <= uploads.NEAR_DUPLICATE_BITS


def test_heic_from_a_phone_is_decoded_and_accepted() -> None:
    data = photos.heic(photos.portrait(1))
    found = uploads.analyse(data, POLICY)
    assert found.format == "HEIF"
    assert uploads.judge(found, {}, POLICY).accepted


def test_exif_orientation_is_applied_before_judging() -> None:
    found = uploads.analyse(photos.with_exif_rotation(photos.portrait(2)), POLICY)
    assert (found.width, found.height) == photos.PHOTO_SIZE  # stored 960x768, shown 768x960
    assert uploads.judge(found, {}, POLICY).accepted


@pytest.mark.parametrize(
    ("make", "code", "words"),
    [
        (lambda: b"", Reason.EMPTY, "empty"),
        (lambda: photos.truncated(photos.jpeg(photos.portrait(3))), Reason.UNREADABLE,
         "truncated"),
        (photos.text_as_jpg, Reason.UNREADABLE, "not an image"),
        (lambda: photos.decompression_bomb(10_000, 8_000), Reason.UNREADABLE,
         "10000x8000, 80,000,000 pixels; at most 50,000,000"),
        (photos.decompression_bomb, Reason.UNREADABLE, "cannot be decoded safely"),
        (lambda: photos.jpeg(photos.too_small()), Reason.TOO_SMALL, "320x400"),
        (lambda: photos.jpeg(photos.no_face()), Reason.NO_FACE, "No face"),
        (lambda: photos.jpeg(photos.two_people()), Reason.MANY_FACES, "2 faces"),
        (lambda: photos.jpeg(photos.small_face()), Reason.SMALL_FACE, "too small"),
    ],
    ids=["zero-byte", "truncated", "text", "80MP", "bomb", "320px", "no-face", "two-faces",
         "small-face"],
)
def test_bad_files_get_a_reason(make, code: str, words: str) -> None:  # noqa: ANN001
    verdict = judge_bytes(make())
    assert verdict.code == code
    assert words in (verdict.reason or "")


def test_oversized_file_is_not_decoded() -> None:
    policy = UploadPolicy(max_bytes=1000, min_side=512, max_images=30)
    found = uploads.analyse(photos.jpeg(photos.portrait(0)), policy)
    assert found.width == 0 and found.faces == ()  # judged on bytes alone
    assert uploads.judge(found, {}, policy).code == Reason.TOO_LARGE


def test_a_decoder_crash_ends_in_a_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*_: object, **__: object) -> None:
        raise RuntimeError("libheif: internal error")

    monkeypatch.setattr(uploads.imaging, "open_image", explode)
    verdict = judge_bytes(b"\x00\x00\x00\x18ftypheic" + b"\0" * 100)
    assert verdict.code == Reason.UNREADABLE
    assert verdict.reason == uploads.UNPROCESSABLE


def test_a_face_analysis_crash_ends_in_a_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*_: object, **__: object) -> None:
        raise RuntimeError("dlib: something internal\nwith a second line")

    monkeypatch.setattr(uploads.faces, "analyze_faces", explode)
    verdict = judge_bytes(photos.jpeg(photos.portrait(0)))
    assert verdict.code == Reason.UNPROCESSABLE
    assert verdict.reason == uploads.UNPROCESSABLE


def test_a_hashing_crash_ends_in_a_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*_: object, **__: object) -> None:
        raise MemoryError

    monkeypatch.setattr(uploads, "perceptual_hash", explode)
    verdict = judge_bytes(photos.jpeg(photos.portrait(0)))
    assert verdict.code == Reason.UNPROCESSABLE
