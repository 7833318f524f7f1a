"""End to end through the Functions emulator: uploads -> verdicts -> job -> queued ->
dispatched (Cloud Tasks nudge, else the scheduled function) -> the real trainer
started by the LocalExecutor -> completed.

Nothing is called directly: the test only does what the app does (upload files,
write documents) and watches the documents, except that it fires the scheduled
dispatcher by HTTP when the nudge did not arrive (the emulator runs no scheduler).
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from actorgen import schema
from actorgen.config import Settings
from actorgen.schema import Field, ImageField, ImageStatus, JobStatus, ModelStatus
from lora_trainer.timing import Phase
from tests import photos

pytestmark = pytest.mark.e2e

GOOD = 5  # MIN_IMAGES
NUDGE_GRACE_S = 45.0  # how long to wait for the Cloud Tasks nudge before POSTing the scheduler


def wait_for(what: str, probe: Callable[[], Any], limit: float) -> Any:
    """Poll ``probe`` until it returns something truthy (bounds a hang; not a speed check)."""
    deadline = time.monotonic() + limit
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit:.0f}s waiting for {what}")
        time.sleep(0.5)


def post(url: str) -> None:
    request = urllib.request.Request(url, data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        response.read()


def test_uploads_to_completed_model(
    functions_emulators: Any, unique_id: str, tiny_base_model: Path
) -> None:
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    db = functions_emulators.firestore_client()
    bucket = functions_emulators.storage_bucket()
    uid, actor_id, job_id = f"u-{unique_id}", f"actor-{unique_id}", f"job-{unique_id}"
    actor_ref = db.collection(schema.ACTORS).document(actor_id)
    job_ref = db.collection(schema.TRAINING_JOBS).document(job_id)

    # The app creates the actor, then uploads photos into the user's folder.
    actor_ref.set({Field.USER_ID: uid, Field.MODEL_STATUS: ModelStatus.NONE,
                   Field.IMAGE_URLS: []})
    uploads = {f"IMG_{i:04d}.jpg": photos.jpeg(photos.portrait(i)) for i in range(GOOD)}
    uploads["cup.jpg"] = photos.jpeg(photos.no_face())
    uploads["notes.jpg"] = photos.text_as_jpg()
    for name, data in uploads.items():
        bucket.blob(schema.upload_path(uid, actor_id, name)).upload_from_string(
            data, content_type="image/jpeg"
        )

    def verdicts() -> dict[str, dict] | None:
        images = (actor_ref.get().to_dict() or {}).get(Field.IMAGES) or {}
        return images if len(images) == len(uploads) else None

    images = wait_for("a verdict on every upload", verdicts, 240)
    timings["verdicts"] = time.monotonic() - t0
    by_name = {r[ImageField.FILE_NAME]: r for r in images.values()}
    assert all(by_name[f"IMG_{i:04d}.jpg"][ImageField.STATUS] == ImageStatus.ACCEPTED
               for i in range(GOOD))
    assert by_name["cup.jpg"][ImageField.STATUS] == ImageStatus.REJECTED
    assert "No face" in by_name["cup.jpg"][ImageField.REASON]
    assert "not an image" in by_name["notes.jpg"][ImageField.REASON]
    assert actor_ref.get().to_dict()[Field.ACCEPTED_IMAGE_COUNT] == GOOD

    # The app creates the job.
    job_ref.set({
        Field.USER_ID: uid,
        Field.ACTOR_ID: actor_id,
        Field.INSTANCE_NAME: "ohwx",
        Field.BASE_MODEL_ID: str(tiny_base_model),
        Field.TRAINING_STEPS: 50,
        Field.TRAINING_BATCH_SIZE: 1,
        Field.LEARNING_RATE: 1e-4,
        Field.STATUS: JobStatus.PENDING,
    })
    t_job = time.monotonic()
    status = wait_for(
        "intake", lambda: (job_ref.get().to_dict() or {}).get(Field.STATUS) not in
        (None, JobStatus.PENDING) and job_ref.get().to_dict()[Field.STATUS], 120
    )
    timings["intake"] = time.monotonic() - t_job
    assert status != JobStatus.REJECTED, job_ref.get().to_dict().get(Field.ERROR)

    # A second job for the same actor while this one runs is a duplicate.
    dup_ref = db.collection(schema.TRAINING_JOBS).document(f"dup-{unique_id}")
    dup_ref.set({**job_ref.get().to_dict(), Field.STATUS: JobStatus.PENDING})

    def dispatched() -> bool:
        return (job_ref.get().to_dict() or {}).get(Field.STATUS) not in (
            JobStatus.QUEUED, JobStatus.DISPATCHING
        )

    try:
        wait_for("the Cloud Tasks nudge to dispatch the job", dispatched, NUDGE_GRACE_S)
        timings["dispatched_by_nudge"] = time.monotonic() - t_job
    except AssertionError:
        post(functions_emulators.functions_url("dispatch_jobs"))
        wait_for("the scheduled dispatcher", dispatched, 120)
        timings["dispatched_by_scheduler"] = time.monotonic() - t_job
    job = job_ref.get().to_dict()
    assert job[Field.ATTEMPT] == 1 and job[Field.EXECUTOR] == "local"
    assert job[Field.STATUS] in schema.ACTIVE_JOB_STATUSES | {JobStatus.COMPLETED}, job

    dup = wait_for("the duplicate's intake", lambda: (dup_ref.get().to_dict() or {}).get(
        Field.STATUS) == JobStatus.REJECTED and dup_ref.get().to_dict(), 120)
    assert "already has a training job in progress" in dup[Field.ERROR]

    # The trainer (a real process) takes it from here.
    def finished() -> dict | None:
        job = job_ref.get().to_dict() or {}
        return job if job.get(Field.STATUS) in (JobStatus.COMPLETED, JobStatus.FAILED) else None

    job = wait_for("the trainer to finish", finished, 420)
    timings["completed"] = time.monotonic() - t_job
    timings["total"] = time.monotonic() - t0
    print(f"\ne2e timings (s): { {k: round(v, 1) for k, v in timings.items()} }")
    assert job[Field.STATUS] == JobStatus.COMPLETED, job.get(Field.ERROR)
    assert job[Field.TRAINED_MODEL_ID]
    actor = actor_ref.get().to_dict()
    assert actor[Field.MODEL_STATUS] == ModelStatus.READY
    # The trainer's last write (the completing write's own duration) follows the
    # completion; wait for it, so what comes after reads the job as the trainer left it.
    job = wait_for("the trainer's final timings", lambda: (
        lambda doc: doc if Phase.FINAL_WRITE in (doc.get(Field.TIMINGS) or {}) else None
    )(job_ref.get().to_dict() or {}), 60)
    # Cost: the dispatcher priced the worker from GPU_PRICES (the defaults here), the
    # executor passed it on, and the trainer turned its seconds into an estimate.
    price = Settings().worker_price_per_hour()
    assert price is not None and job[Field.GPU_SECONDS] > 0
    assert job[Field.ESTIMATED_COST_USD] == pytest.approx(
        job[Field.GPU_SECONDS] / 3600 * price, rel=1e-3, abs=1e-6)
    print(f"e2e cost: {job[Field.GPU_SECONDS]:.1f} worker seconds, "
          f"${job[Field.ESTIMATED_COST_USD]:.5f} at ${price}/h")

    # The every-minute pass (sweep, reconcile, dispatch) leaves a completed job alone.
    stamp = job_ref.get().update_time
    post(functions_emulators.functions_url("dispatch_jobs"))
    assert job_ref.get().update_time == stamp
