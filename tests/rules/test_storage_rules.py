"""storage.rules against the Storage emulator, through the Firebase Storage REST API.

Rules are evaluated only when the emulator runs the real rules-runtime jar
(firebase-tools downloads it to ~/.cache/firebase/emulators/ where there is
internet: bin/setup does). Offline, tools/emulators.py starts a stand-in that
permits everything, and the rule checks here are SKIPPED. Two tests run anyway:
the REST helpers work, and storage.rules compiles (with the Firestore emulator's
compiler, which shares the rules language).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import requests

from tools.emulators import REPO_ROOT, EmulatorSuite

ALICE, BOB = "alice", "bob"
ALLOWED, DENIED = 200, 403
JPEG = b"\xff\xd8\xff\xe0" + b"\0" * 1024  # content is not checked by rules, only type/size
PHOTO = "users/alice/actors/actor-a/images/1.jpg"
MODEL = "users/alice/actors/actor-a/models/job-1/pytorch_lora_weights.safetensors"
CHECKPOINT = "jobs/job-1/attempt-1/checkpoints/step-100/model.safetensors"


@pytest.fixture
def rules_evaluated(emulators: EmulatorSuite) -> None:
    """Skip unless the Storage emulator evaluates storage.rules (real rules runtime)."""
    if not emulators.storage_rules_evaluated:
        pytest.skip(
            "storage.rules are not evaluated: the Storage rules-runtime jar is missing and "
            "the permit-all stand-in runs (run bin/setup with internet to fetch the jar)"
        )


def expect(response: requests.Response, status: int) -> None:
    assert response.status_code == status, f"{response.status_code}: {response.text[:600]}"


# ------------------------------------------------------------------ always run
def test_owner_upload_and_download_round_trip(storage_as, bucket, db):
    """The REST helpers work (also under the stand-in, which permits everything)."""
    db.collection("actors").document("actor-a").set({"userId": ALICE})  # rules: own actor
    alice = storage_as(ALICE)
    expect(alice.upload(PHOTO, JPEG, "image/jpeg"), ALLOWED)
    response = alice.download(PHOTO)
    expect(response, ALLOWED)
    assert response.content == JPEG
    blob = bucket.get_blob(PHOTO)
    assert blob is not None and blob.content_type == "image/jpeg" and blob.size == len(JPEG)


def test_storage_rules_compile(emulators: EmulatorSuite):
    """storage.rules parses: compiled by the Firestore emulator (same language), then undone."""
    source = (REPO_ROOT / "storage.rules").read_text()
    as_firestore = source.replace("service firebase.storage", "service cloud.firestore").replace(
        "match /b/{bucket}/o", "match /databases/{database}/documents"
    )
    assert as_firestore != source
    try:
        emulators.put_firestore_rules(as_firestore)  # raises with the line on a syntax error
    finally:
        emulators.put_firestore_rules((REPO_ROOT / "firestore.rules").read_text())


def test_storage_rules_match_the_schema_limits():
    """The upload limits in storage.rules are schema.py's (rules cannot import Python)."""
    from actorgen import schema

    source = (REPO_ROOT / "storage.rules").read_text()
    types = re.search(r"contentType in\s*\[([^\]]*)\]", source)
    assert types is not None
    assert tuple(re.findall(r"'([^']+)'", types.group(1))) == schema.UPLOAD_CONTENT_TYPES
    assert "image/svg" not in source and "image/.*" not in source
    assert "request.resource.size <= 20 * 1024 * 1024" in source
    assert schema.MAX_UPLOAD_BYTES_RULE == 20 * 1024 * 1024
    assert f".size() < {schema.MAX_UPLOADS_PER_ACTOR};" in source


# ------------------------------------------------------------------ rules (real runtime only)
@pytest.mark.usefixtures("rules_evaluated")
class TestUploads:
    @pytest.fixture(autouse=True)
    def actors(self, db: Any) -> None:
        """actor-a is Alice's, actor-b Bob's, actor-full Alice's with no room left."""
        from actorgen import schema

        actors = db.collection(schema.ACTORS)
        actors.document("actor-a").set({"userId": ALICE})
        actors.document("actor-b").set({"userId": BOB})
        full = {f"img{i}": {"status": "rejected"} for i in range(schema.MAX_UPLOADS_PER_ACTOR)}
        actors.document("actor-full").set({"userId": ALICE, "images": full})

    @pytest.mark.parametrize(
        "path",
        [
            "users/alice/actors/actor-missing/images/1.jpg",  # no such actor
            "users/alice/actors/actor-b/images/1.jpg",  # Bob's actor under Alice's path
            "users/alice/actors/actor-full/images/1.jpg",  # photo cap reached
        ],
    )
    def test_upload_needs_an_own_actor_with_room(self, storage_as, path):
        expect(storage_as(ALICE).upload(path, JPEG, "image/jpeg"), DENIED)

    @pytest.mark.parametrize("content_type", ["image/svg+xml", "image/gif", "image/tiff"])
    def test_image_types_the_pipeline_does_not_accept_are_denied(self, storage_as,
                                                                  content_type):
        expect(storage_as(ALICE).upload(PHOTO, JPEG, content_type), DENIED)

    @pytest.mark.parametrize("content_type", ["image/jpeg", "image/png", "image/heic",
                                              "image/webp"])
    def test_owner_uploads_image(self, storage_as, content_type):
        expect(storage_as(ALICE).upload(PHOTO, JPEG, content_type), ALLOWED)

    def test_other_user_cannot_upload_to_owner_path(self, storage_as):
        expect(storage_as(BOB).upload(PHOTO, JPEG, "image/jpeg"), DENIED)

    def test_signed_out_cannot_upload(self, storage_as):
        expect(storage_as(None).upload(PHOTO, JPEG, "image/jpeg"), DENIED)

    @pytest.mark.parametrize("content_type", ["application/pdf", "text/html", "video/mp4"])
    def test_non_image_is_denied(self, storage_as, content_type):
        expect(storage_as(ALICE).upload(PHOTO, JPEG, content_type), DENIED)

    def test_over_20_mib_is_denied(self, storage_as):
        expect(storage_as(ALICE).upload(PHOTO, b"\0" * (20 * 1024 * 1024 + 1), "image/jpeg"), DENIED)

    def test_empty_file_is_denied(self, storage_as):
        expect(storage_as(ALICE).upload(PHOTO, b"", "image/jpeg"), DENIED)

    def test_overwrite_is_denied(self, storage_as):
        alice = storage_as(ALICE)
        expect(alice.upload(PHOTO, JPEG, "image/jpeg"), ALLOWED)
        expect(alice.upload(PHOTO, JPEG + b"x", "image/jpeg"), DENIED)

    @pytest.mark.parametrize(
        "path",
        [
            "users/alice/actors/actor-a/photo.jpg",  # not under images/
            "users/alice/actors/actor-a/images/sub/1.jpg",  # nested deeper
            "users/alice/profile.jpg",
            "public/1.jpg",
        ],
    )
    def test_other_paths_are_denied(self, storage_as, path):
        expect(storage_as(ALICE).upload(path, JPEG, "image/jpeg"), DENIED)


@pytest.mark.usefixtures("rules_evaluated")
class TestReadsAndDeletes:
    @pytest.fixture(autouse=True)
    def objects(self, bucket: Any) -> None:
        """Alice's photo, model and a job checkpoint, written as Admin."""
        bucket.blob(PHOTO).upload_from_string(JPEG, content_type="image/jpeg")
        bucket.blob(MODEL).upload_from_string(b"lora", content_type="application/octet-stream")
        bucket.blob(CHECKPOINT).upload_from_string(b"ckpt", content_type="application/octet-stream")

    def test_owner_reads_own_photo(self, storage_as):
        expect(storage_as(ALICE).download(PHOTO), ALLOWED)

    def test_other_user_cannot_read_photo(self, storage_as):
        expect(storage_as(BOB).download(PHOTO), DENIED)

    def test_signed_out_cannot_read_photo(self, storage_as):
        expect(storage_as(None).download(PHOTO), DENIED)

    def test_owner_reads_own_model(self, storage_as):
        expect(storage_as(ALICE).download(MODEL), ALLOWED)

    def test_other_user_cannot_read_model(self, storage_as):
        expect(storage_as(BOB).download(MODEL), DENIED)

    def test_owner_cannot_write_model(self, storage_as):
        path = MODEL.replace("pytorch_lora", "evil_lora")
        expect(storage_as(ALICE).upload(path, b"x", "image/png"), DENIED)

    def test_owner_cannot_delete_model(self, storage_as):
        expect(storage_as(ALICE).delete(MODEL), DENIED)

    def test_checkpoints_are_service_only(self, storage_as):
        expect(storage_as(ALICE).download(CHECKPOINT), DENIED)
        expect(storage_as(ALICE).upload(CHECKPOINT, b"x", "image/png"), DENIED)
        expect(storage_as(ALICE, admin=True).download(CHECKPOINT), DENIED)

    def test_owner_deletes_own_photo(self, storage_as):
        assert storage_as(ALICE).delete(PHOTO).status_code in (200, 204)

    def test_other_user_cannot_delete_photo(self, storage_as):
        expect(storage_as(BOB).delete(PHOTO), DENIED)
