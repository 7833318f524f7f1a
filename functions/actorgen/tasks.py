"""The Cloud Tasks nudge: run a dispatch pass right after a job is queued.

Intake enqueues ``{"data": {"jobId": ...}}`` to the task-queue function
:data:`DISPATCH_TASK_FUNCTION` (declared in ``main.py``). The function's name is
also the Cloud Tasks queue id, and queue ids allow only letters, digits and
hyphens: hence one lowercase word. The nudge is best effort: when enqueueing
fails, the job is still ``queued`` and the every-minute scheduler dispatches it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from actorgen.config import Settings

log = logging.getLogger(__name__)

#: Name of the task-queue function in main.py (and so the queue id).
DISPATCH_TASK_FUNCTION: Final = "dispatchnow"
#: Key of the job id in a task's payload (only logged: a pass dispatches whatever is due).
PAYLOAD_JOB_ID: Final = "jobId"


def task_payload(job_id: str) -> dict[str, Any]:
    """The request body: task-queue functions read their data from a ``data`` wrapper."""
    return {"data": {PAYLOAD_JOB_ID: job_id}}


def queue_resource(settings: Settings) -> str:
    """The task-queue function's resource name, as firebase_admin.functions takes it."""
    return f"locations/{settings.functions_region}/functions/{DISPATCH_TASK_FUNCTION}"


def nudge_dispatcher(job_id: str, settings: Settings) -> bool:
    """Enqueue a dispatch pass; True when enqueued. Never raises: the scheduler is the backstop."""
    try:
        import os

        from firebase_admin import functions

        from actorgen import clients

        if clients.using_emulators() and not os.environ.get("CLOUD_TASKS_EMULATOR_HOST"):
            # Emulated Firestore but no Tasks emulator: the real endpoint would only hang.
            log.info("no Cloud Tasks emulator; job %s waits for the scheduled dispatcher", job_id)
            return False
        queue = functions.task_queue(queue_resource(settings), app=clients.get_app())
        queue.enqueue(task_payload(job_id))
        return True
    except Exception:  # any failure here must neither lose nor fail the job
        log.warning(
            "could not enqueue a dispatch nudge for job %s; the scheduled dispatcher will "
            "pick it up within a minute", job_id, exc_info=True,
        )
        return False
