"""Run the whole pipeline locally, the way the app uses it (``bin/demo``).

Starts the Firebase emulators with the functions (Firestore, Storage, Functions,
Cloud Tasks) and the ``local`` executor, then acts as the app: creates a demo
actor, uploads photos of it (five valid ones of one man, from real photos that
ship in a package, plus one without a face, or your own with ``--photos``), waits for each photo's
verdict, creates a training job on a tiny SD 1.x-shaped model (built once into
``.cache/demo-base-model``) and follows the job document with a progress bar until
the real trainer (``python -m lora_trainer``, CPU) has published the LoRA. Prints a
summary and copies the model's files to ``.local/demo-output/<job>/``.

Exit status: 0 when the job completed, 1 when it failed, was rejected or timed out,
130 on Ctrl-C (which stops the trainer and the emulators).

    bin/demo [--steps N] [--photos DIR] [--keep-running] [--env KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mimetypes
import os
import queue
import secrets
import shlex
import shutil
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from tqdm import tqdm

from tools import local_pipeline
from tools.emulators import EmulatorSuite, start_emulators

local_pipeline.add_source_paths()
from actorgen import schema  # noqa: E402  (functions/ is on sys.path only now)
from actorgen.schema import (  # noqa: E402
    AttemptField,
    Field,
    ImageField,
    ImageStatus,
    JobStatus,
    ModelVersionField,
)

REPO_ROOT = local_pipeline.REPO_ROOT
EMULATORS = ("firestore", "storage", "functions", "tasks")
RUNS_DIR = REPO_ROOT / ".local" / "demo" / "runs"  # executor folders + trainer logs, per run
RUNS_KEPT = 5
OUTPUT_DIR = REPO_ROOT / ".local" / "demo-output"

DEMO_USER = "demo-user"
DEMO_ACTOR = "demo-actor"
INSTANCE_NAME = "ohwx"
BATCH_SIZE = 1
LEARNING_RATE = 1e-4
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".bmp", ".tif",
                            ".tiff", ".gif"})

#: A verdict whose trigger failed is retried by the every-minute sweep this long after the
#: upload (the SWEEP_AFTER_SECONDS param), so wait for that and two scheduler ticks.
VERDICT_SLACK_S = 180.0  # plus a few seconds per photo
SCHEDULER_PERIOD_S = 60.0  # Cloud Scheduler runs dispatch_jobs every minute; the emulator doesn't
TRAINER_EXIT_WAIT_S = 30.0  # after its final write, a trainer tidies up before exiting
POLL_EVERY_S = 5.0  # a read now and then, in case the snapshot stream stalls
#: Where the demo stops watching: the final statuses, and `failed` (the attempts are used up;
#: only an admin re-dispatch would move it on).
TERMINAL = schema.FINAL_JOB_STATUSES | {JobStatus.FAILED}


# --------------------------------------------------------------------------- output
class Clock:
    """Wall-clock stamps relative to the demo's start."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def stamp(self) -> str:
        return f"{time.strftime('%H:%M:%S')} +{self.elapsed():6.1f}s"


CLOCK = Clock()


def say(message: str) -> None:
    """One timestamped line (above the progress bar when one is showing)."""
    tqdm.write(f"{CLOCK.stamp()}  {message}", file=sys.stdout)
    sys.stdout.flush()


def heading(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m" if sys.stdout.isatty() else f"\n== {title}")


def rel(path: Path) -> str:
    """``path`` relative to the repository when inside it."""
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0, int(round(seconds)))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def fmt_size(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


class ProgressBar(tqdm):
    """tqdm bar whose right-hand text (``info``) is free-form."""

    info: str = ""

    @property
    def format_dict(self) -> dict[str, Any]:
        values = super().format_dict
        values["info"] = self.info
        return values


# --------------------------------------------------------------------------- photos
@dataclass(frozen=True)
class Photo:
    name: str
    data: bytes
    content_type: str


def embedded_photos() -> list[Photo]:
    """As many valid portraits as training needs (MIN_IMAGES) and one without a face."""
    from tools import photos

    out = [Photo(f"IMG_{i + 1:04d}.jpg", photos.jpeg(photos.portrait(i)), "image/jpeg")
           for i in range(valid_photo_count())]
    out.append(Photo("coffee-cup.jpg", photos.jpeg(photos.no_face()), "image/jpeg"))
    return out


def valid_photo_count() -> int:
    """The functions' default MIN_IMAGES: the fewest accepted photos a job needs."""
    from actorgen import config

    return int(config.MIN_IMAGES.default)


def photos_from_dir(folder: Path) -> list[Photo]:
    """Every image file directly in ``folder`` (by extension), in name order."""
    out = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            out.append(Photo(path.name, path.read_bytes(), content_type))
    return out


# --------------------------------------------------------------------------- watching
class DocWatch:
    """The newest data of one document: ``on_snapshot`` pushes, a slow poll backs it up."""

    def __init__(self, ref: Any) -> None:
        self.ref = ref
        self.data: dict[str, Any] | None = None
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._last_read = 0.0
        self._watch: Any = None
        with contextlib.suppress(Exception):  # no listener: polling alone still works
            self._watch = ref.on_snapshot(self._on_snapshot)

    def _on_snapshot(self, docs: list[Any], _changes: Any, _read_time: Any) -> None:
        for doc in docs:
            self._queue.put(doc.to_dict() if doc.exists else None)

    def next(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """Wait up to ``timeout`` for a change; return the newest data known."""
        try:
            item = self._queue.get(timeout=timeout)
            while True:  # skip to the newest
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            self.data = item
            self._last_read = time.monotonic()
        except queue.Empty:
            if time.monotonic() - self._last_read > POLL_EVERY_S:
                snapshot = self.ref.get()
                self.data = snapshot.to_dict() if snapshot.exists else None
                self._last_read = time.monotonic()
        return self.data

    def close(self) -> None:
        if self._watch is not None:
            with contextlib.suppress(Exception):
                self._watch.unsubscribe()
            self._watch = None


class Scheduler(threading.Thread):
    """Plays Cloud Scheduler: POSTs ``dispatch_jobs`` every minute (the emulator has none)."""

    def __init__(self, suite: EmulatorSuite, period: float = SCHEDULER_PERIOD_S) -> None:
        super().__init__(name="demo-scheduler", daemon=True)
        self.suite = suite
        self.period = period
        self.verbose = True  # say each run (off while the emulators are just kept up)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.period):
            try:
                request = urllib.request.Request(
                    self.suite.functions_url("dispatch_jobs"), data=b"{}", method="POST",
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=300) as response:
                    response.read()
            except Exception as exc:  # the emulators may be stopping
                if not self.stopped.is_set():
                    say(f"scheduler: dispatch_jobs failed: {exc}")
            else:
                if self.verbose and not self.stopped.is_set():
                    say("scheduler: ran dispatch_jobs (reconcile, dispatch, sweep)")

    def stop(self) -> None:
        self.stopped.set()


# --------------------------------------------------------------------------- the run
@dataclass
class DemoResult:
    """What the summary prints; ``status`` decides the exit code."""

    job_id: str
    status: str | None = None
    job: dict[str, Any] = field(default_factory=dict)
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None


class Demo:
    """The app's side of the pipeline, against one running emulator suite."""

    def __init__(self, suite: EmulatorSuite, photos: Sequence[Photo], base_model: Path,
                 steps: int, timeout: float, work_dir: Path, sweep_after: float) -> None:
        self.suite = suite
        self.sweep_after = sweep_after
        self.photos = list(photos)
        self.base_model = base_model
        self.steps = steps
        self.timeout = timeout
        self.work_dir = work_dir
        self.db = suite.firestore_client()
        self.bucket = suite.storage_bucket()
        self.uid, self.actor_id = DEMO_USER, DEMO_ACTOR
        self.job_id = f"demo-job-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        self.actor_ref = self.db.collection(schema.ACTORS).document(self.actor_id)
        self.job_ref = self.db.collection(schema.TRAINING_JOBS).document(self.job_id)
        self.result = DemoResult(self.job_id)
        self.interactive = sys.stdout.isatty()

    # -- the app --------------------------------------------------------------
    def run(self) -> DemoResult:
        """Actor, uploads, verdicts, job, and the job followed to its end."""
        from google.cloud import firestore

        paths = [schema.upload_path(self.uid, self.actor_id, p.name) for p in self.photos]
        # The app creates the actor first (uploads of an unknown actor are ignored) ...
        self.actor_ref.set({
            Field.USER_ID: self.uid,
            Field.IMAGE_URLS: [f"gs://{self.suite.bucket}/{path}" for path in paths],
            Field.CREATED_AT: firestore.SERVER_TIMESTAMP,
        })
        say(f"created {schema.ACTORS}/{self.actor_id} for user {self.uid}")
        # ... then uploads the photos into the user's folder.
        for photo, path in zip(self.photos, paths, strict=True):
            self.bucket.blob(path).upload_from_string(photo.data, content_type=photo.content_type)
        say(f"uploaded {len(paths)} photos to {schema.upload_prefix(self.uid, self.actor_id)}")
        self.result.images = self._wait_for_verdicts(len(paths))
        self.result.timings["photos judged"] = CLOCK.elapsed()

        # The app creates the training job.
        job = {
            Field.USER_ID: self.uid,
            Field.ACTOR_ID: self.actor_id,
            Field.INSTANCE_NAME: INSTANCE_NAME,
            Field.BASE_MODEL_ID: str(self.base_model),
            Field.TRAINING_STEPS: self.steps,
            Field.TRAINING_BATCH_SIZE: BATCH_SIZE,
            Field.LEARNING_RATE: LEARNING_RATE,
            Field.STATUS: JobStatus.PENDING,
            Field.CREATED_AT: firestore.SERVER_TIMESTAMP,
        }
        self.job_ref.set(job)
        self.result.timings["job created"] = CLOCK.elapsed()
        say(f"created {schema.TRAINING_JOBS}/{self.job_id}: {self.steps} steps, batch "
            f"{BATCH_SIZE}, learning rate {LEARNING_RATE:g}, base model {rel(self.base_model)}")
        self._follow_job()
        return self.result

    def _wait_for_verdicts(self, count: int) -> dict[str, dict[str, Any]]:
        watch = DocWatch(self.actor_ref)
        seen: set[str] = set()
        started = time.monotonic()
        limit = self.sweep_after + 2 * SCHEDULER_PERIOD_S + VERDICT_SLACK_S + 5 * count
        hinted = False
        try:
            while True:
                images = (watch.next(1.0) or {}).get(Field.IMAGES) or {}
                records = {k: v for k, v in images.items() if isinstance(v, dict)}
                for key, record in sorted(records.items(),
                                          key=lambda kv: str(kv[1].get(ImageField.FILE_NAME))):
                    if key in seen:
                        continue
                    seen.add(key)
                    say("photo " + describe_verdict(record))
                if len(images) >= count:
                    return images
                waited = time.monotonic() - started
                if waited > 90 and not hinted:
                    hinted = True
                    say(f"still waiting for {count - len(images)} verdicts; an upload whose "
                        f"trigger failed is judged by the sweep {self.sweep_after:.0f}s after it "
                        f"arrived (emulator log: {rel(self.suite.log_path)})")
                if waited > limit:
                    raise DemoError(
                        f"only {len(images)} of {count} photos were judged after {limit:.0f}s; "
                        f"see the emulator log {rel(self.suite.log_path)}"
                    )
        finally:
            watch.close()

    # -- watching the job ---------------------------------------------------------
    def _follow_job(self) -> None:
        watch = DocWatch(self.job_ref)
        bar = ProgressBar(
            total=100, file=sys.stdout, dynamic_ncols=True, mininterval=0.2,
            nrows=shutil.get_terminal_size().lines,  # a pty reporting 0 rows would hide it
            disable=not self.interactive,
            bar_format="{desc:<11}{percentage:3.0f}%|{bar}| {info} [{elapsed}]",
        )
        deadline = time.monotonic() + self.timeout
        last: tuple[Any, ...] = ()
        last_step: Any = None
        try:
            while True:
                job = watch.next(0.5) or {}
                status = job.get(Field.STATUS) or JobStatus.PENDING
                key = (status, job.get(Field.ATTEMPT))
                if key != last:
                    last = key
                    self.result.timings.setdefault(f"job {status}", CLOCK.elapsed())
                    say(describe_status(job))
                info = progress_text(job)
                bar.set_description_str(status, refresh=False)
                bar.info = info
                bar.n = int(job.get(Field.PROGRESS) or 0)
                bar.refresh()
                if not self.interactive and job.get(Field.STEP) not in (None, last_step):
                    last_step = job.get(Field.STEP)
                    say(f"{status} {job.get(Field.PROGRESS) or 0:3}%  {info}")
                if status in TERMINAL:
                    self.result.status = status
                    self.result.job = job
                    self.result.error = job.get(Field.ERROR)
                    return
                if time.monotonic() > deadline:
                    self.result.status = status
                    self.result.job = job
                    self.result.error = (f"the job was still {status} after {self.timeout:.0f}s "
                                         "(--timeout)")
                    return
        finally:
            bar.close()
            watch.close()

    # -- results ------------------------------------------------------------------
    def model_files(self) -> list[Any]:
        """Blobs under the job's model prefix in the Storage emulator."""
        prefix = schema.model_prefix(self.uid, self.actor_id, self.job_id)
        return sorted(self.bucket.list_blobs(prefix=prefix), key=lambda b: b.name)

    def download(self, blobs: Sequence[Any], folder: Path) -> Path:
        """Copy ``blobs`` (the model's files) into ``folder/<job id>/``."""
        prefix = schema.model_prefix(self.uid, self.actor_id, self.job_id)
        target = folder / self.job_id
        for blob in blobs:
            dest = target / blob.name[len(prefix):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(dest))
        return target

    def trainer_log(self, attempt: int | None) -> Path | None:
        from actorgen.executors.local import LOG_FILE, job_dir_name

        if not attempt:
            return None
        folder = local_pipeline.executor_dir(self.work_dir) / job_dir_name(self.job_id, int(attempt))
        path = folder / LOG_FILE
        return path if path.exists() else None


class DemoError(RuntimeError):
    """The demo could not go on (the message says why)."""


# --------------------------------------------------------------------------- text
def describe_verdict(record: Mapping[str, Any]) -> str:
    """One photo's verdict: accepted (format, size, face) or rejected with its reason."""
    from actorgen.faces import FaceBox

    name = record.get(ImageField.FILE_NAME) or record.get(ImageField.PATH)
    if record.get(ImageField.STATUS) == ImageStatus.ACCEPTED:
        size = f"{record.get(ImageField.WIDTH)}x{record.get(ImageField.HEIGHT)}"
        face_text = ""
        with contextlib.suppress(TypeError):  # the record's face is a FaceBox.as_dict()
            face = FaceBox(**(record.get(ImageField.FACE) or {}))
            face_text = f", face {face.w}x{face.h} px"
        return f"{name}: accepted ({record.get(ImageField.FORMAT)} {size}{face_text})"
    code = record.get(ImageField.REASON_CODE)
    return f"{name}: REJECTED [{code}] {record.get(ImageField.REASON)}"


def describe_status(job: Mapping[str, Any]) -> str:
    status = job.get(Field.STATUS) or JobStatus.PENDING
    attempt = job.get(Field.ATTEMPT)
    attempts = f" (attempt {attempt} of {job.get(Field.MAX_ATTEMPTS)})" if attempt else ""
    details = {
        JobStatus.PENDING: "created by the app, waiting for intake",
        JobStatus.QUEUED: "accepted by intake, waiting for a dispatcher",
        JobStatus.DISPATCHING: "claimed by a dispatcher",
        JobStatus.DISPATCHED: f"submitted to the {job.get(Field.EXECUTOR)} executor as "
                              f"{job.get(Field.EXECUTOR_JOB_NAME)}",
        JobStatus.PREPARING: "trainer running: photos, base model, caches",
        JobStatus.TRAINING: f"trainer running: {job.get(Field.TOTAL_STEPS) or '?'} steps",
        JobStatus.UPLOADING: "trainer exporting and uploading the LoRA",
        JobStatus.COMPLETED: f"model {job.get(Field.TRAINED_MODEL_ID)} published",
    }
    text = details.get(status) or str(job.get(Field.ERROR) or "")
    history = job.get(Field.ATTEMPT_HISTORY) or []
    if status == JobStatus.QUEUED and history:
        last = history[-1]
        text += (f"; previous attempt ended: {last.get(AttemptField.OUTCOME)}: "
                 f"{last.get(AttemptField.ERROR)}")
    return f"job {status.upper()}{attempts}: {text}"


def progress_text(job: Mapping[str, Any]) -> str:
    parts = []
    if job.get(Field.TOTAL_STEPS):
        parts.append(f"step {job.get(Field.STEP) or 0}/{job[Field.TOTAL_STEPS]}")
    if job.get(Field.LOSS) is not None:
        parts.append(f"loss {job[Field.LOSS]:.4f}")
    if job.get(Field.SAMPLES_PER_SECOND):
        parts.append(f"{job[Field.SAMPLES_PER_SECOND]:.2f} samples/s")
    if job.get(Field.STATUS) == JobStatus.TRAINING and job.get(Field.STEP) and (
        job.get(Field.ETA_SECONDS) is not None
    ):
        parts.append(f"ETA {fmt_duration(job[Field.ETA_SECONDS])}")
    return "  ".join(parts)


def fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


def print_summary(demo: Demo, result: DemoResult, output: Path | None) -> None:
    """Verdicts, the job, the actor's model, the published files (and where they went)."""
    heading(f"Photos ({schema.upload_prefix(demo.uid, demo.actor_id)})")
    records = sorted(result.images.values(), key=lambda r: str(r.get(ImageField.FILE_NAME)))
    for record in records:
        print("  " + describe_verdict(record))
    accepted = sum(r.get(ImageField.STATUS) == ImageStatus.ACCEPTED for r in records)
    print(f"  {accepted} accepted, {len(records) - accepted} rejected")

    job = result.job
    heading(f"Training job {schema.TRAINING_JOBS}/{result.job_id}")
    rows = [
        (Field.STATUS, result.status),
        (Field.ERROR, job.get(Field.ERROR)),
        (Field.TRAINED_MODEL_ID, job.get(Field.TRAINED_MODEL_ID)),
        (Field.MODEL_VERSION, job.get(Field.MODEL_VERSION)),
        (Field.ATTEMPT, job.get(Field.ATTEMPT)),
        (Field.EXECUTOR, job.get(Field.EXECUTOR)),
        (Field.EXECUTOR_JOB_NAME, job.get(Field.EXECUTOR_JOB_NAME)),
        (Field.STEP, f"{job.get(Field.STEP)}/{job[Field.TOTAL_STEPS]}"
                     if job.get(Field.TOTAL_STEPS) else None),
        (Field.LOSS, job.get(Field.LOSS)),
    ]
    for name, value in rows:
        if value is not None:
            print(f"  {name:<18} {fmt_value(value)}")
    for group in (Field.ARTIFACTS, Field.METRICS, Field.TIMINGS):
        values = job.get(group) or {}
        if values:
            print(f"  {group}:")
            for name, value in sorted(values.items()):
                print(f"    {name:<34} {fmt_value(value)}")

    actor = demo.actor_ref.get().to_dict() or {}
    heading(f"Actor {schema.ACTORS}/{demo.actor_id}")
    for name in (Field.MODEL_STATUS, Field.MODEL_ID, Field.MODEL_ERROR, Field.LATEST_JOB_ID,
                 Field.ACCEPTED_IMAGE_COUNT):
        if actor.get(name) is not None:
            print(f"  {name:<18} {fmt_value(actor[name])}")
    for entry in actor.get(Field.MODEL_VERSIONS) or []:
        print(f"  {Field.MODEL_VERSIONS}[v{entry.get(ModelVersionField.VERSION)}]  "
              f"{ModelVersionField.MODEL_ID}={entry.get(ModelVersionField.MODEL_ID)}  "
              f"{ModelVersionField.TRIGGER}={entry.get(ModelVersionField.TRIGGER)!r}  "
              f"{len(entry.get(ModelVersionField.ARTIFACTS) or {})} artifacts")

    prefix = schema.model_prefix(demo.uid, demo.actor_id, demo.job_id)
    blobs = demo.model_files()
    heading(f"Files under gs://{demo.suite.bucket}/{prefix} (Storage emulator)")
    for blob in blobs:
        print(f"  {fmt_size(blob.size):>10}  {blob.name[len(prefix):]}")
    if not blobs:
        print("  (none)")
    elif output is not None:
        target = demo.download(blobs, output)
        print(f"  downloaded to {rel(target)}/  (LoRA: "
              f"{rel(target / schema.ArtifactName.LORA_DIFFUSERS)})")

    log = demo.trainer_log(job.get(Field.ATTEMPT))
    if log is not None:
        heading("Trainer log")
        print(f"  {rel(log)}")

    heading("Timings (seconds since the demo started)")
    for name, seconds in result.timings.items():
        print(f"  {name:<24} {seconds:7.1f}")


def keep_running(demo: Demo) -> None:
    """Leave the emulators up until Ctrl-C, saying how to reach them."""
    suite = demo.suite
    heading("Emulators still running (Ctrl-C stops them; dispatch_jobs still runs every minute)")
    for name, host in sorted(suite.hosts.items()):
        print(f"  {name:<10} http://{host}")
    print(f"  log        {rel(suite.log_path)}")
    documents = f"{suite.url('firestore')}/v1/projects/{suite.project}/databases/(default)/documents"
    print(f"  actor      {documents}/{schema.ACTORS}/{demo.actor_id}")
    print(f"  job        {documents}/{schema.TRAINING_JOBS}/{demo.job_id}")
    print("             (REST; add the header 'Authorization: Bearer owner' to bypass the rules)")
    print("  For a client in another shell:")
    for key, value in suite.env.items():
        print(f"    export {key}={shlex.quote(value)}")
    sys.stdout.flush()
    try:
        while suite.running:
            time.sleep(1)
        print("the emulators stopped by themselves")
    except KeyboardInterrupt:
        print()  # Ctrl-C is how this ends: the job's outcome still decides the exit status


# --------------------------------------------------------------------------- processes
def stop_trainers(executor_dir: Path, wait: float = 0.0) -> None:
    """Stop every trainer the local executor started for this run (SIGTERM, then SIGKILL).

    A trainer gets ``wait`` seconds to exit by itself first (after ``completed`` it still
    deletes its checkpoints and scratch files).
    """
    from actorgen.executors import ExecutorSettings, ExecutorState
    from actorgen.executors.local import LocalExecutor

    if not executor_dir.is_dir():
        return
    executor = LocalExecutor(ExecutorSettings(local_workdir=str(executor_dir)))
    deadline = time.monotonic() + wait
    for folder in sorted(executor_dir.iterdir()):
        if not folder.is_dir():
            continue
        with contextlib.suppress(Exception):
            while (executor.get(folder.name).state == ExecutorState.RUNNING
                   and time.monotonic() < deadline):
                time.sleep(0.2)
            if executor.get(folder.name).state == ExecutorState.RUNNING:
                say(f"stopping trainer {folder.name}")
            executor.cancel(folder.name)  # a no-op for a trainer that has exited


class Interrupts:
    """Ctrl-C / SIGTERM raise KeyboardInterrupt once; while cleaning up they are ignored."""

    def __init__(self) -> None:
        self.cleaning = False
        self.interrupted = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.cleaning:
            print("\n(stopping the trainer and the emulators; please wait)", flush=True)
            return
        self.cleaning = self.interrupted = True
        raise KeyboardInterrupt


@contextlib.contextmanager
def quiet_hf_libraries() -> Iterator[None]:
    """No transformers/diffusers advisories or progress bars while the model is built."""
    quiet = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    saved = {key: os.environ.get(key) for key in quiet}
    os.environ.update(quiet)
    try:
        yield
    finally:  # the emulators (and so the trainer) inherit this process's environment
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def sweep_after_seconds(env: Mapping[str, str]) -> float:
    """The SWEEP_AFTER_SECONDS param the functions run with (``--env`` or its default)."""
    from actorgen import config

    name = config.SWEEP_AFTER_SECONDS.name
    return float(env.get(name) or config.SWEEP_AFTER_SECONDS.default)


def new_run_dir() -> Path:
    """A fresh folder for this run's executor and trainer files; old runs are pruned."""
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    runs = sorted(p for p in RUNS_DIR.iterdir() if p.is_dir())
    for old in runs[: max(0, len(runs) - (RUNS_KEPT - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    run_dir = RUNS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    run_dir.mkdir()
    return run_dir


# --------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    spec = schema.HYPERPARAMETER_SPECS[Field.TRAINING_STEPS]
    low, high = int(spec.minimum or 1), int(spec.maximum or 10**6)
    parser = argparse.ArgumentParser(
        prog="bin/demo", description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=low,
                        help=f"{Field.TRAINING_STEPS} of the job ({low}-{high})")
    parser.add_argument("--photos", type=Path, metavar="DIR",
                        help="upload the images in DIR instead of the embedded demo photos")
    parser.add_argument("--keep-running", action="store_true",
                        help="leave the emulators up after the job until Ctrl-C")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra function param, e.g. MAX_ATTEMPTS=1 (repeatable)")
    parser.add_argument("--output", type=Path, default=OUTPUT_DIR,
                        help="copy the trained model's files to OUTPUT/<job id>/")
    parser.add_argument("--no-download", action="store_true", help="do not copy the model")
    parser.add_argument("--timeout", type=float, default=1200.0,
                        help="give up on a job still running after this many seconds")
    args = parser.parse_args(argv)
    if not low <= args.steps <= high:
        parser.error(f"--steps must be between {low} and {high} (schema.HYPERPARAMETERS)")
    if args.photos is not None and not args.photos.is_dir():
        parser.error(f"--photos {args.photos}: not a folder")
    if any("=" not in item for item in args.env):
        parser.error("--env takes KEY=VALUE")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; the exit status says whether the job completed."""
    args = parse_args(argv)
    interrupts = Interrupts()
    interrupts.install()
    try:
        return _run(args, interrupts)
    except KeyboardInterrupt:
        print(f"\n{CLOCK.stamp()}  interrupted: trainer and emulators stopped", flush=True)
        return 130
    except DemoError as exc:
        print(f"\n{CLOCK.stamp()}  demo failed: {exc}", file=sys.stderr, flush=True)
        return 1


def _run(args: argparse.Namespace, interrupts: Interrupts) -> int:
    photos = photos_from_dir(args.photos) if args.photos else embedded_photos()
    if not photos:
        raise DemoError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {args.photos}")
    say(f"{len(photos)} photos " + (f"from {args.photos}" if args.photos else
                                     f"of one person, from real packaged photos "
                                     f"({len(photos) - 1} valid, 1 without a face)"))

    started = time.monotonic()
    if not (local_pipeline.TINY_MODEL_CACHE / ".actorgen-model").is_file():
        say(f"building the tiny SD 1.x-shaped base model into "
            f"{rel(local_pipeline.TINY_MODEL_CACHE)} (once)")
    with quiet_hf_libraries():
        model, built = local_pipeline.cached_tiny_base_model()
    model_seconds = time.monotonic() - started
    model_ready = CLOCK.elapsed()
    if built:
        say(f"base model built in {model_seconds:.1f}s")
    else:
        say(f"base model: {rel(model)} (cached)")

    run_dir = new_run_dir()
    env = local_pipeline.local_functions_env(model, run_dir)
    env.update(dict(item.split("=", 1) for item in args.env))
    say(f"starting the emulators ({', '.join(EMULATORS)}) with EXECUTOR={env['EXECUTOR']}")
    result: DemoResult | None = None
    with start_emulators(only=EMULATORS, extra_env=env) as suite:
        scheduler = Scheduler(suite)
        scheduler.start()
        try:
            say(f"emulators up in {suite.start_seconds:.1f}s (log {rel(suite.log_path)})")
            emulators_up = CLOCK.elapsed()
            demo = Demo(suite, photos, model, args.steps, args.timeout, run_dir,
                        sweep_after=sweep_after_seconds(env))
            result = demo.run()
            result.timings = {"base model ready": model_ready, "emulators up": emulators_up,
                              **result.timings, "finished": CLOCK.elapsed()}
            if result.status not in TERMINAL:  # timed out (a final status was said already)
                say(f"giving up: {result.error}")
            print_summary(demo, result, None if args.no_download else args.output)
            if args.keep_running:
                scheduler.verbose = False
                keep_running(demo)
        finally:
            scheduler.stop()
            ended = result is not None and result.status in TERMINAL
            wait = 0.0 if interrupts.interrupted or not ended else TRAINER_EXIT_WAIT_S
            interrupts.cleaning = True
            stop_trainers(local_pipeline.executor_dir(run_dir), wait)
            say("stopping the emulators")
    say(f"done in {CLOCK.elapsed():.1f}s: job {result.status if result else '?'}")
    return 0 if result is not None and result.status == JobStatus.COMPLETED else 1


if __name__ == "__main__":
    sys.exit(main())
