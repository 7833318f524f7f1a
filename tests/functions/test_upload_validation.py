"""Upload validation against the Storage and Firestore emulators."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from actorgen import reconcile, schema, uploads
from actorgen.config import Settings
from actorgen.schema import Field, ImageField, ImageStatus
from actorgen.uploads import Outcome, Reason, UploadEvent

from tests import photos
from tests.functions.jobdocs import put_upload as put

SETTINGS = Settings()





def validate(event: UploadEvent, db: Any, bucket: Any, settings: Settings = SETTINGS) -> str:
    return uploads.handle_upload(event, settings, db=db, bucket=bucket)


def record_of(db: Any, actor_id: str, event: UploadEvent) -> dict[str, Any]:
    actor = db.collection(schema.ACTORS).document(actor_id).get().to_dict()
    return actor[Field.IMAGES][schema.image_id(event.name)]


def test_a_batch_of_good_and_bad_photos(db: Any, bucket: Any, owner: str, actor_id: str) -> None:
    first = photos.jpeg(photos.portrait(0))
    cases: list[tuple[str, bytes, str]] = [
        ("IMG_0001.jpg", first, Reason.OK),
        ("IMG_0002.heic", photos.heic(photos.portrait(1)), Reason.OK),
        ("IMG_0003.png", photos.with_exif_rotation(photos.portrait(2)), Reason.OK),
        ("IMG_0004.jpg", first, Reason.DUPLICATE),
        ("IMG_0005.jpg", photos.jpeg(photos.portrait(1).resize((700, 875)), 60),
         Reason.NEAR_DUPLICATE),
        ("cut.jpg", photos.truncated(photos.jpeg(photos.portrait(3))), Reason.UNREADABLE),
        ("empty.jpg", b"", Reason.EMPTY),
        ("notes.jpg", photos.text_as_jpg(), Reason.UNREADABLE),
        ("bomb.png", photos.decompression_bomb(), Reason.UNREADABLE),
        ("tiny.jpg", photos.jpeg(photos.too_small()), Reason.TOO_SMALL),
        ("cup.jpg", photos.jpeg(photos.no_face()), Reason.NO_FACE),
        ("pair.jpg", photos.jpeg(photos.two_people()), Reason.MANY_FACES),
    ]
    events = {}
    for name, data, _ in cases:
        events[name] = put(bucket, owner, actor_id, name, data)
        validate(events[name], db, bucket)
    for name, _, code in cases:
        record = record_of(db, actor_id, events[name])
        assert record[ImageField.REASON_CODE] == code, (name, record[ImageField.REASON])
        assert record[ImageField.PATH] == events[name].name
        assert record[ImageField.FILE_NAME] == name
        assert record[ImageField.GENERATION] == events[name].generation
        if code == Reason.OK:
            assert record[ImageField.STATUS] == ImageStatus.ACCEPTED
            assert record[ImageField.FACE]["w"] >= uploads.MIN_FACE_PIXELS
        else:
            assert record[ImageField.STATUS] == ImageStatus.REJECTED
            assert record[ImageField.REASON]
    assert "the same file as IMG_0001.jpg" in record_of(db, actor_id, events["IMG_0004.jpg"])[
        ImageField.REASON
    ]
    assert "This photo shows 2 faces" in record_of(db, actor_id, events["pair.jpg"])[
        ImageField.REASON
    ]
    actor = db.collection(schema.ACTORS).document(actor_id).get().to_dict()
    assert actor[Field.ACCEPTED_IMAGE_COUNT] == 3
    # Rejected files are kept.
    assert all(bucket.blob(e.name).exists() for e in events.values())


def test_redelivery_changes_nothing(db: Any, bucket: Any, owner: str, actor_id: str) -> None:
    event = put(bucket, owner, actor_id, "a.jpg", photos.jpeg(photos.portrait(4)))
    assert validate(event, db, bucket) == Outcome.ACCEPTED
    ref = db.collection(schema.ACTORS).document(actor_id)
    before = ref.get()
    assert validate(event, db, bucket) == Outcome.ALREADY_JUDGED
    after = ref.get()
    assert after.update_time == before.update_time
    assert after.to_dict()[Field.ACCEPTED_IMAGE_COUNT] == 1


def test_overwritten_file_is_judged_again(db: Any, bucket: Any, owner: str, actor_id: str) -> None:
    good = put(bucket, owner, actor_id, "me.jpg", photos.jpeg(photos.portrait(5)))
    assert validate(good, db, bucket) == Outcome.ACCEPTED
    bad = put(bucket, owner, actor_id, "me.jpg", photos.jpeg(photos.no_face()))
    assert bad.generation != good.generation
    assert validate(bad, db, bucket) == Outcome.REJECTED
    actor = db.collection(schema.ACTORS).document(actor_id).get().to_dict()
    assert actor[Field.ACCEPTED_IMAGE_COUNT] == 0
    # The late delivery of the first event does not bring the old verdict back.
    assert validate(good, db, bucket) == Outcome.ALREADY_JUDGED
    assert record_of(db, actor_id, bad)[ImageField.REASON_CODE] == Reason.NO_FACE


def test_upload_for_someone_elses_actor_writes_nothing(
    db: Any, bucket: Any, actor_id: str
) -> None:
    ref = db.collection(schema.ACTORS).document(actor_id)
    before = ref.get()
    event = put(bucket, "intruder", actor_id, "x.jpg", photos.jpeg(photos.portrait(0)))
    assert validate(event, db, bucket) == Outcome.FOREIGN_ACTOR
    after = ref.get()
    assert after.update_time == before.update_time
    assert Field.IMAGES not in after.to_dict()


def test_upload_for_a_missing_actor_creates_nothing(db: Any, bucket: Any, owner: str) -> None:
    event = put(bucket, owner, "no-such-actor", "x.jpg", photos.jpeg(photos.portrait(0)))
    assert validate(event, db, bucket) == Outcome.NO_ACTOR
    assert not db.collection(schema.ACTORS).document("no-such-actor").get().exists


def test_other_objects_are_ignored(db: Any, bucket: Any) -> None:
    event = UploadEvent(bucket.name, "users/u/actors/a/models/j/lora.safetensors", 1, 10)
    assert validate(event, db, bucket) == Outcome.NOT_AN_UPLOAD


def test_actor_full_rejects_later_photos(db: Any, bucket: Any, owner: str, actor_id: str) -> None:
    settings = Settings(max_images=2)
    outcomes = [
        validate(put(bucket, owner, actor_id, f"{i}.jpg", photos.jpeg(photos.portrait(i))),
                 db, bucket, settings)
        for i in range(3)
    ]
    assert outcomes == [Outcome.ACCEPTED, Outcome.ACCEPTED, Outcome.REJECTED]
    last = record_of(db, actor_id, UploadEvent(bucket.name, schema.upload_path(owner, actor_id,
                                                                                "2.jpg")))
    assert last[ImageField.REASON_CODE] == Reason.TOO_MANY_IMAGES


def test_the_same_photo_twice_at_once_is_accepted_once(
    db: Any, bucket: Any, owner: str, actor_id: str
) -> None:
    data = photos.jpeg(photos.portrait(4))
    events = [put(bucket, owner, actor_id, f"copy{i}.jpg", data) for i in range(2)]
    outcomes = _validate_at_once(events, db, bucket)
    assert sorted(outcomes) == [Outcome.ACCEPTED, Outcome.REJECTED]
    actor = db.collection(schema.ACTORS).document(actor_id).get().to_dict()
    assert actor[Field.ACCEPTED_IMAGE_COUNT] == 1


def test_sweeper_validates_uploads_whose_trigger_was_lost(
    db: Any, bucket: Any, owner: str, actor_id: str
) -> None:
    lost = put(bucket, owner, actor_id, "lost.jpg", photos.jpeg(photos.portrait(5)))
    foreign = put(bucket, "intruder", actor_id, "x.jpg", photos.jpeg(photos.portrait(0)))
    now = datetime.now(UTC)
    # Too recent: its trigger may still be running.
    assert lost.name not in reconcile.sweep_uploads(SETTINGS, db=db, bucket=bucket, now=now)
    later = now + timedelta(seconds=SETTINGS.sweep_after_seconds + 5)
    swept = reconcile.sweep_uploads(SETTINGS, db=db, bucket=bucket, now=later)
    assert lost.name in swept and foreign.name not in swept
    assert record_of(db, actor_id, lost)[ImageField.STATUS] == ImageStatus.ACCEPTED
    # Once judged, it is not swept again.
    assert lost.name not in reconcile.sweep_uploads(SETTINGS, db=db, bucket=bucket, now=later)


def test_many_photos_at_once_are_all_judged(
    db: Any, bucket: Any, owner: str, actor_id: str
) -> None:
    # A phone uploads a whole selection together: every verdict lands, none is lost to
    # contention on the actor document.
    events = [put(bucket, owner, actor_id, f"p{i}.jpg", photos.jpeg(photos.portrait(i)))
              for i in range(6)]
    outcomes: list[str] = []
    threads = [
        threading.Thread(target=lambda e=e: outcomes.append(validate(e, db, bucket)))
        for e in events
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes == [Outcome.ACCEPTED] * 6
    actor = db.collection(schema.ACTORS).document(actor_id).get().to_dict()
    assert len(actor[Field.IMAGES]) == 6 and actor[Field.ACCEPTED_IMAGE_COUNT] == 6


def _validate_at_once(events: list[UploadEvent], db: Any, bucket: Any) -> list[str]:
    outcomes: list[str] = []
    threads = [
        threading.Thread(target=lambda e=e: outcomes.append(validate(e, db, bucket)))
        for e in events
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_a_different_person_arriving_at_the_same_moment_is_rejected(
    db: Any, bucket: Any, owner: str, actor_id: str
) -> None:
    # The stranger's photo is uploaded first and all four are judged at once: who the
    # person is comes from the faces, not from who was first.
    uploads_ = {"stranger.jpg": photos.jpeg(photos.other_person(0))}
    uploads_.update({f"me{i}.jpg": photos.jpeg(photos.portrait(i)) for i in range(3)})
    events = {name: put(bucket, owner, actor_id, name, data) for name, data in uploads_.items()}
    _validate_at_once(list(events.values()), db, bucket)
    codes = {n: record_of(db, actor_id, e)[ImageField.REASON_CODE] for n, e in events.items()}
    assert codes == {"stranger.jpg": Reason.DIFFERENT_PERSON, "me0.jpg": Reason.OK,
                     "me1.jpg": Reason.OK, "me2.jpg": Reason.OK}
    stranger = record_of(db, actor_id, events["stranger.jpg"])
    assert stranger[ImageField.IDENTITY_DISTANCE] > 0.6
    assert "different person from your other photos" in stranger[ImageField.REASON]
    actor = db.collection(schema.ACTORS).document(actor_id).get().to_dict()
    assert actor[Field.ACCEPTED_IMAGE_COUNT] == 3
    # Each accepted record carries the face for the trainer and intake.
    me0 = record_of(db, actor_id, events["me0.jpg"])
    assert len(me0[ImageField.EMBEDDING]) == 128 and len(me0[ImageField.LANDMARKS]) == 5


def test_deleting_a_photo_judges_the_rest_again(
    db: Any, bucket: Any, owner: str, actor_id: str
) -> None:
    stranger = put(bucket, owner, actor_id, "stranger.jpg", photos.jpeg(photos.other_person(0)))
    me0 = put(bucket, owner, actor_id, "me0.jpg", photos.jpeg(photos.portrait(0)))
    me1 = put(bucket, owner, actor_id, "me1.jpg", photos.jpeg(photos.portrait(1)))
    for event in (stranger, me0):
        assert validate(event, db, bucket) == Outcome.ACCEPTED  # one each: undecided
    assert validate(me1, db, bucket) == Outcome.ACCEPTED
    # me1 made a group of two: the stranger's earlier verdict changed in that transaction.
    assert record_of(db, actor_id, stranger)[ImageField.REASON_CODE] == Reason.DIFFERENT_PERSON
    bucket.blob(me1.name).delete()
    assert uploads.handle_deleted(me1, SETTINGS, db=db, bucket=bucket) == Outcome.REMOVED
    assert record_of(db, actor_id, stranger)[ImageField.STATUS] == ImageStatus.ACCEPTED
    actor = db.collection(schema.ACTORS).document(actor_id).get().to_dict()
    assert actor[Field.ACCEPTED_IMAGE_COUNT] == 2
