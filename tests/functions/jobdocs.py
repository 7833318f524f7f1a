"""Documents as the app and the pipeline leave them, for the emulator tests."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from actorgen import schema
from actorgen.schema import Field, ImageField, ImageStatus, JobStatus, ModelStatus


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def put_actor(db: Any, owner: str, accepted: int = 5, **fields: Any) -> str:
    """An actor with ``accepted`` accepted photo records (no files: intake reads only these)."""
    actor_id = new_id("actor")
    images = {
        f"img{i}": {ImageField.STATUS: ImageStatus.ACCEPTED, ImageField.PATH: f"p{i}"}
        for i in range(accepted)
    }
    db.collection(schema.ACTORS).document(actor_id).set(
        {Field.USER_ID: owner, Field.IMAGES: images, Field.ACCEPTED_IMAGE_COUNT: accepted,
         Field.MODEL_STATUS: ModelStatus.NONE, **fields}
    )
    return actor_id


def queued_job_data(owner: str, actor_id: str, when: datetime, *,
                    priority: int = 0) -> dict[str, Any]:
    """A job document as intake leaves it: queued, due at ``when``, attempt 0."""
    return {
        Field.USER_ID: owner,
        Field.ACTOR_ID: actor_id,
        Field.INSTANCE_NAME: "sks_person",
        Field.BASE_MODEL_ID: "stable-diffusion-v1-5/stable-diffusion-v1-5",
        Field.STATUS: JobStatus.QUEUED,
        Field.QUEUED_AT: when,
        Field.NEXT_ATTEMPT_AT: when,
        Field.ATTEMPT: 0,
        Field.MAX_ATTEMPTS: 3,
        Field.ATTEMPT_HISTORY: [],
        Field.PRIORITY: priority,
        Field.ERROR: None,
    }


def put_queued_job(
    db: Any,
    owner: str,
    *,
    actor_id: str | None = None,
    queued_at: datetime | None = None,
    priority: int = 0,
    job_id: str | None = None,
    **fields: Any,
) -> str:
    """A job as intake leaves it: queued, released, attempt 0; its actor follows it."""
    job_id = job_id or new_id("job")
    actor_id = actor_id or put_actor(db, owner)
    data = queued_job_data(owner, actor_id, queued_at or datetime.now(UTC), priority=priority)
    data.update(fields)
    db.collection(schema.TRAINING_JOBS).document(job_id).set(data)
    db.collection(schema.ACTORS).document(actor_id).update(
        {Field.LATEST_JOB_ID: job_id, Field.MODEL_STATUS: ModelStatus.QUEUED}
    )
    return job_id


def read(db: Any, collection: str, doc_id: str) -> dict[str, Any]:
    return db.collection(collection).document(doc_id).get().to_dict()


def put_upload(bucket: Any, uid: str, actor_id: str, name: str, data: bytes) -> Any:
    """Upload like the app does; returns the finalize event the trigger would get."""
    from actorgen.uploads import UploadEvent

    path = schema.upload_path(uid, actor_id, name)
    blob = bucket.blob(path)
    blob.upload_from_string(data, content_type="image/jpeg")
    return UploadEvent(bucket.name, path, blob.generation, blob.size)


def real_records(uid: str, actor_id: str, **photos_by_name: bytes) -> dict[str, dict[str, Any]]:
    """Accepted image records of real photos, as validation wrote them (faces included)."""
    from actorgen import uploads
    from actorgen.config import Settings

    policy = uploads.UploadPolicy.from_settings(Settings())
    records = {}
    for name, data in photos_by_name.items():
        facts = uploads.analyse(data, policy)
        verdict = uploads.Verdict(ImageStatus.ACCEPTED, uploads.Reason.OK, None, facts.faces[0])
        path = schema.upload_path(uid, actor_id, f"{name}.jpg")
        records[schema.image_id(path)] = uploads.image_record(path, 1, facts, verdict,
                                                              datetime.now(UTC))
    return records
