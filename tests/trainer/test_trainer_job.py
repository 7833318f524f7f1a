"""Whole training jobs against the Firestore and Storage emulators.

The happy path and the kill/restart run the real entry point
(``python -m lora_trainer``) as a subprocess, as the container and the
LocalExecutor do; the failure paths call the same ``run_job`` in-process to
save the start-up time.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from actorgen import schema
from lora_trainer.checkpoints import MARKER
from lora_trainer.run import EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, RunOptions, run_job
from lora_trainer.timing import Phase

from tests.trainer.seed import REPO_ROOT, TOY_ARGS, TOY_SETTINGS, SeededJob, seed_job, trainer_env

F = schema.Field
S = schema.JobStatus
A = schema.ArtifactName
MV = schema.ModelVersionField


def _command(job: SeededJob, emulators: Any, work: Path, *extra: str,
             attempt: int = 1) -> list[str]:
    return [sys.executable, "-m", "lora_trainer", *schema.trainer_args(job.job_id, attempt),
            "--project", emulators.project, "--bucket", emulators.bucket,
            "--work-dir", str(work), *TOY_ARGS, *extra]


def _run_cli(job: SeededJob, emulators: Any, work: Path, *extra: str,
             timeout: float = 240, attempt: int = 1,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_command(job, emulators, work, *extra, attempt=attempt),
                          env=trainer_env({**emulators.env, **(env or {})}), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _run_in_process(job: SeededJob, emulators: Any, work: Path, steps: int = 3,
                    **settings: Any) -> int:
    options = RunOptions(job_id=job.job_id, attempt=1, project=emulators.project,
                         bucket=emulators.bucket, work_dir=work, max_steps_override=steps,
                         device="cpu", push_to_hub=False, progress_bar=False,
                         settings={**TOY_SETTINGS, **settings})
    return run_job(options)


def _load_lora_effect(bucket: Any, base: Path, path: str, tmp: Path) -> float:
    """Download a LoRA file, load it into a fresh pipeline, return its effect on the UNet."""
    from diffusers import DiffusionPipeline

    local = tmp / Path(path).name
    bucket.blob(path).download_to_filename(str(local))
    pipe = DiffusionPipeline.from_pretrained(base)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pipe.unet(x, 500, encoder_hidden_states=hidden).sample
        pipe.load_lora_weights(str(tmp), weight_name=local.name)
        after = pipe.unet(x, 500, encoder_hidden_states=hidden).sample
    return float((after - before).abs().mean())


def _assert_failed(db: Any, job: SeededJob, *needles: str, actor: bool = True) -> str:
    doc = job.job(db)
    assert doc[F.STATUS] == S.FAILED, doc.get(F.ERROR)
    error = doc[F.ERROR]
    for needle in needles:
        assert needle in error, error
    if actor:
        actor_doc = job.actor(db)
        assert actor_doc is not None
        assert actor_doc[F.MODEL_STATUS] == schema.ModelStatus.FAILED
        assert actor_doc[F.MODEL_ERROR] == error
    return error


def test_whole_job_from_documents_to_published_lora(emulators: Any, db: Any, bucket: Any,
                                                    tiny_sd: Path, tmp_path: Path) -> None:
    job = seed_job(db, bucket, tiny_sd, images=4)
    result = _run_cli(job, emulators, tmp_path / "work", "--max-steps-override", "12",
                      "--checkpoint-every", "5",
                      env={schema.ENV_GPU_PRICE_PER_HOUR: "3.6"})
    assert result.returncode == 0, result.stderr[-3000:]

    doc = job.job(db)
    assert doc[F.STATUS] == S.COMPLETED and doc[F.PROGRESS] == 100
    assert doc[F.STEP] == doc[F.TOTAL_STEPS] == 12
    assert doc[F.ERROR] is None and doc[F.HEARTBEAT_AT] and doc[F.FINISHED_AT]
    assert doc[F.TRAINED_MODEL_ID] == job.job_id and doc[F.MODEL_VERSION] == 1
    # The trainer's changes are on the job's timeline, each with its time.
    trained = [e["status"] for e in doc[F.STATUS_HISTORY]]
    assert trained[-4:] == [S.PREPARING, S.TRAINING, S.UPLOADING, S.COMPLETED]
    assert all(e["at"] is not None for e in doc[F.STATUS_HISTORY])
    prefix = schema.model_prefix(job.uid, job.actor_id, job.job_id)
    artifacts = doc[F.ARTIFACTS]
    for name in (A.LORA_DIFFUSERS, A.LORA_KOHYA, A.MODEL_CARD, A.TRAINING_CONFIG,
                 A.SAMPLES_DIR + "sample-00.png", A.SAMPLES_DIR + "sample-01.png"):
        assert artifacts[name] == prefix + name
        assert bucket.blob(prefix + name).exists(), name
    metrics = doc[F.METRICS]
    assert metrics["images"] == 4 and metrics["steps"] == 12 and metrics["resumedFromStep"] == 0
    assert metrics["finalLoss"] > 0 and metrics["evalLossStart"] > 0
    # Every seeded photo has a face: the loss is face-weighted on all of them.
    assert metrics["faceLossWeight"] == 2.0 and metrics["faceWeightedPhotos"] == 4
    # The speed paths a job ran with (docs/trainer.md, "Faster steps on the GPU").
    assert metrics["fusedAttention"] > 0 and metrics["compile"] == "off"
    assert metrics["compiledRegions"] == 0 and metrics["cudaGraphs"] is False
    assert "peakGpuMemoryGiB" not in metrics  # CPU: no allocator to read
    timings = doc[F.TIMINGS]
    assert set(Phase.ORDER) - {Phase.CLASS_IMAGES, Phase.COMPILE} <= set(timings), timings
    phases = sum(v for k, v in timings.items() if k != Phase.TOTAL)
    assert phases <= timings[Phase.TOTAL] + 0.01  # phases never overlap
    # Worker seconds from the process start to the last write, priced at 3.6 USD/hour.
    assert doc[F.GPU_SECONDS] >= timings[Phase.TOTAL] - 0.05  # (each write rounds to ms)
    assert doc[F.ESTIMATED_COST_USD] == pytest.approx(doc[F.GPU_SECONDS] / 1000, rel=1e-3)
    assert "where the time went" in result.stderr
    # Identity score at steps 10, 11, 12 against the 4 photos (their embeddings computed
    # here: the seeded records have none). Random weights draw no face: the last step
    # is published, and the metrics and the model card say so.
    ident = metrics["identity"]
    assert [c["step"] for c in ident["checkpoints"]] == [10, 11, 12]
    assert all(c["faces"] == 0 and c["samples"] == 2 for c in ident["checkpoints"])
    assert ident["referencePhotos"] == 4 and ident["choice"] == "last-no-faces"
    assert ident["publishedStep"] == metrics["publishedStep"] == 12 and ident["score"] is None
    card = bucket.blob(prefix + A.MODEL_CARD).download_as_text()
    assert "## Identity" in card and "no identity sample had a face" in card
    assert "face weighted 2 times" in card

    actor = job.actor(db)
    assert actor is not None
    assert actor[F.MODEL_STATUS] == schema.ModelStatus.READY
    assert actor[F.MODEL_ID] == job.job_id and actor.get(F.MODEL_ERROR) is None
    [version] = actor[F.MODEL_VERSIONS]
    assert version[MV.VERSION] == 1 and version[MV.JOB_ID] == job.job_id
    assert version[MV.TRIGGER] == "ohwx person" and version[MV.ARTIFACTS] == artifacts

    # Checkpoints are service-only scratch: gone once the model is published.
    ckpt = schema.checkpoint_prefix(job.job_id, 1)
    assert not list(bucket.list_blobs(prefix=ckpt))
    card = bucket.blob(prefix + A.MODEL_CARD).download_as_text()
    assert "ohwx person" in card and str(tiny_sd) in card
    assert _load_lora_effect(bucket, tiny_sd, artifacts[A.LORA_DIFFUSERS], tmp_path) > 1e-4
    assert "training:" in result.stderr or "checkpoint saved" in result.stderr

    # A restart after the final write changes nothing.
    again = _run_in_process(job, emulators, tmp_path / "again")
    assert again == EXIT_OK
    assert len(job.actor(db)[F.MODEL_VERSIONS]) == 1  # type: ignore[index]
    assert job.job(db)[F.STATUS] == S.COMPLETED


def _wait_until_unlocked(db: Any, job: SeededJob, timeout: float = 120) -> None:
    """Wait out the locks of a transaction the SIGKILL cut short.

    Every trainer write is a transaction; a worker killed inside one leaves its locks
    until the transaction expires (about 60 s, in the emulator as in Firestore), and
    every other write to those documents is refused meanwhile.
    """
    from google.api_core import exceptions as gexc
    from google.cloud import firestore

    # A write that changes nothing (deleting a field no document has) needs the lock.
    probe = {"lockProbe": firestore.DELETE_FIELD}
    refs = [db.collection(schema.TRAINING_JOBS).document(job.job_id),
            db.collection(schema.ACTORS).document(job.actor_id)]
    deadline = time.monotonic() + timeout
    for ref in refs:
        while True:
            try:
                ref.update(probe)
                break
            except (gexc.Aborted, gexc.Conflict):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)


@pytest.mark.parametrize("next_attempt", [False, True], ids=["same-attempt", "next-attempt"])
def test_killed_run_resumes_to_the_same_step_count(emulators: Any, db: Any, bucket: Any,
                                                   tiny_sd: Path, tmp_path: Path,
                                                   next_attempt: bool) -> None:
    total = 300
    job = seed_job(db, bucket, tiny_sd, images=3)
    ckpt_prefix = schema.checkpoint_prefix(job.job_id, 1)
    args = ("--max-steps-override", str(total), "--checkpoint-every", "20")
    proc = subprocess.Popen(_command(job, emulators, tmp_path / "w1", *args),
                            env=trainer_env(emulators.env), cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            names = [b.name for b in bucket.list_blobs(prefix=ckpt_prefix)]
            if any(n.endswith("/" + MARKER) for n in names):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before a checkpoint was seen"
        proc.send_signal(signal.SIGKILL)  # no handler, no cleanup: as a lost VM
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    _wait_until_unlocked(db, job)
    killed_at = job.job(db)
    assert killed_at[F.STATUS] in (S.PREPARING, S.TRAINING)
    assert proc.returncode == -signal.SIGKILL

    if next_attempt:
        # The reconciler gave up on attempt 1 (say its SPOT VM was taken away and not
        # restarted) and dispatched attempt 2: it continues from attempt 1's checkpoint.
        db.collection(schema.TRAINING_JOBS).document(job.job_id).update(
            {F.STATUS: S.DISPATCHED, F.ATTEMPT: 2})
    result = _run_cli(job, emulators, tmp_path / "w2", *args, attempt=2 if next_attempt else 1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from the checkpoint at step" in result.stderr
    assert ("continuing from attempt 1's checkpoint" in result.stderr) == next_attempt
    # Published: no checkpoint of any attempt is left behind.
    for attempt in (1, 2):
        assert not list(bucket.list_blobs(prefix=schema.checkpoint_prefix(job.job_id, attempt)))
    doc = job.job(db)
    assert doc[F.STATUS] == S.COMPLETED
    assert doc[F.STEP] == doc[F.TOTAL_STEPS] == total
    resumed = doc[F.METRICS]["resumedFromStep"]
    assert 20 <= resumed < total and resumed % 20 == 0
    assert _load_lora_effect(bucket, tiny_sd, doc[F.ARTIFACTS][A.LORA_DIFFUSERS], tmp_path) > 0


def test_corrupt_photo_fails_with_its_name(emulators: Any, db: Any, bucket: Any,
                                           tiny_sd: Path, tmp_path: Path) -> None:
    job = seed_job(db, bucket, tiny_sd, images=3, corrupt_index=1)
    assert _run_in_process(job, emulators, tmp_path) == EXIT_FAILED
    _assert_failed(db, job, "photo-1.jpg", "cannot be used")


def test_missing_actor_fails_the_job(emulators: Any, db: Any, bucket: Any, tiny_sd: Path,
                                     tmp_path: Path) -> None:
    job = seed_job(db, bucket, tiny_sd, with_actor=False)
    assert _run_in_process(job, emulators, tmp_path) == EXIT_FAILED
    _assert_failed(db, job, job.actor_id, "does not exist", actor=False)
    assert job.actor(db) is None  # nothing is created for a missing actor


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument:UserWarning")
def test_base_model_that_fails_to_load(emulators: Any, db: Any, bucket: Any, tiny_sd: Path,
                                       tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_sd, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a download cut short
    job = seed_job(db, bucket, broken)
    assert _run_in_process(job, emulators, tmp_path / "w") == EXIT_FAILED
    _assert_failed(db, job, "could not load the base model", str(broken))

    missing = seed_job(db, bucket, "no-such-org/no-such-model")
    assert _run_in_process(missing, emulators, tmp_path / "w2") == EXIT_FAILED
    _assert_failed(db, missing, "could not read the base model", "no-such-org/no-such-model")


def test_too_little_disk_is_refused_up_front(emulators: Any, db: Any, bucket: Any,
                                             tiny_sd: Path, tmp_path: Path) -> None:
    job = seed_job(db, bucket, tiny_sd)
    code = _run_in_process(job, emulators, tmp_path, min_free_disk_bytes=1 << 60)
    assert code == EXIT_FAILED
    _assert_failed(db, job, "not enough disk space", "larger disk")


def _tmpfs_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _tmpfs_works(), reason="needs unprivileged user+mount namespaces")
def test_disk_filling_up_mid_run_fails_with_a_clear_error(emulators: Any, db: Any, bucket: Any,
                                                          tiny_sd: Path, tmp_path: Path) -> None:
    """A real ENOSPC: the work dir is a 96 KiB tmpfs, too small for the photos."""
    job = seed_job(db, bucket, tiny_sd, images=4)
    work = tmp_path / "tiny-disk"
    work.mkdir()
    command = _command(job, emulators, work, "--max-steps-override", "3",
                       "--min-free-disk-mb", "0")
    # A private mount namespace: the tmpfs exists for the trainer process only.
    shell = f'mount -t tmpfs -o size=96k tmpfs "{work}" && exec "$@"'
    result = subprocess.run(["unshare", "-rm", "sh", "-c", shell, "sh", *command],
                            env=trainer_env(emulators.env), cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == EXIT_FAILED, result.stderr[-3000:]
    error = _assert_failed(db, job, "the trainer ran out of disk space")
    print(error)


def test_cancel_request_stops_training(emulators: Any, db: Any, bucket: Any, tiny_sd: Path,
                                       tmp_path: Path) -> None:
    job = seed_job(db, bucket, tiny_sd, images=2)
    ref = db.collection(schema.TRAINING_JOBS).document(job.job_id)

    def cancel_once_training() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            doc = ref.get().to_dict()
            if doc.get(F.STATUS) == S.TRAINING and (doc.get(F.STEP) or 0) > 0:
                ref.update({F.CANCEL_REQUESTED: True})
                return
            time.sleep(0.1)

    canceller = threading.Thread(target=cancel_once_training, daemon=True)
    canceller.start()
    code = _run_in_process(job, emulators, tmp_path, steps=2000, report_every_seconds=0.2)
    canceller.join(timeout=5)
    assert code == EXIT_OK
    doc = job.job(db)
    assert doc[F.STATUS] == S.CANCELLED and doc[F.STEP] < 2000
    assert job.actor(db)[F.MODEL_STATUS] == schema.ModelStatus.NONE  # type: ignore[index]


def test_another_attempt_owns_the_job(emulators: Any, db: Any, bucket: Any, tiny_sd: Path,
                                      tmp_path: Path) -> None:
    job = seed_job(db, bucket, tiny_sd, attempt=2)  # this trainer runs attempt 1
    assert _run_in_process(job, emulators, tmp_path) == EXIT_OK
    doc = job.job(db)
    assert doc[F.STATUS] == S.DISPATCHED and F.ERROR not in doc
    queued = seed_job(db, bucket, tiny_sd, status=S.QUEUED)  # re-queued by the reconciler
    assert _run_in_process(queued, emulators, tmp_path) == EXIT_OK
    assert queued.job(db)[F.STATUS] == S.QUEUED


@pytest.mark.parametrize("bad", ["--compiel", "--sample-steps 'eight", "--sample-steps eight"])
def test_bad_deployment_trainer_options_fail_the_job_once(
        emulators: Any, db: Any, bucket: Any, tiny_sd: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    from lora_trainer.__main__ import main

    job = seed_job(db, bucket, tiny_sd, images=1)
    monkeypatch.setenv(schema.ENV_TRAINER_ARGS, bad)
    code = main([*schema.trainer_args(job.job_id, 1), "--project", emulators.project,
                 "--bucket", emulators.bucket, "--work-dir", str(tmp_path)])
    assert code == EXIT_FAILED
    _assert_failed(db, job, "TRAINER_ARGS", "invalid")


def test_a_restart_after_the_completion_commit_removes_the_checkpoints(
        emulators: Any, db: Any, bucket: Any, tiny_sd: Path, tmp_path: Path) -> None:
    """Killed between the completion commit and the clean-up: the restart cleans up."""
    job = seed_job(db, bucket, tiny_sd, images=1, status=S.COMPLETED, attempt=2)
    left = [schema.checkpoint_prefix(job.job_id, attempt) + f"step-000010/{name}"
            for attempt in (1, 2) for name in ("lora.safetensors", MARKER)]
    for name in left:
        bucket.blob(name).upload_from_string(b"x")
    options = RunOptions(job_id=job.job_id, attempt=2, project=emulators.project,
                         bucket=emulators.bucket, work_dir=tmp_path / "work", device="cpu",
                         push_to_hub=False, progress_bar=False, settings=dict(TOY_SETTINGS))
    assert run_job(options) == EXIT_OK
    assert job.job(db)[F.STATUS] == S.COMPLETED
    assert [b.name for b in bucket.list_blobs(prefix=f"jobs/{job.job_id}/")] == []


#: Seconds a probed phase lingers (as a long download or generation would) and the
#: generous bound on stopping after SIGTERM: a worker that ignores the signal until
#: the phase ends (or until SIGKILL, 30 s later on Vertex) overruns it by far.
PHASE_LINGER_SECONDS = 600
STOP_BOUND_SECONDS = 60


@pytest.mark.parametrize("target", [
    "lora_trainer.models:load_base_model",
    "lora_trainer.encode:generate_class_latents",
    "lora_trainer.export:render_samples",
], ids=["model-loading", "class-images", "export"])
def test_sigterm_in_every_phase_stops_the_worker_for_a_restart(
        emulators: Any, db: Any, bucket: Any, tiny_sd: Path, tmp_path: Path,
        target: str) -> None:
    from tests.trainer.phase_probe import MARKER

    job = seed_job(db, bucket, tiny_sd, images=1, **{F.PRIOR_PRESERVATION: True})
    command = [sys.executable, "-m", "tests.trainer.phase_probe", target,
               str(PHASE_LINGER_SECONDS), *_command(job, emulators, tmp_path / "w")[3:],
               "--max-steps-override", "2", "--num-class-images", "2"]
    proc = subprocess.Popen(command, env=trainer_env(emulators.env), cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    entered = threading.Event()

    def read() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith(MARKER):
                entered.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert entered.wait(240), "the phase was never reached:\n" + "".join(lines[-30:])
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=STOP_BOUND_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_BOUND_SECONDS} s after SIGTERM in {target}: "
                        "it would have run until SIGKILL")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    reader.join(timeout=10)
    assert code == EXIT_PREEMPTED, "".join(lines[-30:])
    doc = job.job(db)
    # Left for the restarted worker: neither failed nor given an error.
    assert doc[F.STATUS] in (S.PREPARING, S.UPLOADING) and not doc.get(F.ERROR)
