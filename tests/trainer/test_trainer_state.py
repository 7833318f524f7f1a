"""JobReporter against the Firestore emulator and CheckpointStore against the
Storage emulator: throttling, state-machine checks, markers, pruning, damage."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from actorgen import schema
from lora_trainer import hub
from lora_trainer.checkpoints import MARKER, STATE_FILE, CheckpointStore, step_dir
from lora_trainer.errors import (
    AlreadyCompleted,
    Cancelled,
    DataError,
    Superseded,
    is_permanent,
)
from lora_trainer.reporting import FinishResult, JobReporter
from lora_trainer.training import Progress

from tests.trainer.seed import seed_job

F = schema.Field
S = schema.JobStatus


class FakeClock:
    """Only time is faked; Firestore is the emulator."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _progress(step: int, total: int = 100) -> Progress:
    return Progress(step=step, total_steps=total, loss=0.5, samples_per_second=3.0,
                    eta_seconds=10.0, elapsed_seconds=1.0)


def test_progress_is_throttled_and_validated(emulators: Any, db: Any, bucket: Any,
                                             tmp_path: Path) -> None:
    job = seed_job(db, bucket, tmp_path, images=1)
    clock = FakeClock()
    reporter = JobReporter(db, job.job_id, 1, min_interval=5.0, clock=clock)
    doc, actor = reporter.start()
    assert doc[F.ACTOR_ID] == job.actor_id and actor is not None
    assert job.job(db)[F.STATUS] == S.PREPARING
    assert job.actor(db)[F.MODEL_STATUS] == schema.ModelStatus.TRAINING  # type: ignore[index]
    reporter.set_status(S.TRAINING, **{F.STEP: 0, F.TOTAL_STEPS: 100})
    written = []
    for step in range(1, 21):  # 20 steps, one second apart
        clock.now += 1.0
        written.append(reporter.progress(_progress(step)))
    assert sum(written) == 4  # at 5, 10, 15, 20 seconds
    doc = job.job(db)
    assert doc[F.STEP] == 20 and doc[F.PROGRESS] == 20 and doc[F.LOSS] == 0.5
    assert doc[F.SAMPLES_PER_SECOND] == 3.0 and doc[F.ETA_SECONDS] == 10.0
    assert reporter.progress(_progress(100), force=True)
    assert job.job(db)[F.PROGRESS] == 99  # 100 means completed, not "last step done"

    db.collection(schema.TRAINING_JOBS).document(job.job_id).update({F.CANCEL_REQUESTED: True})
    with pytest.raises(Cancelled):
        reporter.progress(_progress(21), force=True)
    assert reporter.finish_cancelled()
    assert job.job(db)[F.STATUS] == S.CANCELLED


def test_keepalive_beats_during_long_phases_and_sees_cancel(emulators: Any, db: Any,
                                                             bucket: Any, tmp_path: Path) -> None:
    job = seed_job(db, bucket, tmp_path, images=1)
    reporter = JobReporter(db, job.job_id, 1)
    reporter.start()
    first = job.job(db)[F.HEARTBEAT_AT]
    with reporter.keepalive(S.PREPARING, every=0.2):
        time.sleep(1.0)  # a model download, say
    assert reporter.writes >= 2
    assert job.job(db)[F.HEARTBEAT_AT] > first
    db.collection(schema.TRAINING_JOBS).document(job.job_id).update({F.CANCEL_REQUESTED: True})
    with pytest.raises(Cancelled), reporter.keepalive(S.PREPARING, every=0.1):
        time.sleep(0.6)


def test_start_refuses_jobs_it_does_not_own(emulators: Any, db: Any, bucket: Any,
                                            tmp_path: Path) -> None:
    queued = seed_job(db, bucket, tmp_path, images=1, status=S.QUEUED)
    with pytest.raises(Superseded):
        JobReporter(db, queued.job_id, 1).start()
    newer = seed_job(db, bucket, tmp_path, images=1, attempt=3)
    with pytest.raises(Superseded, match="attempt 3"):
        JobReporter(db, newer.job_id, 2).start()
    done = seed_job(db, bucket, tmp_path, images=1, status=S.COMPLETED)
    with pytest.raises(AlreadyCompleted):
        JobReporter(db, done.job_id, 1).start()
    assert not JobReporter(db, done.job_id, 1).finish_failure("late failure")
    assert done.job(db)[F.STATUS] == S.COMPLETED


def test_finish_success_is_atomic_and_idempotent(emulators: Any, db: Any, bucket: Any,
                                                 tmp_path: Path) -> None:
    job = seed_job(db, bucket, tmp_path, images=1)
    actor_ref = db.collection(schema.ACTORS).document(job.actor_id)
    older = {schema.ModelVersionField.VERSION: 1, schema.ModelVersionField.JOB_ID: "old-job"}
    actor_ref.update({F.MODEL_VERSIONS: [older]})
    reporter = JobReporter(db, job.job_id, 1)
    reporter.start()
    reporter.set_status(S.UPLOADING)
    result = FinishResult(trained_model_id=job.job_id, artifacts={"a.safetensors": "x/a"},
                          metrics={"finalLoss": 0.1}, timings={"totalSeconds": 1.0},
                          base_model_id="m", trigger="ohwx person", step=10, total_steps=10)
    assert reporter.finish_success(result) == 2
    doc = job.job(db)
    assert doc[F.STATUS] == S.COMPLETED and doc[F.MODEL_VERSION] == 2
    assert doc[F.ARTIFACTS] == {"a.safetensors": "x/a"}  # dots in map keys survive
    actor = job.actor(db)
    assert actor is not None and actor[F.MODEL_STATUS] == schema.ModelStatus.READY
    assert [v[schema.ModelVersionField.JOB_ID] for v in actor[F.MODEL_VERSIONS]] == [
        "old-job", job.job_id]
    with pytest.raises(AlreadyCompleted):
        reporter.finish_success(result)
    assert len(job.actor(db)[F.MODEL_VERSIONS]) == 2  # type: ignore[index]

    # Re-queued and re-dispatched by the reconciler (stale heartbeat) while this attempt
    # was uploading: its finished model still wins.
    requeued = seed_job(db, bucket, tmp_path, images=1)
    late = JobReporter(db, requeued.job_id, 1)
    late.start()
    db.collection(schema.TRAINING_JOBS).document(requeued.job_id).update(
        {F.STATUS: S.DISPATCHED, F.ATTEMPT: 2})
    assert late.finish_success(result) == 1
    assert requeued.job(db)[F.STATUS] == S.COMPLETED

    # Cancelled meanwhile: the attempt may not complete it.
    cancelled = seed_job(db, bucket, tmp_path, images=1)
    gone = JobReporter(db, cancelled.job_id, 1)
    gone.start()
    db.collection(schema.TRAINING_JOBS).document(cancelled.job_id).update(
        {F.STATUS: S.CANCELLED})
    with pytest.raises(Superseded):
        gone.finish_success(result)
    assert cancelled.job(db)[F.STATUS] == S.CANCELLED


def test_failure_keeps_actor_of_a_newer_job_untouched(emulators: Any, db: Any, bucket: Any,
                                                      tmp_path: Path) -> None:
    job = seed_job(db, bucket, tmp_path, images=1)
    reporter = JobReporter(db, job.job_id, 1)
    reporter.start()
    db.collection(schema.ACTORS).document(job.actor_id).update(
        {F.LATEST_JOB_ID: "newer-job", F.MODEL_STATUS: schema.ModelStatus.QUEUED})
    assert reporter.finish_failure("the photo 'x.jpg' cannot be used")
    assert job.job(db)[F.ERROR] == "the photo 'x.jpg' cannot be used"
    assert job.actor(db)[F.MODEL_STATUS] == schema.ModelStatus.QUEUED  # type: ignore[index]


def test_finish_failure_never_raises(emulators: Any, db: Any, bucket: Any,
                                     tmp_path: Path) -> None:
    # A document the handler cannot process (an actor id that is a path) must
    # not turn the error handler into a second crash.
    job = seed_job(db, bucket, tmp_path, images=1, **{F.ACTOR_ID: "bad/id"})
    reporter = JobReporter(db, job.job_id, 1)
    assert reporter.finish_failure("boom") is False
    assert reporter.finish_cancelled() is False
    assert job.job(db)[F.STATUS] == S.DISPATCHED


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"unet.lora_A": torch.full((2, 2), value)}


def test_checkpoints_marker_prune_and_damage(emulators: Any, bucket: Any,
                                             tmp_path: Path) -> None:
    prefix = schema.checkpoint_prefix("ckpt-job", 1)
    store = CheckpointStore(bucket, prefix, tmp_path, keep=1)
    assert store.latest(torch.device("cpu")) is None
    meta = {"fingerprint": {"rank": 4}}
    for step in (10, 20):
        store.save(step, _weights(step), {"step": step, "generator": torch.zeros(3)}, meta)
    names = sorted(b.name[len(prefix):] for b in bucket.list_blobs(prefix=prefix))
    assert names == [step_dir(20) + n for n in sorted(("COMPLETE", STATE_FILE,
                                                      "lora_weights.safetensors"))]
    # A save cut off before its marker is ignored.
    bucket.blob(prefix + step_dir(30) + STATE_FILE).upload_from_string(b"partial")
    restored = store.latest(torch.device("cpu"), {"rank": 4})
    assert restored is not None and restored.step == 20
    assert float(restored.weights["unet.lora_A"][0, 0]) == 20.0
    assert restored.state["step"] == 20
    # Other settings: not resumed.
    assert store.latest(torch.device("cpu"), {"rank": 8}) is None

    # Damage the newest: the older one is used instead.
    keep_two = CheckpointStore(bucket, prefix, tmp_path, keep=2)
    keep_two.save(40, _weights(40.0), {"step": 40}, meta)
    bucket.blob(prefix + step_dir(40) + STATE_FILE).upload_from_string(b"bit rot")
    restored = keep_two.latest(torch.device("cpu"), {"rank": 4})
    assert restored is not None and restored.step == 20
    assert bucket.blob(prefix + step_dir(40) + MARKER).exists()
    keep_two.delete_all()
    assert not list(bucket.list_blobs(prefix=prefix))


def test_hub_token_only_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.delenv(hub.ENV_TOKEN, raising=False)
    monkeypatch.delenv(hub.ENV_TOKEN_SECRET, raising=False)
    assert hub.hub_token() is None
    assert hub.maybe_push(tmp_path, "job") == (None, None)
    monkeypatch.setenv(hub.ENV_TOKEN, " hf_secret ")
    assert hub.hub_token() == "hf_secret"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo, error = hub.maybe_push(tmp_path, "job")
    assert repo is None and "HF_HUB_OFFLINE" in (error or "")
    assert "hf_secret" not in (error or "")
    assert os.environ[hub.ENV_TOKEN]  # the token is read, never written anywhere


def test_retryable_errors_leave_the_job_to_the_reconciler(emulators: Any, db: Any, bucket: Any,
                                                          tmp_path: Path) -> None:
    job = seed_job(db, bucket, tmp_path, images=1)
    reporter = JobReporter(db, job.job_id, 1)
    reporter.start()
    message = "internal trainer error: ConnectionError: connection reset"
    assert reporter.record_attempt_error(message)
    doc = job.job(db)
    assert doc[F.STATUS] == S.PREPARING and doc[F.ERROR] == message
    # Once the job is final, nothing is written (and nothing raises).
    db.collection(schema.TRAINING_JOBS).document(job.job_id).update({F.STATUS: S.CANCELLED})
    assert not reporter.record_attempt_error("late")
    assert job.job(db)[F.ERROR] == message


def test_only_problems_a_retry_cannot_fix_are_permanent() -> None:
    assert is_permanent(DataError("the photo 'x.jpg' cannot be used"))
    assert is_permanent(OSError(28, "No space left on device"))
    assert not is_permanent(ConnectionError("reset by peer"))
    assert not is_permanent(RuntimeError("CUDA error: an illegal memory access"))


def test_cancel_keeps_an_actor_with_model_versions_ready(emulators: Any, db: Any, bucket: Any,
                                                         tmp_path: Path) -> None:
    """The trainer and the functions agree on "has a model": modelId or modelVersions."""
    job = seed_job(db, bucket, tmp_path, images=1)
    versions = [{schema.ModelVersionField.VERSION: 1, schema.ModelVersionField.MODEL_ID: "old"}]
    db.collection(schema.ACTORS).document(job.actor_id).update({F.MODEL_VERSIONS: versions})
    actor = job.actor(db)
    assert actor is not None and schema.actor_has_model(actor)
    reporter = JobReporter(db, job.job_id, 1)
    reporter.start()
    assert reporter.finish_cancelled()
    assert job.job(db)[F.STATUS] == S.CANCELLED
    assert job.actor(db)[F.MODEL_STATUS] == schema.ModelStatus.READY  # type: ignore[index]
