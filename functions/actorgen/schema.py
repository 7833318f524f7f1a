"""The one source of truth for the pipeline's data: collections, field names,
status values, the job state machine, hyper-parameter ranges and storage paths.

Both the Cloud Functions (``functions/``) and the trainer container
(``trainer_image/``, which copies this file in at build time) import it, so no
name below is ever spelled a second time elsewhere. It is pure: no I/O and no
imports beyond the standard library, so it costs nothing at cold start.

Job state machine (``training_jobs/{jobId}.status``)::

    (created by app) --intake--> queued ----------> dispatching --> dispatched
          |                        ^   ^  (lease)        |              |
          v                        |   |                 v              v
       rejected                    |   +--retry-- preparing --> training --> uploading --> completed
                                   |   (failed attempt,    \\         |             |
                                   |    backoff)            +--------+-------------+--> failed
          failed --(admin sets status=queued in console)--+
          any non-terminal --(cancelRequested)--> cancelled

``completed`` reported by the trainer always wins over anything the reconciler
believes: it is allowed from every non-final state that a dispatched attempt
can find the job in (queued and failed included, after a stale-heartbeat retry). ``rejected``, ``completed`` and ``cancelled`` are final; ``failed`` is
final unless an admin re-dispatches it.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, Final, Mapping

SCHEMA_VERSION: Final = 1

# --------------------------------------------------------------------------
# Collections
# --------------------------------------------------------------------------
ACTORS: Final = "actors"
TRAINING_JOBS: Final = "training_jobs"
#: Service-only documents (no rule matches them: clients can neither read nor write).
SYSTEM: Final = "system"
#: ``system/dispatch-pass``: the lease of the one dispatch pass running at a time.
DISPATCH_PASS_DOC: Final = "dispatch-pass"
#: ``system/dispatch-requests``: passes that found the lease held count themselves here
#: (a blind increment: no contention with the holder's claims); the holder runs one more
#: round when the count moved, so the jobs those passes were started for are not left
#: to the next minute.
DISPATCH_REQUESTS_DOC: Final = "dispatch-requests"

#: ``system/leftover-check``: where the check of completed jobs for a leftover executor
#: job goes on (reconcile.stop_leftover_executor_jobs), so every completion is looked at.
LEFTOVER_CHECK_DOC: Final = "leftover-check"


class LeftoverCheckField:
    """Keys of ``system/leftover-check`` (reconciler only)."""

    FINISHED_AT = "finishedAt"  # the finishedAt of the last completed job checked
    JOB_IDS = "jobIds"  # the jobs checked that finished exactly then (ties)
    UPDATED_AT = "updatedAt"


class DispatchPassField:
    """Keys of ``system/dispatch-pass`` and ``system/dispatch-requests`` (dispatcher only)."""

    OWNER = "owner"  # the pass holding the lease (dispatch.new_lease_owner())
    EXPIRES_AT = "expiresAt"  # renewed with every claim; an expired lease is free
    SERVED = "servedRequests"  # the request count the holder's current round serves
    REQUESTS = "count"  # in dispatch-requests: rounds asked for, ever
    UPDATED_AT = "updatedAt"


# --------------------------------------------------------------------------
# Job statuses
# --------------------------------------------------------------------------
class JobStatus:
    """Values of ``training_jobs/{jobId}.status``."""

    PENDING = "pending"  # written by the app (rules require it): not yet taken in
    QUEUED = "queued"  # accepted by intake, waiting for a GPU slot
    DISPATCHING = "dispatching"  # claimed by a dispatcher under a lease, submit in flight
    DISPATCHED = "dispatched"  # executor job exists, trainer not started yet
    PREPARING = "preparing"  # trainer: downloading images, loading the model
    TRAINING = "training"  # trainer: optimisation steps running
    UPLOADING = "uploading"  # trainer: exporting and uploading the LoRA
    COMPLETED = "completed"
    FAILED = "failed"
    REJECTED = "rejected"  # intake refused the job; `error` says what to fix
    CANCELLED = "cancelled"


ALL_JOB_STATUSES: Final = frozenset(
    v for k, v in vars(JobStatus).items() if k.isupper() and isinstance(v, str)
)
FINAL_JOB_STATUSES: Final = frozenset(
    {JobStatus.COMPLETED, JobStatus.REJECTED, JobStatus.CANCELLED}
)
#: Statuses in which a GPU job may exist and must be reconciled.
ACTIVE_JOB_STATUSES: Final = frozenset(
    {
        JobStatus.DISPATCHING,
        JobStatus.DISPATCHED,
        JobStatus.PREPARING,
        JobStatus.TRAINING,
        JobStatus.UPLOADING,
    }
)
#: Statuses written by the trainer itself (its heartbeat is expected).
TRAINER_STATUSES: Final = frozenset(
    {JobStatus.PREPARING, JobStatus.TRAINING, JobStatus.UPLOADING}
)

# Allowed transitions. `completed` from any active state: the trainer's word wins.
_TRANSITIONS: Final[dict[str, frozenset[str]]] = {
    JobStatus.PENDING: frozenset({JobStatus.QUEUED, JobStatus.REJECTED, JobStatus.CANCELLED}),
    # `completed` is reachable even from queued/dispatching/failed: an attempt the
    # reconciler gave up on (stale heartbeat) may still finish, and its result is
    # worth keeping rather than paying for the GPU again. `queued -> failed` is not:
    # no pipeline path needs it, and it would let a stale trainer fail a re-queued job.
    JobStatus.QUEUED: frozenset(
        {JobStatus.DISPATCHING, JobStatus.CANCELLED, JobStatus.COMPLETED}
    ),
    JobStatus.DISPATCHING: frozenset(
        {
            JobStatus.DISPATCHED,
            JobStatus.QUEUED,
            JobStatus.PREPARING,
            JobStatus.FAILED,
            JobStatus.CANCELLED,
            JobStatus.COMPLETED,
        }
    ),
    JobStatus.DISPATCHED: frozenset(
        {
            JobStatus.PREPARING,
            JobStatus.TRAINING,
            JobStatus.QUEUED,
            JobStatus.FAILED,
            JobStatus.CANCELLED,
            JobStatus.COMPLETED,
        }
    ),
    JobStatus.PREPARING: frozenset(
        {
            JobStatus.TRAINING,
            JobStatus.UPLOADING,
            JobStatus.QUEUED,
            JobStatus.FAILED,
            JobStatus.CANCELLED,
            JobStatus.COMPLETED,
        }
    ),
    JobStatus.TRAINING: frozenset(
        {
            JobStatus.PREPARING,  # a restarted worker prepares again, then resumes
            JobStatus.UPLOADING,
            JobStatus.QUEUED,
            JobStatus.FAILED,
            JobStatus.CANCELLED,
            JobStatus.COMPLETED,
        }
    ),
    JobStatus.UPLOADING: frozenset(
        {
            JobStatus.PREPARING,
            JobStatus.COMPLETED,
            JobStatus.QUEUED,
            JobStatus.FAILED,
            JobStatus.CANCELLED,
        }
    ),
    JobStatus.FAILED: frozenset({JobStatus.QUEUED, JobStatus.COMPLETED}),  # admin re-dispatch
    JobStatus.COMPLETED: frozenset(),
    JobStatus.REJECTED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


def can_transition(current: str | None, new: str) -> bool:
    """True when a job may move from ``current`` to ``new``.

    A missing status counts as ``pending`` (documents written by the Admin SDK may omit it). Writing the
    same status again (a heartbeat, progress) is always allowed for non-final
    states.
    """
    current = current or JobStatus.PENDING
    if current not in _TRANSITIONS or new not in ALL_JOB_STATUSES:
        return False
    if current == new:
        return current not in FINAL_JOB_STATUSES
    return new in _TRANSITIONS[current]


#: Most characters of a user's value an error message quotes back.
QUOTE_CHARS: Final = 40
#: Longest error text written on a job or an actor (``error``, ``modelError``).
MAX_ERROR_CHARS: Final = 1000


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """A user's value as an error message shows it: its repr, cut to ``limit``
    characters (a 600 KB string must not come back in the error, nor push the
    document past Firestore's 1 MiB)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)
    if len(text) > limit:
        return f"{text[:limit]}... (a {type(value).__name__})"
    return text


def clip_error(text: str | None, limit: int = MAX_ERROR_CHARS) -> str | None:
    """An error text no longer than ``limit`` characters (None stays None)."""
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 3] + "..."


class InvalidTransition(ValueError):
    """Raised when code tries a status change the state machine forbids."""


def check_transition(current: str | None, new: str) -> None:
    """Raise :class:`InvalidTransition` unless ``current -> new`` is allowed."""
    if not can_transition(current, new):
        raise InvalidTransition(
            f"job status cannot go from {quote(current or JobStatus.PENDING)} to {quote(new)}"
        )


# --------------------------------------------------------------------------
# Actor model status (follows the actor's latest job)
# --------------------------------------------------------------------------
class ModelStatus:
    """Values of ``actors/{actorId}.modelStatus``."""

    NONE = "none"
    QUEUED = "queued"
    TRAINING = "training"
    READY = "ready"
    FAILED = "failed"


_MODEL_STATUS_FOR_JOB: Final = {
    JobStatus.PENDING: ModelStatus.QUEUED,
    JobStatus.QUEUED: ModelStatus.QUEUED,
    JobStatus.DISPATCHING: ModelStatus.QUEUED,
    JobStatus.DISPATCHED: ModelStatus.QUEUED,
    JobStatus.PREPARING: ModelStatus.TRAINING,
    JobStatus.TRAINING: ModelStatus.TRAINING,
    JobStatus.UPLOADING: ModelStatus.TRAINING,
    JobStatus.COMPLETED: ModelStatus.READY,
    JobStatus.FAILED: ModelStatus.FAILED,
    JobStatus.REJECTED: ModelStatus.FAILED,
    JobStatus.CANCELLED: ModelStatus.NONE,
}


def actor_has_model(actor: Mapping[str, Any]) -> bool:
    """Whether the actor has a trained model (the app's ``modelId`` or any model version)."""
    return bool(actor.get(Field.MODEL_ID) or actor.get(Field.MODEL_VERSIONS))


def model_status_for_job(job_status: str, *, actor_has_model: bool = False) -> str:
    """The actor's ``modelStatus`` while its latest job is in ``job_status``.

    An actor that already has a trained model stays ``ready`` when a later job
    is rejected or cancelled: a refused retrain must not hide a working model.
    """
    status = _MODEL_STATUS_FOR_JOB[job_status]
    if actor_has_model and job_status in (JobStatus.REJECTED, JobStatus.CANCELLED):
        return ModelStatus.READY
    return status


# --------------------------------------------------------------------------
# Per-image validation verdicts (actors/{actorId}.images.{imageId})
# --------------------------------------------------------------------------
class ImageStatus:
    ACCEPTED = "accepted"
    REJECTED = "rejected"


class ImageField:
    """Keys of one image record (``actors/{actorId}.images.{imageId}``), written by uploads."""

    PATH = "path"  # storage object name; the trainer downloads accepted ones
    FILE_NAME = "fileName"
    GENERATION = "generation"  # storage object generation the verdict is for
    STATUS = "status"  # ImageStatus
    REASON = "reason"  # human-readable, for rejected images
    REASON_CODE = "reasonCode"  # stable machine code of the reason (app may localise)
    SIZE_BYTES = "sizeBytes"
    FORMAT = "format"  # JPEG, PNG, WEBP, HEIF...
    WIDTH = "width"  # after EXIF orientation
    HEIGHT = "height"
    SHA256 = "sha256"
    PHASH = "phash"  # 64-bit perceptual hash, 16 hex digits
    FACE = "face"  # {x, y, w, h} of the one face, in oriented pixels
    LANDMARKS = "landmarks"  # 5 points [{x, y}]: eye corners and nose base, oriented pixels
    EMBEDDING = "embedding"  # 128 floats: dlib ResNet face embedding (identity)
    FACE_QUALITY = "faceQuality"  # {sharpness, brightness, clipped, yaw, cutOff}
    IDENTITY_DISTANCE = "identityDistance"  # embedding distance to the actor's person
    VALIDATED_AT = "validatedAt"


class ModelVersionField:
    """Keys of one ``actors/{actorId}.modelVersions`` entry, appended by the trainer."""

    VERSION = "version"  # 1-based, also the job's ``modelVersion``
    MODEL_ID = "modelId"  # the job's ``trainedModelId``
    JOB_ID = "jobId"
    BASE_MODEL_ID = "baseModelId"
    TRIGGER = "trigger"  # words that call the person up in a prompt
    ARTIFACTS = "artifacts"  # ArtifactName -> storage object path
    HUB_REPO = "hubRepo"  # private Hugging Face repo id, when pushed
    CREATED_AT = "createdAt"


class AttemptField:
    """Keys of one ``training_jobs/{jobId}.attemptHistory`` entry, written by the functions."""

    ATTEMPT = "attempt"
    EXECUTOR_JOB_NAME = "executorJobName"
    OUTCOME = "outcome"  # AttemptOutcome
    ERROR = "error"
    ENDED_AT = "endedAt"


class StatusChangeField:
    """Keys of one ``training_jobs/{jobId}.statusHistory`` entry (see :func:`status_fields`)."""

    STATUS = "status"
    AT = "at"


#: Most entries kept in ``statusHistory`` (the oldest go first); a job passes through
#: about six statuses per attempt, so this holds a dozen attempts.
STATUS_HISTORY_LIMIT: Final = 80


def status_fields(job: Mapping[str, Any], new_status: str, at: Any) -> dict[str, Any]:
    """The fields that put ``job`` in ``new_status`` at ``at``: ``status`` and the timeline.

    Every writer of ``status`` (intake, dispatcher, reconciler, admin, trainer) spreads
    this into its update, so ``statusHistory`` holds every change with its time (the
    operator's timeline). A write of the status the history already ends with adds
    nothing (heartbeats, redelivered events). ``at`` must be a real time, not a server
    timestamp sentinel (Firestore refuses those inside arrays). It does not check the
    transition: callers keep their :func:`check_transition`.
    """
    raw = job.get(Field.STATUS_HISTORY)
    history = [dict(e) for e in raw if isinstance(e, Mapping)] if isinstance(raw, list) else []
    current = job.get(Field.STATUS) or JobStatus.PENDING
    if not history and current == JobStatus.PENDING and job.get(Field.CREATED_AT) is not None:
        # The app wrote the job as pending without a history: its creation starts it.
        history = [{StatusChangeField.STATUS: JobStatus.PENDING,
                    StatusChangeField.AT: job.get(Field.CREATED_AT)}]
    update: dict[str, Any] = {Field.STATUS: new_status}
    if not history or history[-1].get(StatusChangeField.STATUS) != new_status:
        history.append({StatusChangeField.STATUS: new_status, StatusChangeField.AT: at})
        update[Field.STATUS_HISTORY] = history[-STATUS_HISTORY_LIMIT:]
    return update


class AttemptOutcome:
    """Why an attempt ended without the trainer's ``completed``."""

    EXECUTOR_FAILED = "executor-failed"  # executor reported failed/cancelled/expired
    LOST = "lost"  # executor no longer knows the job
    STALE = "stale"  # trainer heartbeat stopped while the executor still ran
    NO_COMPLETION = "no-completion"  # executor succeeded, trainer never wrote completed
    SUBMIT_RETRY = "submit-retry"  # submission failed retryably; not a GPU attempt
    SUBMIT_FAILED = "submit-failed"  # submission refused for good
    CANCELLED = "cancelled"
    ADMIN_REDISPATCH = "admin-redispatch"  # marker: an admin re-dispatched (fresh attempt budget)


class Field:
    """Field names. The app's own names are kept exactly as the app writes them."""

    # -- actors (app) --
    USER_ID = "userId"
    IMAGE_URLS = "imageUrls"
    MODEL_STATUS = "modelStatus"
    MODEL_ID = "modelId"
    MODEL_ERROR = "modelError"
    # -- actors (pipeline) --
    IMAGES = "images"  # map imageId -> ImageRecord dict
    ACCEPTED_IMAGE_COUNT = "acceptedImageCount"
    MODEL_VERSIONS = "modelVersions"  # list of ModelVersion dicts, oldest first
    LATEST_JOB_ID = "latestJobId"

    # -- training_jobs (app inputs) --
    ACTOR_ID = "actorId"
    INSTANCE_NAME = "instanceName"
    BASE_MODEL_ID = "baseModelId"
    TRAINING_STEPS = "trainingSteps"
    TRAINING_BATCH_SIZE = "trainingBatchSize"
    LEARNING_RATE = "learningRate"
    # -- training_jobs (optional inputs, defaults filled by intake) --
    CLASS_WORD = "classWord"
    LORA_RANK = "loraRank"
    LORA_ALPHA = "loraAlpha"
    RESOLUTION = "resolution"
    TRAIN_TEXT_ENCODER = "trainTextEncoder"
    PRIOR_PRESERVATION = "priorPreservation"
    MIN_SNR_GAMMA = "minSnrGamma"
    SEED = "seed"
    PRIORITY = "priority"
    # -- training_jobs (pipeline) --
    STATUS = "status"
    STATUS_HISTORY = "statusHistory"  # [{status, at}], oldest first: see status_fields()
    PROGRESS = "progress"  # 0..100
    ERROR = "error"  # human-readable; None while fine
    TRAINED_MODEL_ID = "trainedModelId"
    CREATED_AT = "createdAt"
    UPDATED_AT = "updatedAt"
    QUEUED_AT = "queuedAt"
    DISPATCHED_AT = "dispatchedAt"
    STARTED_AT = "startedAt"
    FINISHED_AT = "finishedAt"
    ATTEMPT = "attempt"  # 1-based number of the current (or last) attempt
    MAX_ATTEMPTS = "maxAttempts"
    ATTEMPT_HISTORY = "attemptHistory"  # list of {attempt, executorJobName, outcome, error, endedAt}
    NEXT_ATTEMPT_AT = "nextAttemptAt"  # backoff: not dispatched before this time
    LEASE_OWNER = "leaseOwner"
    LEASE_EXPIRES_AT = "leaseExpiresAt"
    EXECUTOR = "executor"  # "vertex" | "local"
    EXECUTOR_JOB_NAME = "executorJobName"
    EXECUTOR_STATE = "executorState"
    EXECUTOR_STATE_AT = "executorStateAt"  # when executorState last changed (liveness clock)
    HEARTBEAT_AT = "heartbeatAt"
    STEP = "step"
    TOTAL_STEPS = "totalSteps"
    LOSS = "loss"
    SAMPLES_PER_SECOND = "samplesPerSecond"
    ETA_SECONDS = "etaSeconds"
    CANCEL_REQUESTED = "cancelRequested"
    ARTIFACTS = "artifacts"  # map name -> storage object path
    METRICS = "metrics"
    TIMINGS = "timings"
    MODEL_VERSION = "modelVersion"
    # Cost: worker seconds the trainer ran (all attempts, added with each progress
    # write) and their estimated price (from ENV_GPU_PRICE_PER_HOUR).
    GPU_SECONDS = "gpuSeconds"
    ESTIMATED_COST_USD = "estimatedCostUsd"


#: The only fields the app (a signed-in user) may write when creating a job.
#: firestore.rules repeats this list because rules cannot import Python; a test
#: checks that the two agree.
JOB_INPUT_FIELDS: Final = (
    Field.USER_ID,
    Field.ACTOR_ID,
    Field.INSTANCE_NAME,
    Field.BASE_MODEL_ID,
    Field.TRAINING_STEPS,
    Field.TRAINING_BATCH_SIZE,
    Field.LEARNING_RATE,
    Field.CLASS_WORD,
    Field.LORA_RANK,
    Field.LORA_ALPHA,
    Field.RESOLUTION,
    Field.TRAIN_TEXT_ENCODER,
    Field.PRIOR_PRESERVATION,
    Field.MIN_SNR_GAMMA,
    Field.SEED,
    Field.STATUS,  # the app may write "pending"; rules pin the value
    Field.CREATED_AT,
)


#: Longest strings the app may write (firestore.rules repeats them; a test checks):
#: job inputs (intake then checks the values), the actor's descriptive fields, an
#: admin's note on a re-dispatch.
APP_STRING_LIMITS: Final = {
    Field.INSTANCE_NAME: 64,
    Field.BASE_MODEL_ID: 200,
    Field.CLASS_WORD: 64,
    "name": 200,  # actors
    "description": 2000,  # actors
    "adminNote": 1000,  # training_jobs, written by an admin
}
#: An actor's ``imageUrls`` (the app's list): at most this many entries and characters.
MAX_IMAGE_URLS: Final = 100
MAX_IMAGE_URLS_CHARS: Final = 100_000
#: What storage.rules lets the app upload as a photo (a test checks the rules): the
#: content types of the formats validation accepts (imaging.ACCEPTED_FORMATS), at most
#: this many bytes (the MAX_UPLOAD_BYTES param's default), at most this many photo
#: records on one actor (twice MAX_IMAGES' default: room for rejected ones).
UPLOAD_CONTENT_TYPES: Final = ("image/jpeg", "image/png", "image/webp", "image/heic",
                               "image/heif")
MAX_UPLOAD_BYTES_RULE: Final = 20 * 1024 * 1024
MAX_UPLOADS_PER_ACTOR: Final = 60
#: Longest actor id a job may name.
MAX_ACTOR_ID_CHARS: Final = 128


# --------------------------------------------------------------------------
# Hyper-parameters: ranges and person-LoRA defaults
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    field: str
    kind: type  # int, float, bool or str
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    hint: str = ""


HYPERPARAMETERS: Final[tuple[ParamSpec, ...]] = (
    ParamSpec(Field.TRAINING_STEPS, int, 800, 50, 5000, "about 80-100 steps per photo works for a person"),
    ParamSpec(Field.TRAINING_BATCH_SIZE, int, 2, 1, 16),
    # The seed's 1e-6 is a full fine-tune rate; LoRA needs ~1e-4.
    ParamSpec(Field.LEARNING_RATE, float, 1e-4, 1e-6, 1e-3, "LoRA learns at about 1e-4"),
    ParamSpec(Field.LORA_RANK, int, 16, 1, 128),
    ParamSpec(Field.LORA_ALPHA, int, 16, 1, 256),
    ParamSpec(Field.RESOLUTION, int, 0, 0, 1536, "0 means the base model's native resolution"),
    ParamSpec(Field.TRAIN_TEXT_ENCODER, bool, False),
    ParamSpec(Field.PRIOR_PRESERVATION, bool, False),
    ParamSpec(Field.MIN_SNR_GAMMA, float, 5.0, 0.0, 20.0, "0 disables min-SNR weighting"),
    ParamSpec(Field.SEED, int, 1234, 0, 2**31 - 1),
)
HYPERPARAMETER_SPECS: Final = {spec.field: spec for spec in HYPERPARAMETERS}
#: Scheduling, not training (so never checked by the trainer): an admin sets it in the
#: console, the dispatcher takes higher first. Intake writes it, since Firestore
#: queries ordered by a field skip documents that lack it.
PRIORITY_SPEC: Final = ParamSpec(Field.PRIORITY, int, 0, 0, 10)


def job_priority(job: Mapping[str, Any]) -> int:
    """The job's valid ``priority``; the default when absent or out of range."""
    value, problem = _coerce(PRIORITY_SPEC, job.get(Field.PRIORITY, PRIORITY_SPEC.default))
    return PRIORITY_SPEC.default if problem else value

DEFAULT_CLASS_WORD: Final = "person"
INSTANCE_NAME_PATTERN: Final = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{1,31}$")
CLASS_WORD_PATTERN: Final = re.compile(r"^[a-z][a-z ]{1,31}$")
RESOLUTION_MULTIPLE: Final = 8


def normalize_hyperparameters(job: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Validate the job's hyper-parameters and fill defaults.

    Returns ``(values, problems)``: ``values`` holds every field of
    :data:`HYPERPARAMETERS` (defaults where absent or ``None``), ``problems``
    holds one sentence per bad value, naming the field and what to use instead.
    """
    values: dict[str, Any] = {}
    problems: list[str] = []
    for spec in HYPERPARAMETERS:
        raw = job.get(spec.field)
        if raw is None:
            values[spec.field] = spec.default
            continue
        value, problem = _coerce(spec, raw)
        if problem:
            problems.append(problem)
            continue
        values[spec.field] = value
    resolution = values.get(Field.RESOLUTION)
    if isinstance(resolution, int) and resolution and (
        resolution % RESOLUTION_MULTIPLE or resolution < 256
    ):
        problems.append(
            f"{Field.RESOLUTION} must be 0 (native) or a multiple of {RESOLUTION_MULTIPLE} "
            f"between 256 and 1536, got {resolution}"
        )
    return values, problems


def _coerce(spec: ParamSpec, raw: Any) -> tuple[Any, str | None]:
    name = spec.field
    if spec.kind is bool:
        if isinstance(raw, bool):
            return raw, None
        return None, f"{name} must be true or false, got {quote(raw)}"
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return None, f"{name} must be a number, got {quote(raw)}"
    if isinstance(raw, float) and not math.isfinite(raw):
        return None, f"{name} must be a finite number, got {quote(raw)}"
    if spec.kind is int:
        if isinstance(raw, float) and not raw.is_integer():
            return None, f"{name} must be a whole number, got {quote(raw)}"
        value: Any = int(raw)
    else:
        value = float(raw)
    if spec.minimum is not None and value < spec.minimum or (
        spec.maximum is not None and value > spec.maximum
    ):
        hint = f" ({spec.hint})" if spec.hint else ""
        return None, (
            f"{name} must be between {_fmt(spec.minimum)} and {_fmt(spec.maximum)}, "
            f"got {_fmt(value)}{hint}"
        )
    return value, None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def resolved_hyperparameters(job: Mapping[str, Any]) -> dict[str, Any]:
    """Hyper-parameters of a job that intake accepted (defaults for anything absent)."""
    values, _ = normalize_hyperparameters(job)
    for spec in HYPERPARAMETERS:
        values.setdefault(spec.field, spec.default)
    return values


# --------------------------------------------------------------------------
# Storage paths
# --------------------------------------------------------------------------
UPLOAD_PATTERN: Final = re.compile(
    r"^users/(?P<uid>[^/]+)/actors/(?P<actor_id>[^/]+)/images/(?P<file_name>[^/]+)$"
)


@dataclass(frozen=True)
class UploadPath:
    uid: str
    actor_id: str
    file_name: str


def parse_upload_path(object_name: str) -> UploadPath | None:
    """The owner, actor and file name of an upload, or None for other objects."""
    match = UPLOAD_PATTERN.match(object_name)
    if not match:
        return None
    return UploadPath(match["uid"], match["actor_id"], match["file_name"])


def upload_prefix(uid: str, actor_id: str) -> str:
    return f"users/{uid}/actors/{actor_id}/images/"


def upload_path(uid: str, actor_id: str, file_name: str) -> str:
    return upload_prefix(uid, actor_id) + file_name


def image_id(object_name: str) -> str:
    """Stable map key for an uploaded object (object names may hold dots)."""
    return hashlib.sha256(object_name.encode()).hexdigest()[:20]


def model_prefix(uid: str, actor_id: str, job_id: str) -> str:
    """Where a job's trained model is published; readable by its owner only."""
    return f"users/{uid}/actors/{actor_id}/models/{job_id}/"


class ArtifactName:
    """Files under :func:`model_prefix`; keys of the job's ``artifacts`` map."""

    LORA_DIFFUSERS = "pytorch_lora_weights.safetensors"  # diffusers/PEFT, with adapter metadata
    LORA_KOHYA = "lora_kohya.safetensors"  # A1111 / ComfyUI
    MODEL_CARD = "README.md"
    TRAINING_CONFIG = "training_config.json"
    SAMPLES_DIR = "samples/"


def checkpoint_prefix(job_id: str, attempt: int) -> str:
    """Training checkpoints of one attempt; service-only (rules deny users)."""
    return f"jobs/{job_id}/attempt-{attempt}/checkpoints/"


#: Trainer caches shared by every job and attempt (service-only: rules deny users).
#: Each entry is a folder named by a hash of what made it (see lora_trainer.caches).
CACHE_PREFIX: Final = "cache/"


def class_image_cache_prefix() -> str:
    """Latents of generated class images (prior preservation)."""
    return CACHE_PREFIX + "class-images/"


def compile_cache_prefix() -> str:
    """torch.compile's portable cache artifacts, by GPU type, torch version and shapes."""
    return CACHE_PREFIX + "compile/"


def model_cache_prefix() -> str:
    """Snapshots of Hugging Face base models, by repo id and revision."""
    return CACHE_PREFIX + "models/"


def executor_output_dir(bucket: str, job_id: str, attempt: int) -> str:
    """Vertex AI ``base_output_directory`` for one attempt."""
    return f"gs://{bucket}/jobs/{job_id}/attempt-{attempt}/vertex/"


# --------------------------------------------------------------------------
# Executor labels (idempotent submission)
# --------------------------------------------------------------------------
LABEL_JOB: Final = "actorgen-job"
LABEL_ATTEMPT: Final = "actorgen-attempt"
LABEL_APP: Final = "app"
LABEL_APP_VALUE: Final = "actorgen"


def job_label_value(job_id: str) -> str:
    """Label values must be lowercase [a-z0-9_-]{0,63}; Firestore ids are mixed case."""
    return "j" + hashlib.sha256(job_id.encode()).hexdigest()[:40]


def executor_labels(job_id: str, attempt: int) -> dict[str, str]:
    return {
        LABEL_APP: LABEL_APP_VALUE,
        LABEL_JOB: job_label_value(job_id),
        LABEL_ATTEMPT: str(attempt),
    }


LABEL_USER: Final = "actorgen-user"


def user_label_value(user_id: str) -> str:
    """Hashed owner label (per-user cost in billing exports without exposing the uid)."""
    return "u" + hashlib.sha256(user_id.encode()).hexdigest()[:40]


def executor_display_name(job_id: str, attempt: int) -> str:
    return f"actorgen-{job_id}-a{attempt}"


# --------------------------------------------------------------------------
# Trainer entry point (shared by Vertex and the LocalExecutor)
# --------------------------------------------------------------------------
TRAINER_MODULE: Final = "lora_trainer"
ENV_JOB_ID: Final = "ACTORGEN_JOB_ID"
ENV_ATTEMPT: Final = "ACTORGEN_ATTEMPT"
ENV_PROJECT: Final = "GOOGLE_CLOUD_PROJECT"
ENV_BUCKET: Final = "ACTORGEN_BUCKET"
#: Name of the Secret Manager secret with a Hugging Face token (gated base models); the
#: trainer reads the secret itself, so the token never appears in a job spec.
ENV_HF_TOKEN_SECRET: Final = "ACTORGEN_HF_TOKEN_SECRET"
#: "1" when the deployment opted in to pushing every trained LoRA to a private Hugging
#: Face Hub repo (functions param HF_PUSH_MODELS). A token alone never pushes: the
#: models are of users' faces.
ENV_HF_PUSH: Final = "ACTORGEN_HF_PUSH"
#: Extra trainer options for every job of a deployment (e.g. "--compile"), placed
#: before the command line's own, which win.
ENV_TRAINER_ARGS: Final = "ACTORGEN_TRAINER_ARGS"
#: Estimated USD per hour of the attempt's worker (machine + accelerators), set by the
#: dispatcher from the deployment's price table; the trainer turns its seconds into
#: ``estimatedCostUsd``. Unset or empty: no cost estimate, seconds only.
ENV_GPU_PRICE_PER_HOUR: Final = "ACTORGEN_GPU_PRICE_PER_HOUR"


def trainer_args(job_id: str, attempt: int) -> list[str]:
    """Command-line arguments of the trainer for one attempt."""
    return ["--job-id", job_id, "--attempt", str(attempt)]
