"""A deleted (or overwritten) photo leaves its actor: Storage and Firestore emulators.

The Storage emulator need not deliver delete events to functions, so the tests
call ``uploads.handle_deleted`` with the event the trigger would build, as the
upload tests do for ``handle_upload``. The trigger's declaration is checked in
the deploy manifest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from actorgen import schema, uploads
from actorgen.config import Settings
from actorgen.schema import Field, ImageField, ImageStatus
from actorgen.uploads import Outcome, UploadEvent

from tests import photos
from tests.functions.jobdocs import put_upload as put

SETTINGS = Settings()
FUNCTIONS_DIR = Path(__file__).resolve().parents[2] / "functions"





def delete(bucket: Any, event: UploadEvent) -> UploadEvent:
    """Delete the object; the delete event (it names the deleted generation)."""
    bucket.blob(event.name).delete()
    return UploadEvent(event.bucket, event.name, event.generation, event.size)


def judge(event: UploadEvent, db: Any, bucket: Any) -> str:
    return uploads.handle_upload(event, SETTINGS, db=db, bucket=bucket)


def forget(event: UploadEvent, db: Any, bucket: Any) -> str:
    return uploads.handle_deleted(event, SETTINGS, db=db, bucket=bucket)


def actor(db: Any, actor_id: str) -> dict[str, Any]:
    return db.collection(schema.ACTORS).document(actor_id).get().to_dict()


def test_deleted_photo_leaves_the_actor_and_the_count(db: Any, bucket: Any, owner: str,
                                                      actor_id: str) -> None:
    kept = put(bucket, owner, actor_id, "a.jpg", photos.jpeg(photos.portrait(0)))
    gone = put(bucket, owner, actor_id, "b.jpg", photos.jpeg(photos.portrait(1)))
    bad = put(bucket, owner, actor_id, "c.jpg", photos.jpeg(photos.no_face()))
    assert [judge(e, db, bucket) for e in (kept, gone, bad)] == [
        Outcome.ACCEPTED, Outcome.ACCEPTED, Outcome.REJECTED]
    assert actor(db, actor_id)[Field.ACCEPTED_IMAGE_COUNT] == 2

    assert forget(delete(bucket, gone), db, bucket) == Outcome.REMOVED
    doc = actor(db, actor_id)
    assert set(doc[Field.IMAGES]) == {schema.image_id(kept.name), schema.image_id(bad.name)}
    assert doc[Field.ACCEPTED_IMAGE_COUNT] == 1

    # A rejected photo goes the same way; the count stays right.
    assert forget(delete(bucket, bad), db, bucket) == Outcome.REMOVED
    doc = actor(db, actor_id)
    assert set(doc[Field.IMAGES]) == {schema.image_id(kept.name)}
    assert doc[Field.ACCEPTED_IMAGE_COUNT] == 1


def test_redelivery_of_a_delete_changes_nothing(db: Any, bucket: Any, owner: str,
                                                actor_id: str) -> None:
    event = put(bucket, owner, actor_id, "a.jpg", photos.jpeg(photos.portrait(2)))
    assert judge(event, db, bucket) == Outcome.ACCEPTED
    deleted = delete(bucket, event)
    assert forget(deleted, db, bucket) == Outcome.REMOVED
    ref = db.collection(schema.ACTORS).document(actor_id)
    before = ref.get()
    assert forget(deleted, db, bucket) == Outcome.NO_RECORD
    assert ref.get().update_time == before.update_time
    # Nor does a late redelivery of its upload bring the verdict back.
    assert judge(event, db, bucket) == Outcome.GONE
    assert actor(db, actor_id)[Field.IMAGES] == {}
    assert actor(db, actor_id)[Field.ACCEPTED_IMAGE_COUNT] == 0


def test_overwrite_keeps_the_new_uploads_verdict(db: Any, bucket: Any, owner: str,
                                                 actor_id: str) -> None:
    """Overwriting sends a delete event for the old generation; it arrives in any order."""
    old = put(bucket, owner, actor_id, "me.jpg", photos.jpeg(photos.portrait(3)))
    assert judge(old, db, bucket) == Outcome.ACCEPTED
    new = put(bucket, owner, actor_id, "me.jpg", photos.jpeg(photos.portrait(4)))
    assert new.generation != old.generation
    assert judge(new, db, bucket) == Outcome.ACCEPTED
    # The stale delete event of the older generation leaves the newer record alone.
    ref = db.collection(schema.ACTORS).document(actor_id)
    before = ref.get()
    assert forget(old, db, bucket) == Outcome.KEPT
    assert ref.get().update_time == before.update_time
    record = actor(db, actor_id)[Field.IMAGES][schema.image_id(new.name)]
    assert record[ImageField.GENERATION] == new.generation
    assert record[ImageField.STATUS] == ImageStatus.ACCEPTED
    assert actor(db, actor_id)[Field.ACCEPTED_IMAGE_COUNT] == 1


def test_delete_of_the_old_generation_before_the_new_one_is_judged(
        db: Any, bucket: Any, owner: str, actor_id: str) -> None:
    old = put(bucket, owner, actor_id, "me.jpg", photos.jpeg(photos.portrait(0)))
    assert judge(old, db, bucket) == Outcome.ACCEPTED
    new = put(bucket, owner, actor_id, "me.jpg", photos.jpeg(photos.no_face()))
    assert forget(old, db, bucket) == Outcome.REMOVED  # the verdict was on the old one
    assert actor(db, actor_id)[Field.ACCEPTED_IMAGE_COUNT] == 0
    # A late redelivery of the old upload cannot judge the new bytes under the old number.
    assert judge(old, db, bucket) == Outcome.GONE
    assert judge(new, db, bucket) == Outcome.REJECTED
    record = actor(db, actor_id)[Field.IMAGES][schema.image_id(new.name)]
    assert record[ImageField.GENERATION] == new.generation


def test_records_without_a_generation_go_only_when_the_object_is_gone(
        db: Any, bucket: Any, owner: str, actor_id: str) -> None:
    event = put(bucket, owner, actor_id, "a.jpg", photos.jpeg(photos.portrait(1)))
    assert judge(event, db, bucket) == Outcome.ACCEPTED
    ref = db.collection(schema.ACTORS).document(actor_id)
    ref.update({f"{Field.IMAGES}.{schema.image_id(event.name)}.{ImageField.GENERATION}": None})
    # An event of another generation while the object is live: not provably this one.
    other = UploadEvent(event.bucket, event.name, (event.generation or 0) + 1, event.size)
    assert forget(other, db, bucket) == Outcome.KEPT
    assert forget(delete(bucket, event), db, bucket) == Outcome.REMOVED
    assert actor(db, actor_id)[Field.ACCEPTED_IMAGE_COUNT] == 0


def test_other_users_actors_and_other_objects_are_not_touched(db: Any, bucket: Any, owner: str,
                                                              actor_id: str) -> None:
    event = put(bucket, owner, actor_id, "a.jpg", photos.jpeg(photos.portrait(2)))
    assert judge(event, db, bucket) == Outcome.ACCEPTED
    ref = db.collection(schema.ACTORS).document(actor_id)
    before = ref.get()
    # Someone else's path naming this actor (same file name, so the same kind of key).
    intruder_path = schema.upload_path("intruder", actor_id, "a.jpg")
    intruder = UploadEvent(bucket.name, intruder_path, event.generation, event.size)
    assert forget(intruder, db, bucket) == Outcome.FOREIGN_ACTOR
    missing = UploadEvent(bucket.name, schema.upload_path(owner, "no-such-actor", "a.jpg"), 1, 1)
    assert forget(missing, db, bucket) == Outcome.NO_ACTOR
    assert not db.collection(schema.ACTORS).document("no-such-actor").get().exists
    model = UploadEvent(bucket.name, "users/u/actors/a/models/j/lora.safetensors", 1, 10)
    assert forget(model, db, bucket) == Outcome.NOT_AN_UPLOAD
    assert ref.get().update_time == before.update_time


_DISCOVER = """
import json
from firebase_functions.private import manifest, serving
fns = serving.get_functions()
stack = manifest.ManifestStack(
    endpoints={n: f.__firebase_endpoint__ for n, f in fns.items()},
    params=list(serving._params._params.values()),
)
print(json.dumps(serving.to_spec(manifest.manifest_to_spec_dict(stack)), default=str))
"""


def test_the_delete_trigger_is_declared() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("FIREBASE_CONFIG", "PYTHONPATH")}
    out = subprocess.run([sys.executable, "-c", _DISCOVER], cwd=FUNCTIONS_DIR, env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    endpoints = json.loads(out.strip().splitlines()[-1])["endpoints"]
    trigger = endpoints["forget_deleted_upload"]["eventTrigger"]
    assert trigger["eventType"] == "google.cloud.storage.object.v1.deleted"
    assert trigger["eventFilters"]["bucket"] == "{{ params.STORAGE_BUCKET }}"
    assert endpoints["forget_deleted_upload"]["region"] == ["us-central1"]
    assert endpoints["forget_deleted_upload"]["availableMemoryMb"] == 256
