"""The upload sweep (a safety net for lost Storage triggers) is bounded and resumes."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from actorgen import reconcile, schema
from actorgen.config import Settings
from actorgen.schema import Field, ImageField
from actorgen.uploads import Reason


def put(bucket: Any, uid: str, actor_id: str, name: str, data: bytes) -> str:
    """Upload like the app does, with no trigger to validate it; returns the object name."""
    path = schema.upload_path(uid, actor_id, name)
    bucket.blob(path).upload_from_string(data, content_type="image/jpeg")
    return path


def record_of(db: Any, actor_id: str, name: str) -> dict[str, Any]:
    actor = db.collection(schema.ACTORS).document(actor_id).get().to_dict()
    return actor[Field.IMAGES][schema.image_id(name)]


def test_the_upload_sweep_is_bounded_and_resumes_where_it_stopped(
    db: Any, bucket: Any
) -> None:
    settings = Settings(upload_sweep_max_objects=2)
    lost = []
    for uid in ("u-a", "u-b", "u-c"):
        actor = f"actor-{uid}"
        db.collection(schema.ACTORS).document(actor).set({Field.USER_ID: uid})
        lost.append(put(bucket, uid, actor, "lost.jpg", b"not a photo"))
    # A trained model's files: never listed as uploads, never counted.
    for i in range(5):
        bucket.blob(f"users/u-a/actors/actor-u-a/models/job/{i}.safetensors").upload_from_string(
            b"x"
        )
    later = datetime.now(UTC) + timedelta(seconds=settings.sweep_after_seconds + 5)

    assert reconcile.sweep_uploads(settings, db=db, bucket=bucket, now=later) == lost[:2]
    # The next pass goes on from where the budget ran out, not from the start.
    assert reconcile.sweep_uploads(settings, db=db, bucket=bucket, now=later) == lost[2:]
    assert reconcile.sweep_uploads(settings, db=db, bucket=bucket, now=later) == []
    for uid, name in zip(("u-a", "u-b", "u-c"), lost, strict=True):
        record = record_of(db, f"actor-{uid}", name)
        assert record[ImageField.REASON_CODE] == Reason.UNREADABLE


class EndlessBucket:
    """Listing never ends; every object is too old to be validated."""

    name = "b"

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.names: list[str] = []

    def list_blobs(self, **options: Any) -> Any:
        self.calls.append(options)
        old = datetime(2020, 1, 1, tzinfo=UTC)
        i = 0
        while True:
            i += 1
            name = f"users/u{i:07d}/actors/a/images/p.jpg"
            self.names.append(name)
            yield SimpleNamespace(name=name, updated=old, time_created=old, generation=1, size=1)


def test_the_upload_sweep_stops_at_its_time_budget() -> None:
    ticks = itertools.count()
    cursor = reconcile.UploadSweepCursor()
    huge = EndlessBucket()
    settings = Settings(upload_sweep_max_seconds=10)

    def sweep() -> list[str]:
        return reconcile.sweep_uploads(settings, db=None, bucket=huge, now=datetime.now(UTC),
                                       timer=lambda: float(next(ticks)), cursor=cursor)

    assert sweep() == []
    # The first upload is always taken (progress), then one clock reading per object.
    assert len(huge.names) == 12
    assert cursor.resume_from == huge.names[-1]
    assert huge.calls[0] == {"prefix": "users/", "match_glob": reconcile.UPLOAD_GLOB}
    sweep()
    assert huge.calls[1]["start_offset"] == huge.names[11]


def test_a_sweep_whose_listing_used_the_budget_still_validates_one(db: Any, bucket: Any) -> None:
    db.collection(schema.ACTORS).document("actor-s").set({Field.USER_ID: "u-s"})
    lost = [put(bucket, "u-s", "actor-s", f"lost-{i}.jpg", b"not a photo") for i in range(2)]
    later = datetime.now(UTC) + timedelta(seconds=Settings().sweep_after_seconds + 5)
    clock = itertools.count(0, 100)  # every reading is past the 60 s budget
    cursor = reconcile.UploadSweepCursor()

    def sweep() -> list[str]:
        return reconcile.sweep_uploads(Settings(), db=db, bucket=bucket, now=later,
                                       timer=lambda: float(next(clock)), cursor=cursor)

    assert sweep() == lost[:1]  # progress despite the budget...
    assert sweep() == lost[1:]  # ...so the next pass moves on
