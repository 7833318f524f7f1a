"""One training job from start to finish: preparing -> training -> uploading -> completed.

Every way out is mapped: success writes ``completed`` (job) and ``ready``
(actor) in one transaction; a user-fixable problem or a crash writes
``failed`` with a readable error on both; a cancel request writes
``cancelled``; SIGTERM (preemption) checkpoints and leaves the status for
the restarted worker; a job owned by another attempt is left alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actorgen import logs, schema

from .errors import (
    AlreadyCompleted,
    Cancelled,
    DataError,
    DiskFullError,
    ModelLoadError,
    Preempted,
    Superseded,
    TrainerError,
    TransientError,
    describe,
    is_permanent,
)
from .timing import Phase, PhaseTimer, WorkerMeter, format_table, price_per_hour, \
    process_start_monotonic

log = logging.getLogger(__name__)
F = schema.Field
S = schema.JobStatus

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_PREEMPTED = 143  # 128 + SIGTERM: the executor restarts the worker


@dataclass
class RunOptions:
    job_id: str
    attempt: int
    project: str | None = None
    bucket: str | None = None
    work_dir: Path = Path("/tmp/actorgen-trainer")
    settings: dict[str, Any] = field(default_factory=dict)  # TrainConfig trainer settings
    max_steps_override: int | None = None
    device: str | None = None  # None: cuda if available
    #: Opt-in (``--push-to-hub``): the LoRA is of a user's face; a configured token is
    #: for gated base models and must not publish anything by itself.
    push_to_hub: bool = False
    progress_bar: bool = True
    keep_work_dir: bool = False


def check_disk_space(path: Path, needed_bytes: int) -> None:
    """Fail early, with a clear message, when ``path``'s disk has too little room."""
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise DiskFullError(
            f"not enough disk space for training: {free / 1e9:.2f} GB free in {path}, "
            f"at least {needed_bytes / 1e9:.2f} GB needed; give the training machine a "
            "larger disk, then retry the job"
        )


def _hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def record_startup_failure(job_id: str, attempt: int, project: str | None,
                           message: str) -> int:
    """End the job ``failed`` with ``message`` before any training started. Never raises."""
    try:
        from actorgen import clients

        from .reporting import JobReporter

        if project:
            os.environ[schema.ENV_PROJECT] = project
        log.error("cannot start: %s", message)
        JobReporter(clients.firestore_client(), job_id, attempt).finish_failure(message)
    except Exception as err:  # noqa: BLE001 - the error path must not fail
        log.error("could not record the failure on the job: %s", err)
    return EXIT_FAILED


def run_job(options: RunOptions) -> int:
    """Run one attempt of one job; returns the process exit code."""
    started = process_start_monotonic()
    timer = PhaseTimer(started)
    timer.mark_since_start(Phase.STARTUP)
    meter = WorkerMeter(started, price_per_hour=price_per_hour())
    with timer.phase(Phase.IMPORTS):
        from actorgen import clients

        from .reporting import JobNotFound, JobReporter
        from .training import StopFlag

    if options.project:
        os.environ[schema.ENV_PROJECT] = options.project
    if options.bucket:
        os.environ[schema.ENV_BUCKET] = options.bucket
    # Process-wide, not a context: the reporter's heartbeat thread logs too.
    logs.set_defaults(job_id=options.job_id, attempt=options.attempt, user_id=None)
    stop = StopFlag()
    stop.install()
    reporter: JobReporter | None = None
    bucket: Any = None
    try:
        db = clients.firestore_client()
        bucket = clients.storage_bucket(options.bucket or clients.default_bucket_name())
        interval = float(options.settings.get("report_every_seconds") or 5.0)
        reporter = JobReporter(db, options.job_id, options.attempt, min_interval=interval,
                               meter=meter)
        with stop.interrupting():
            return _run(options, reporter, bucket, stop, timer)
    except AlreadyCompleted:
        log.info("job %s is already completed; nothing to do", options.job_id)
        # A worker killed between the completion commit and its clean-up restarts here.
        if bucket is not None:
            delete_checkpoints(bucket, options)
        return EXIT_OK
    except Superseded as why:
        log.warning("stopping without writing: %s", why)
        return EXIT_OK
    except Cancelled:
        log.info("job %s was cancelled; stopping", options.job_id)
        if reporter is not None:
            reporter.finish_cancelled()
        return EXIT_OK
    except Preempted as why:
        log.warning("%s; the restarted worker resumes from the last checkpoint", why)
        return EXIT_PREEMPTED
    except JobNotFound as err:
        log.error("%s", err)
        return EXIT_FAILED
    except BaseException as err:  # noqa: BLE001 - every failure must reach the job
        message = describe(err)
        if isinstance(err, TrainerError):  # already a readable message: no traceback
            log.error("training failed: %s", message)
        else:
            log.exception("training failed: %s", message)
        if reporter is not None:
            if is_permanent(err):  # a retry would fail the same way: end the job now
                reporter.finish_failure(message)
            else:  # the reconciler retries the attempt, keeping this message
                reporter.record_attempt_error(message)
        if isinstance(err, KeyboardInterrupt):
            raise
        return EXIT_FAILED
    finally:
        stop.restore()


def _run(options: RunOptions, reporter: Any, bucket: Any, stop: Any,
         timer: PhaseTimer | None = None) -> int:
    timer = timer or PhaseTimer()
    with timer.phase(Phase.IMPORTS):
        import torch

        from . import base_model_cache, data, export, hub, identity, models
        from .caches import ClassImageCache, CompileCache
        from .checkpoints import CheckpointStore
        from .config import TrainConfig, estimate_training_seconds
        from .reporting import FinishResult
        from .training import build_trainer

        models.import_libraries()

    with timer.phase(Phase.JOB_START):
        job, actor = reporter.start()
        config = TrainConfig.from_job(options.job_id, options.attempt, job, **options.settings)
        if options.max_steps_override:
            config = dataclasses.replace(config, max_train_steps=options.max_steps_override)
        logs.set_defaults(user_id=config.user_id)
        if actor is None:
            raise DataError(f"the actor {config.actor_id!r} of this job does not exist")
        work = options.work_dir / options.job_id / f"attempt-{options.attempt}"
        check_disk_space(work, config.min_free_disk_bytes)
        if not Path(config.base_model_id).is_dir():  # a hub id: it is downloaded to the cache
            check_disk_space(_hf_cache_dir(), config.min_free_disk_bytes)
        device = torch.device(options.device) if options.device else models.default_device()

    beat = max(30.0, 4 * config.report_every_seconds)
    with reporter.keepalive(S.PREPARING, beat):
        with timer.phase(Phase.MODEL):
            # One token for the base model (gated models) and the hub push; never logged.
            token, token_problem = _resolve_hub_token()
            # A local folder, the local cache or the bucket's snapshot before the Hub.
            snapshots = base_model_cache.SnapshotStore(bucket)
            source = base_model_cache.resolve_base_model(
                config.base_model_id, snapshots, options.work_dir / "base-models")
            local_files = None if source.origin == base_model_cache.HUB else source.path
            with _token_note(token_problem):
                info = models.inspect_base_model(config.base_model_id, token=token,
                                                 source=local_files)
        resolution = config.resolution or info.native_resolution
        # Photos first: a corrupt photo fails in seconds, not after a model download.
        with timer.phase(Phase.PHOTOS):
            refs = data.accepted_images(actor)
            files = data.download_images(bucket, refs, work / "images")
            photos = data.load_training_photos(files, refs, resolution, config.face_margin)
        with timer.phase(Phase.MODEL), _token_note(token_problem):
            model = models.load_base_model(config, device, token=token, source=local_files)
            source, snapshot_saver = base_model_cache.save_in_background(
                source, snapshots, config.base_model_id)
        log.info("base model %s from %s (revision %s)", config.base_model_id, source.origin,
                 source.revision)
        compile_cache = None
        if config.compiles:  # before anything runs the compiled UNet
            with timer.phase(Phase.COMPILE):
                compile_cache = CompileCache(bucket, _compile_shapes(model, config, resolution),
                                             device)
                compile_cache.load()
        class_cache = None
        if config.prior_preservation and source.revision:
            class_cache = ClassImageCache(bucket, config.base_model_id, source.revision)
        with timer.phase(Phase.SETUP):  # encoding and class images are timed inside
            prepared = build_trainer(model, config,
                                     data.images_to_tensor([p.image for p in photos]),
                                     face_boxes=[p.face for p in photos], timer=timer,
                                     class_latents_source=class_cache)
        with timer.phase(Phase.IDENTITY):  # the photos' face embeddings, when not stored
            tracker = identity.make_tracker(model, config, prepared.resolution, actor, refs,
                                            files)
    trainer = prepared.trainer
    store = CheckpointStore(
        bucket,
        schema.checkpoint_prefix(options.job_id, options.attempt),
        work / "checkpoints",
        keep=config.keep_checkpoints,
    )
    fingerprint = {
        **config.training_fingerprint(),
        # The judged generation too: a replaced photo must not resume an old run.
        "images": [r.path if r.generation is None else f"{r.path}#{r.generation}"
                   for r in refs],
    }
    meta: dict[str, Any] = {"fingerprint": fingerprint}
    resumed_from = 0
    with timer.phase(Phase.SETUP):
        restored = store.latest(device, fingerprint) or _latest_of_earlier_attempts(
            bucket, options, work, device, fingerprint
        )
        if restored is not None:
            trainer.load_trainable_state(restored.weights)
            trainer.load_training_state(restored.state)
            meta.update({k: v for k, v in restored.meta.items() if k != "fingerprint"})
            tracker.load_state_dict(restored.state.get(identity.STATE_KEY))
            resumed_from = trainer.step
            log.info("resuming from the checkpoint at step %d", resumed_from)
        else:
            # With --compile this first forward pass compiles the evaluation graph.
            with timer.phase(Phase.COMPILE if config.compiles else Phase.SETUP):
                meta["evalLossStart"] = trainer.fixed_noise_loss(seed=config.seed)

    total = config.max_train_steps
    eta = 0.0
    if device.type == "cuda":
        peak = _peak_flops(device)
        eta = estimate_training_seconds(
            info.kind, info.native_resolution, config, peak,
            remaining_steps=total - trainer.step,
            gradient_checkpointing=prepared.gradient_checkpointing,
        )
    reporter.set_status(S.TRAINING, **{
        F.STEP: trainer.step, F.TOTAL_STEPS: total, F.ETA_SECONDS: round(eta, 1),
        F.PROGRESS: min(99, 100 * trainer.step // total),
    })

    def save_checkpoint(step: int) -> None:
        with timer.phase(Phase.CHECKPOINTS):
            state = {**trainer.training_state(), identity.STATE_KEY: tracker.state_dict()}
            store.save(step, trainer.trainable_state(), state, meta)

    with timer.phase(Phase.STEPS), stop.deferred():
        loop = trainer.run(
            total,
            report_every_seconds=config.report_every_seconds,
            on_report=reporter.progress,
            checkpoint_every=config.checkpoint_every,
            on_checkpoint=save_checkpoint,
            should_stop=stop,
            progress_bar=options.progress_bar,
            on_step=identity.step_hook(tracker, trainer, timer),
        )
    if config.compiles:
        # torch.compile compiles in the first step: what it took beyond a usual step.
        timer.move(Phase.STEPS, Phase.COMPILE, loop.first_step_overhead_seconds)
    if compile_cache is not None:
        with timer.phase(Phase.COMPILE):
            compile_cache.save()

    reporter.set_status(S.UPLOADING, **{F.STEP: trainer.step, F.TOTAL_STEPS: total,
                                        F.PROGRESS: 99, F.ETA_SECONDS: None})
    with timer.phase(Phase.EXPORT), reporter.keepalive(S.UPLOADING, beat):
        # Publish the step with the best identity score (the last one without scores).
        choice = tracker.choose(trainer.step)
        if choice.step != trainer.step and tracker.best_weights is not None:
            trainer.load_trainable_state(tracker.best_weights)
        log.info("publishing step %d: %s", choice.step, choice.note)
        eval_end = trainer.fixed_noise_loss(seed=config.seed)
        final_loss = loop.final_loss  # a fixed number of final steps, checkpoints included
        metrics: dict[str, Any] = {
            "finalLoss": final_loss,
            "evalLossStart": meta.get("evalLossStart"),
            "evalLossEnd": eval_end,
            "samplesPerSecond": round(loop.samples_per_second, 3),
            "steps": trainer.step,
            "resumedFromStep": resumed_from,
            "images": len(refs),
            "resolution": prepared.resolution,
            "mixedPrecision": prepared.mixed_precision,
            "gradientCheckpointing": prepared.gradient_checkpointing,
            # Speed and memory (docs/trainer.md, "Faster steps"): measured, not estimated.
            "fusedAttention": prepared.fused_attention,
            "compile": config.compile_mode,
            "compiledRegions": prepared.compiled_regions,
            "cudaGraphs": prepared.trainer.cuda_graphs,
            **_memory_metrics(prepared.memory, device),
            "faceLossWeight": config.face_loss_weight,
            "faceWeightedPhotos": prepared.face_weighted_photos,
            "noiseOffset": config.noise_offset,
            "publishedStep": choice.step,
            "identity": tracker.metrics(choice, samples=config.identity_samples,
                                        sample_steps=config.identity_sample_steps),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            # Where the repeated work came from (see docs/trainer.md, "Caches").
            "baseModelSource": source.origin,
            "classImageCache": _hit_or_miss(class_cache.hit if class_cache else None),
            "compileCache": _hit_or_miss(compile_cache.loaded if compile_cache else None),
        }
        out = work / "export"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        export.save_diffusers_lora(model, config, out)
        export.save_kohya_lora(model, config, out)
        with timer.phase(Phase.SAMPLES):
            samples = export.render_samples(model, config, prepared.resolution, out)
        prefix = schema.model_prefix(config.user_id, config.actor_id, options.job_id)
        hub_target = hub.planned_repo(options.job_id, token) if options.push_to_hub else None
        (out / schema.ArtifactName.MODEL_CARD).write_text(
            export.model_card(model, config, metrics, samples,
                              copies=_copies(bucket.name, prefix, options.push_to_hub,
                                             hub_target)),
            encoding="utf-8")
        (out / schema.ArtifactName.TRAINING_CONFIG).write_text(
            export.training_config_json(model, config, metrics, {"jobId": options.job_id,
                                                                 "attempt": options.attempt}),
            encoding="utf-8")
    with timer.phase(Phase.UPLOAD), reporter.keepalive(S.UPLOADING, beat):
        artifacts = export.upload_artifacts(bucket, prefix, out)
        if snapshot_saver is not None:  # the base model's copy for the next worker
            snapshot_saver.join()
        hub_repo, hub_error = hub.maybe_push(
            out, options.job_id, token,
            token_problem=str(token_problem) if token_problem else None,
            repo_id=hub_target,
        ) if options.push_to_hub else (None, None)
        if hub_error:
            metrics["hubError"] = hub_error
    final_write = timer.clock()
    version = finish_with_retry(reporter, FinishResult(
        trained_model_id=options.job_id,
        artifacts=artifacts,
        metrics=metrics,
        timings=timer.total(),
        base_model_id=config.base_model_id,
        trigger=config.trigger,
        step=trainer.step,
        total_steps=total,
        hub_repo=hub_repo,
    ))
    log.info("job %s completed: model version %s, %d files under %s", options.job_id,
             version if version is not None else "(recorded by an earlier try)",
             len(artifacts), prefix)
    delete_checkpoints(bucket, options)
    if not options.keep_work_dir:
        shutil.rmtree(work, ignore_errors=True)
    # The completing write cannot hold its own duration: a small update adds it.
    timer.add(Phase.FINAL_WRITE, timer.clock() - final_write)
    timings = timer.total()
    reporter.record_final_timings({k: timings[k] for k in (Phase.FINAL_WRITE, Phase.TOTAL)})
    log.info("where the time went:\n%s", format_table(timings))
    return EXIT_OK


def _copies(bucket: str, prefix: str, push: bool, hub_repo: str | None) -> list[str]:
    """The model card's list of where this model's files go."""
    where = [f"Cloud Storage: `gs://{bucket}/{prefix}` (readable by the model's owner only)"]
    if hub_repo:
        where.append(f"Hugging Face Hub: the private repository `{hub_repo}` (the job's "
                     "`metrics.hubError` says if the push failed)")
    elif push:
        where.append("Hugging Face Hub: a push was configured but could not be made "
                     "(see the job's `metrics.hubError`)")
    else:
        where.append("Not pushed to the Hugging Face Hub (the deployment's HF_PUSH_MODELS "
                     "is off)")
    return where


def delete_checkpoints(bucket: Any, options: RunOptions) -> None:
    """Remove the checkpoints (service-only) of a published model. Never raises.

    This attempt's and those of earlier attempts it may have continued from; run
    after the completion commit, and again by a restarted worker that finds the
    job completed (killed in between, it would otherwise leave them for good).
    """
    from .checkpoints import CheckpointStore

    try:
        for attempt in range(options.attempt, 0, -1):
            CheckpointStore(bucket, schema.checkpoint_prefix(options.job_id, attempt),
                            options.work_dir / options.job_id / f"checkpoints-{attempt}"
                            ).delete_all()
    except Exception as err:  # noqa: BLE001 - the model is published; this is tidying
        log.warning("could not delete the checkpoints of job %s: %s", options.job_id, err)


def _memory_metrics(plan: Any, device: Any) -> dict[str, Any]:
    """The GPU memory the run took (the allocator's peak) and what its probe measured."""
    import torch

    if device.type != "cuda":
        return {}
    gib = 1024**3
    out: dict[str, Any] = {
        "peakGpuMemoryGiB": round(torch.cuda.max_memory_reserved(device) / gib, 2),
        "gpuMemoryGiB": round(torch.cuda.get_device_properties(device).total_memory / gib, 2),
    }
    if plan is not None:
        out["memoryBudgetGiB"] = round(plan.budget_bytes / gib, 2)
        if plan.step_bytes is not None:
            out["probeStepGiB"] = round(plan.step_bytes / gib, 2)
        if plan.step_bytes_without_checkpointing is not None:
            out["probeStepWithoutCheckpointingGiB"] = round(
                plan.step_bytes_without_checkpointing / gib, 2)
    return out


def _hit_or_miss(hit: bool | None) -> str | None:
    return None if hit is None else ("hit" if hit else "miss")


def _compile_shapes(model: Any, config: Any, resolution: int) -> dict[str, Any]:
    """What torch.compile's output depends on in this run, besides GPU and torch.

    Settings rather than their resolved values ("auto" precision and gradient
    checkpointing resolve the same way on the same GPU type, which is in the key,
    and memory budget).
    """
    import hashlib
    import json

    unet = json.dumps(dict(model.unet.config), sort_keys=True, default=str)
    return {
        "unet": hashlib.sha256(unet.encode()).hexdigest()[:16],
        "resolution": resolution,
        "batch": config.train_batch_size,
        "prior": config.prior_preservation,
        "rank": config.lora_rank,
        "trainTextEncoder": config.train_text_encoder,
        "mixedPrecision": config.mixed_precision,
        "gradientCheckpointing": config.gradient_checkpointing,
        # "auto" checkpointing: on when the measured step does not fit this budget.
        "gpuMemoryGiB": config.gpu_memory_gib,
        # Different programs to compile: fused projections, regions, CUDA graphs.
        "fusedLora": config.fused_lora,
        "compile": config.compile_mode,
        "cudaGraphs": config.cuda_graphs,
    }


def _resolve_hub_token() -> tuple[str | None, Any]:
    """``(token, None)``, ``(None, None)`` when none is configured, or ``(None, problem)``.

    A configured secret that cannot be read does not stop a run by itself: a
    public base model loads without it. It matters only if the base model then
    fails to load (see :func:`_token_note`) and for the hub push.
    """
    from . import hub

    try:
        return hub.hub_token(), None
    except hub.TokenUnavailable as err:
        log.warning("the Hugging Face token could not be read: %s", err)
        return None, err


@contextlib.contextmanager
def _token_note(problem: Any) -> Iterator[None]:
    """Say why a base model may have failed to load when the token could not be read.

    A transient problem (Secret Manager unreachable) makes the failure
    retryable, so the reconciler tries another attempt instead of failing the job.
    """
    try:
        yield
    except ModelLoadError as err:
        if problem is None:
            raise
        message = f"{err}; the Hugging Face token could not be read: {problem}"
        if getattr(problem, "transient", False):
            raise TransientError(message) from None  # another attempt may read it
        raise ModelLoadError(message) from None


#: The final write is retried this often (after the first try) with this backoff:
#: the artifacts are already uploaded, and a retried attempt would train from step 0.
FINISH_RETRIES = 5
FINISH_BACKOFF_SECONDS = (1.0, 16.0)  # first delay, longest delay (doubling)


def is_transient_write_error(err: BaseException) -> bool:
    """A Firestore error that trying again may cure: 5xx, 429, contention, timeouts.

    The client's transaction wrapper reports contention it could not resolve as a
    ValueError caused by ``Aborted``, so the cause chain is looked at too.
    """
    from google.api_core import exceptions as gexc

    kinds = (gexc.ServerError, gexc.TooManyRequests, gexc.Aborted, gexc.RetryError,
             ConnectionError, TimeoutError)
    seen = 0
    current: BaseException | None = err
    while current is not None and seen < 5:
        if isinstance(current, kinds):
            return True
        current, seen = current.__cause__, seen + 1
    return False


def finish_with_retry(reporter: Any, result: Any, *, retries: int | None = None,
                      backoff: tuple[float, float] | None = None,
                      sleep: Callable[[float], None] | None = None) -> int | None:
    """``reporter.finish_success(result)``, retried on transient Firestore errors.

    Returns the model version, or None when an earlier try's commit went through
    although its answer was lost (the retry then finds the job completed).
    Anything else (cancelled or superseded meanwhile, a permanent error) is
    raised at once; the last transient error is raised once the retries are spent.
    """
    retries = FINISH_RETRIES if retries is None else retries
    delay, longest = backoff or FINISH_BACKOFF_SECONDS
    sleep = sleep or time.sleep
    for tried in range(retries + 1):
        try:
            return int(reporter.finish_success(result))
        except AlreadyCompleted:
            if tried == 0:
                raise
            log.info("the job is completed: an earlier try's commit went through")
            return None
        except Exception as err:
            if tried == retries or not is_transient_write_error(err):
                raise
            log.warning("recording the completed job failed (%s: %s); retrying in %.0f s "
                        "(%d/%d)", type(err).__name__, str(err).splitlines()[0][:200]
                        if str(err) else "", delay, tried + 1, retries)
            sleep(delay)
            delay = min(longest, delay * 2)
    raise AssertionError("unreachable")  # pragma: no cover


def _latest_of_earlier_attempts(bucket: Any, options: RunOptions, work: Path, device: Any,
                                fingerprint: dict[str, Any]) -> Any:
    """The newest usable checkpoint of an earlier attempt of this job, if any.

    A retried attempt (a SPOT VM taken away, a lost or stale worker) continues
    where the last one got to instead of paying for its steps again; the
    fingerprint guarantees the same base model, photos and hyper-parameters.
    New checkpoints go to the current attempt's folder.
    """
    from .checkpoints import CheckpointStore

    for earlier in range(options.attempt - 1, 0, -1):
        store = CheckpointStore(bucket, schema.checkpoint_prefix(options.job_id, earlier),
                                work / f"checkpoints-attempt-{earlier}")
        restored = store.latest(device, fingerprint)
        if restored is not None:
            log.info("continuing from attempt %d's checkpoint", earlier)
            return restored
    return None


def _peak_flops(device: Any) -> float:
    import torch

    from .config import peak_flops

    return peak_flops(torch.cuda.get_device_name(device))
