"""Job and actor documents: status, progress, heartbeat and the final word.

Every write happens in a Firestore transaction that first re-reads the job, so
the trainer (a) only makes status changes that ``schema.check_transition``
allows, (b) notices ``cancelRequested`` and (c) stops writing once another
attempt owns the job. Progress is written at most every ``min_interval``
seconds: Firestore is comfortable with about one write per second per
document, and the app needs no more.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from actorgen import schema

from .errors import AlreadyCompleted, Cancelled, StopTraining, Superseded, TrainerError
from .timing import WorkerMeter, increments
from .training import Progress

log = logging.getLogger(__name__)
F = schema.Field
S = schema.JobStatus
MV = schema.ModelVersionField


class JobNotFound(TrainerError):
    """The job document does not exist: nothing can be reported."""


@dataclass
class FinishResult:
    """What the final transaction records on the job and the actor."""

    trained_model_id: str
    artifacts: dict[str, str]
    metrics: dict[str, Any]
    timings: dict[str, float]
    base_model_id: str
    trigger: str
    step: int
    total_steps: int
    hub_repo: str | None = None
    extra_version_fields: dict[str, Any] = field(default_factory=dict)


def _transactional(fn: Callable[..., Any]) -> Callable[..., Any]:
    from google.cloud import firestore

    return firestore.transactional(fn)


def _server_time() -> Any:
    from google.cloud import firestore

    return firestore.SERVER_TIMESTAMP


class JobReporter:
    """Writes one attempt's view of a training job to Firestore."""

    def __init__(self, db: Any, job_id: str, attempt: int, *, min_interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic,
                 meter: WorkerMeter | None = None) -> None:
        self.db = db
        # Each write adds the worker seconds since the previous one to gpuSeconds.
        self.meter = meter
        self.job_id = job_id
        self.attempt = attempt
        self.min_interval = min_interval
        self.clock = clock
        self.job_ref = db.collection(schema.TRAINING_JOBS).document(job_id)
        self.actor_id: str | None = None
        self._last_progress = -math.inf
        self.writes = 0  # progress writes made (for tests and logs)

    # ------------------------------------------------------------- helpers
    @contextlib.contextmanager
    def _charge(self) -> Iterator[dict[str, Any]]:
        """``gpuSeconds`` (and ``estimatedCostUsd``) increments for one write.

        Taken once outside the transaction (a retried transaction function
        adds the same amount); given back to the meter if the write fails.
        """
        if self.meter is None:
            yield {}
            return
        with self.meter.charge() as amounts:
            yield increments(amounts)

    def _actor_ref(self, actor_id: str) -> Any:
        return self.db.collection(schema.ACTORS).document(actor_id)

    def _read_job(self, transaction: Any, *, any_attempt: bool = False) -> dict[str, Any]:
        snap = self.job_ref.get(transaction=transaction)
        if not snap.exists:
            raise JobNotFound(f"the training job {self.job_id!r} does not exist")
        job = snap.to_dict() or {}
        current = job.get(F.ATTEMPT)
        if not any_attempt and current is not None and int(current) != self.attempt:
            raise Superseded(f"attempt {current} owns the job now (this is attempt {self.attempt})")
        return job

    def _owns_actor(self, actor: Mapping[str, Any]) -> bool:
        """The actor's model fields follow its latest job only."""
        latest = actor.get(F.LATEST_JOB_ID)
        return latest in (None, self.job_id)

    def _transition(self, transaction: Any, new_status: str,
                    updates: Mapping[str, Any]) -> dict[str, Any]:
        job = self._read_job(transaction)
        status = job.get(F.STATUS)
        if status == S.COMPLETED:
            raise AlreadyCompleted("the job is already completed")
        if job.get(F.CANCEL_REQUESTED):
            raise Cancelled("cancellation was requested")
        if not schema.can_transition(status, new_status):
            raise Superseded(f"the job is {status!r}; this attempt may not set {new_status!r}")
        now = _server_time()
        transaction.update(self.job_ref, {
            **schema.status_fields(job, new_status, datetime.now(UTC)),
            F.HEARTBEAT_AT: now, F.UPDATED_AT: now, **updates,
        })
        return job

    # ----------------------------------------------------------------- API
    def start(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Mark the job ``preparing``; returns ``(job, actor or None)``."""

        @_transactional
        def txn(transaction: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
            job = self._read_job(transaction)
            actor_id = job.get(F.ACTOR_ID)
            actor = None
            actor_ref = None
            if actor_id:
                actor_ref = self._actor_ref(str(actor_id))
                snap = actor_ref.get(transaction=transaction)
                actor = snap.to_dict() if snap.exists else None
            updates: dict[str, Any] = {F.ERROR: None, **charged}
            if not job.get(F.STARTED_AT):
                updates[F.STARTED_AT] = _server_time()
            # _transition re-reads inside the same transaction (cheap, consistent).
            self._transition(transaction, S.PREPARING, updates)
            if actor is not None and actor_ref is not None and self._owns_actor(actor):
                transaction.update(actor_ref, {
                    F.MODEL_STATUS: schema.model_status_for_job(S.PREPARING),
                    F.MODEL_ERROR: None,
                })
            return job, actor

        with self._charge() as charged:
            job, actor = txn(self.db.transaction())
        self.actor_id = str(job.get(F.ACTOR_ID) or "") or None
        return job, actor

    def set_status(self, status: str, **fields: Any) -> None:
        """A status change (``training``, ``uploading``) with extra job fields."""

        with self._charge() as charged:

            @_transactional
            def txn(transaction: Any) -> None:
                self._transition(transaction, status, {**fields, **charged})

            txn(self.db.transaction())
        self._last_progress = self.clock()

    @contextlib.contextmanager
    def keepalive(self, status: str, every: float = 60.0) -> Iterator[None]:
        """Heartbeat every ``every`` seconds from a thread while a long phase runs.

        Model downloads, class-image generation and sample rendering take
        minutes on big models; without a heartbeat the reconciler would call
        the attempt stale. A cancel request or a superseded attempt seen by the
        thread is raised when the phase ends.
        """
        stop = threading.Event()
        seen: list[StopTraining] = []

        def beat() -> None:
            while not stop.wait(every):
                try:
                    self.set_status(status)
                    self.writes += 1
                except StopTraining as why:
                    seen.append(why)
                    return
                except Exception as err:  # noqa: BLE001 - a missed beat is not fatal
                    log.warning("heartbeat failed: %s", err)

        thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=60)
        if seen:
            raise seen[0]

    def progress(self, progress: Progress, *, force: bool = False) -> bool:
        """Write progress and heartbeat unless one was written < ``min_interval`` ago.

        Raises :class:`Cancelled` or :class:`Superseded` when the job says so.
        Returns whether it wrote.
        """
        now = self.clock()
        if not force and now - self._last_progress < self.min_interval:
            return False
        fields = {
            F.STEP: progress.step,
            F.TOTAL_STEPS: progress.total_steps,
            # 100 is reserved for "completed": export and upload still follow.
            F.PROGRESS: min(99, math.floor(100 * progress.step / max(1, progress.total_steps))),
            F.LOSS: _finite(progress.loss),
            F.SAMPLES_PER_SECOND: round(progress.samples_per_second, 3),
            F.ETA_SECONDS: round(progress.eta_seconds, 1),
        }
        self.set_status(S.TRAINING, **fields)
        self.writes += 1
        self._last_progress = now
        return True

    def finish_success(self, result: FinishResult) -> int:
        """Job ``completed`` and actor ``ready`` with a new model version, atomically.

        Returns the model version number. Idempotent: a repeated call after a
        crash replaces this job's version entry instead of adding another.
        """

        @_transactional
        def txn(transaction: Any) -> int:
            # A finished model wins even if the reconciler gave up on this attempt
            # and re-queued (or re-dispatched) the job meanwhile: the GPU time is spent.
            job = self._read_job(transaction, any_attempt=True)
            status = job.get(F.STATUS)
            if status == S.COMPLETED:
                raise AlreadyCompleted("the job is already completed")
            if not schema.can_transition(status, S.COMPLETED):
                # cancelled (or rejected) meanwhile: not ours to finish.
                raise Superseded(f"the job is {status!r}; this attempt may not complete it")
            actor_id = str(job.get(F.ACTOR_ID))
            actor_ref = self._actor_ref(actor_id)
            actor_snap = actor_ref.get(transaction=transaction)
            actor = actor_snap.to_dict() if actor_snap.exists else None
            versions = list((actor or {}).get(F.MODEL_VERSIONS) or [])
            previous = [v for v in versions if v.get(MV.JOB_ID) == self.job_id]
            others = [v for v in versions if v.get(MV.JOB_ID) != self.job_id]
            if previous:
                version = int(previous[0].get(MV.VERSION) or 0)
            else:
                version = 1 + max((int(v.get(MV.VERSION) or 0) for v in others), default=0)
            entry = {
                MV.VERSION: version,
                MV.MODEL_ID: result.trained_model_id,
                MV.JOB_ID: self.job_id,
                MV.BASE_MODEL_ID: result.base_model_id,
                MV.TRIGGER: result.trigger,
                MV.ARTIFACTS: result.artifacts,
                MV.HUB_REPO: result.hub_repo,
                # Server timestamps are not allowed inside arrays.
                MV.CREATED_AT: datetime.now(UTC),
                **result.extra_version_fields,
            }
            now = _server_time()
            transaction.update(self.job_ref, {
                **schema.status_fields(job, S.COMPLETED, datetime.now(UTC)),
                F.PROGRESS: 100,
                F.STEP: result.step,
                F.TOTAL_STEPS: result.total_steps,
                F.ETA_SECONDS: 0,
                F.ERROR: None,
                F.TRAINED_MODEL_ID: result.trained_model_id,
                F.ARTIFACTS: result.artifacts,
                F.METRICS: result.metrics,
                F.TIMINGS: result.timings,
                F.MODEL_VERSION: version,
                F.FINISHED_AT: now,
                F.HEARTBEAT_AT: now,
                F.UPDATED_AT: now,
                **charged,
            })
            if actor is not None:
                updates: dict[str, Any] = {F.MODEL_VERSIONS: others + [entry]}
                if self._owns_actor(actor):
                    updates.update({
                        F.MODEL_STATUS: schema.model_status_for_job(S.COMPLETED),
                        F.MODEL_ID: result.trained_model_id,
                        F.MODEL_ERROR: None,
                    })
                transaction.update(actor_ref, updates)
            return version

        with self._charge() as charged:
            return txn(self.db.transaction())

    def finish_failure(self, message: str) -> bool:
        """Record ``failed`` and ``message`` on job and actor. Never raises.

        Returns whether the failure was written (it is not when the job is
        gone, final, or owned by another attempt).
        """
        try:
            return self._finish_unsafe(S.FAILED, message)
        except Exception as err:  # noqa: BLE001 - called from error handlers
            log.error("could not record the failure on the job: %s", err)
            return False

    def record_attempt_error(self, message: str) -> bool:
        """Write ``message`` to the job's ``error`` but leave its status. Never raises.

        For failures a retry may cure (a network error, a crash): the trainer
        exits non-zero, the executor reports the attempt failed, and the
        reconciler re-queues the job with this message in its history, or
        fails it with this message once the attempts are spent.
        """
        try:

            @_transactional
            def txn(transaction: Any) -> bool:
                job = self._read_job(transaction)
                if job.get(F.STATUS) not in schema.ACTIVE_JOB_STATUSES:
                    return False
                transaction.update(self.job_ref, {F.ERROR: message, F.UPDATED_AT: _server_time(),
                                                  **charged})
                return True

            with self._charge() as charged:
                return bool(txn(self.db.transaction()))
        except Exception as err:  # noqa: BLE001 - called from error handlers
            log.error("could not record the attempt's error on the job: %s", err)
            return False

    def finish_cancelled(self) -> bool:
        """Record ``cancelled`` after a cooperative stop. Never raises."""
        try:
            return self._finish_unsafe(S.CANCELLED, None)
        except Exception as err:  # noqa: BLE001
            log.error("could not record the cancellation on the job: %s", err)
            return False

    def _finish_unsafe(self, status: str, message: str | None) -> bool:
        @_transactional
        def txn(transaction: Any) -> bool:
            snap = self.job_ref.get(transaction=transaction)
            if not snap.exists:
                return False
            job = snap.to_dict() or {}
            current = job.get(F.ATTEMPT)
            if current is not None and int(current) != self.attempt:
                return False
            if not schema.can_transition(job.get(F.STATUS), status):
                return False
            actor_ref, actor = None, None
            if job.get(F.ACTOR_ID):
                actor_ref = self._actor_ref(str(job[F.ACTOR_ID]))
                actor_snap = actor_ref.get(transaction=transaction)
                actor = actor_snap.to_dict() if actor_snap.exists else None
            now = _server_time()
            transaction.update(self.job_ref, {
                **schema.status_fields(job, status, datetime.now(UTC)),
                F.ERROR: message,
                F.FINISHED_AT: now,
                F.UPDATED_AT: now,
                F.ETA_SECONDS: None,
                **charged,
            })
            if actor is not None and actor_ref is not None and self._owns_actor(actor):
                has_model = schema.actor_has_model(actor)
                transaction.update(actor_ref, {
                    F.MODEL_STATUS: schema.model_status_for_job(status, actor_has_model=has_model),
                    F.MODEL_ERROR: message,
                })
            return True

        with self._charge() as charged:
            return bool(txn(self.db.transaction()))

    def record_final_timings(self, values: Mapping[str, float]) -> bool:
        """Add phases measured after the completing write (its own duration, cleanup).

        A plain update of ``timings.<phase>`` plus the last worker seconds.
        Never raises: the model is published whatever happens here.
        """
        try:
            with self._charge() as charged:
                self.job_ref.update({**{f"{F.TIMINGS}.{name}": value
                                        for name, value in values.items()}, **charged})
            return True
        except Exception as err:  # noqa: BLE001 - after completion, nothing may fail
            log.warning("could not record the final timings: %s", err)
            return False


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
