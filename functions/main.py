"""Cloud Functions of the actor LoRA pipeline. This file only declares them.

The logic lives in the ``actorgen`` package beside it (one module per job:
uploads, intake, dispatch, reconcile, admin, tasks; configuration in
``actorgen.config``). Everything heavy (Pillow, dlib, the Vertex AI client) is
imported on first use, so a cold start pays only for what the function needs.
"""

from __future__ import annotations

import logging
from typing import Any

from firebase_functions import firestore_fn, params, scheduler_fn, storage_fn, tasks_fn
from firebase_functions.options import MemoryOption, RateLimits, RetryConfig

from actorgen import admin, clients, config, dispatch, intake, logs, reconcile, uploads
from actorgen.schema import TRAINING_JOBS, Field, parse_upload_path

# One JSON line per log record (Cloud Logging's structured format), INFO and up for the
# pipeline's own loggers; each function below puts its name and job on every line.
logs.install()
# Create the default Admin SDK app now (no network): the Firestore trigger wrappers
# would otherwise create it first with Google default credentials, which do not
# exist under the emulators (clients uses anonymous ones there).
clients.get_app()

REGION = config.FUNCTIONS_REGION
JOB_DOCUMENT = f"{TRAINING_JOBS}/{{jobId}}"
#: Every function runs as this service account (a param: see docs/deployment.md).
#: firebase-functions 0.6.0 types ``service_account`` as str, but its manifest writer
#: turns a param into "{{ params.NAME }}" and the CLI resolves that field like any other
#: (tests/functions/test_functions_main.py checks the manifest).
RUNS_AS = config.FUNCTIONS_SERVICE_ACCOUNT


def _upload_context(function: str, data: Any) -> Any:
    upload = parse_upload_path(getattr(data, "name", "") or "")
    return logs.context(function=function, user_id=upload.uid if upload else None)


def _job_context(function: str, job_id: str, job: dict[str, Any] | None) -> Any:
    job = job or {}
    return logs.context(function=function, job_id=job_id, user_id=job.get(Field.USER_ID),
                        attempt=job.get(Field.ATTEMPT))


@storage_fn.on_object_finalized(
    bucket=params.STORAGE_BUCKET,
    region=REGION,
    service_account=RUNS_AS,
    memory=MemoryOption.GB_1,
    timeout_sec=120,
    max_instances=20,
    concurrency=1,  # one photo at a time: decoding a 50 MP image needs the memory
)
def validate_upload(event: storage_fn.CloudEvent[storage_fn.StorageObjectData]) -> None:
    """Judge an uploaded actor photo and record the verdict on the actor."""
    with _upload_context("validate_upload", event.data):
        uploads.handle_upload(uploads.UploadEvent.from_storage_data(event.data),
                              config.load_settings())


@storage_fn.on_object_deleted(
    bucket=params.STORAGE_BUCKET,
    region=REGION,
    service_account=RUNS_AS,
    memory=MemoryOption.MB_256,  # one transaction, no image decoding
    timeout_sec=60,
    max_instances=10,
)
def forget_deleted_upload(event: storage_fn.CloudEvent[storage_fn.StorageObjectData]) -> None:
    """Remove a deleted (or overwritten) photo's verdict from its actor and recount."""
    with _upload_context("forget_deleted_upload", event.data):
        uploads.handle_deleted(uploads.UploadEvent.from_storage_data(event.data),
                               config.load_settings())


@firestore_fn.on_document_created(
    document=JOB_DOCUMENT,
    region=REGION,
    service_account=RUNS_AS,
    memory=MemoryOption.MB_256,
    timeout_sec=60,
    max_instances=10,
)
def intake_job(event: firestore_fn.Event[firestore_fn.DocumentSnapshot | None]) -> None:
    """Take in a new training job: queued (and nudge the dispatcher) or rejected with a reason."""
    job = event.data.to_dict() if event.data else None
    with _job_context("intake_job", event.params["jobId"], job):
        intake.process_job(event.params["jobId"], config.load_settings())


@firestore_fn.on_document_updated(
    document=JOB_DOCUMENT,
    region=REGION,
    service_account=RUNS_AS,
    memory=MemoryOption.MB_512,
    timeout_sec=120,
    max_instances=10,
)
def on_job_updated(
    event: firestore_fn.Event[firestore_fn.Change[firestore_fn.DocumentSnapshot | None]],
) -> None:
    """Admin re-dispatch (status failed -> queued in the console) and cancelRequested."""
    before = event.data.before.to_dict() if event.data.before else None
    after = event.data.after.to_dict() if event.data.after else None
    with _job_context("on_job_updated", event.params["jobId"], after or before):
        admin.handle_job_update(event.params["jobId"], before, after, config.load_settings())


@scheduler_fn.on_schedule(
    schedule="every 1 minutes",
    region=REGION,
    service_account=RUNS_AS,
    memory=MemoryOption.GB_1,  # the upload sweep may decode photos
    timeout_sec=config.DISPATCH_FUNCTION_TIMEOUT_SECONDS,
    max_instances=1,
    retry_count=0,  # the next minute is the retry
)
def dispatch_jobs(event: scheduler_fn.ScheduledEvent) -> None:
    """Reconcile running jobs with the executor, dispatch queued jobs, then sweep lost triggers."""
    with logs.context(function="dispatch_jobs"):
        report = reconcile.run_maintenance(config.load_settings())
        if report.errors:
            logging.getLogger("actorgen").error("maintenance errors: %s", report.errors)


@tasks_fn.on_task_dispatched(
    retry_config=RetryConfig(max_attempts=3, min_backoff_seconds=10),
    rate_limits=RateLimits(max_concurrent_dispatches=1, max_dispatches_per_second=5),
    region=REGION,
    service_account=RUNS_AS,
    memory=MemoryOption.MB_512,
    timeout_sec=config.DISPATCH_FUNCTION_TIMEOUT_SECONDS,
    max_instances=1,
)
def dispatchnow(request: tasks_fn.CallableRequest[Any]) -> None:
    """Run one dispatch pass right away (enqueued by intake; the name is the queue id)."""
    # No job id here: the pass dispatches whatever is due; each job's lines carry its own.
    with logs.context(function="dispatchnow"):
        dispatch.run_dispatch_pass(config.load_settings())
