"""Configuration: every Firebase param of the codebase, and a plain ``Settings`` snapshot.

The params are declared once, here, at import time (``firebase deploy`` reads them
from the manifest and prompts for or takes them from ``functions/.env*``). Their
values are read only at run time, in :func:`load_settings`; the logic modules take a
:class:`Settings` value, so tests build one directly instead of touching the
environment.

Importing this module costs nothing beyond ``firebase_functions.params``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import TYPE_CHECKING, Final

from firebase_functions import params
from firebase_functions.params import (
    BoolParam,
    IntParam,
    ListParam,
    SelectInput,
    SelectOption,
    StringParam,
)

from actorgen import pricing

if TYPE_CHECKING:  # executors import nothing heavy either, but keep config standalone
    from actorgen.executors.settings import ExecutorSettings

#: Where the functions run. A deploy-time constant, not a param: the task-queue
#: client must address the same location, and a param here would have to be
#: resolved before the manifest exists.
FUNCTIONS_REGION = "us-central1"
#: Timeout of the two dispatching functions (dispatch_jobs, dispatchnow). A constant,
#: not a param: the decorators need it at deploy time, and the passes keep their
#: deadlines under it (dispatch.pass_deadline, reconcile.run_maintenance).
DISPATCH_FUNCTION_TIMEOUT_SECONDS = 300

#: The service account every function runs as: a param, so that each project names
#: its own, and never the default compute account (which has Editor on the project).
#: "name@" is the Firebase CLI's short form of name@PROJECT.iam.gserviceaccount.com.
FUNCTIONS_SERVICE_ACCOUNT = StringParam(
    "FUNCTIONS_SERVICE_ACCOUNT",
    default="actorgen-functions@",
    description="Service account the functions run as ('name@' means "
    "name@PROJECT.iam.gserviceaccount.com); its roles are listed in docs/deployment.md.",
)

# ---------------------------------------------------------------- executor
EXECUTOR = StringParam(
    "EXECUTOR",
    default="vertex",
    description="Where training runs: 'vertex' (Vertex AI CustomJob) or 'local' "
    "(a local process, for the emulators and the demo).",
    input=SelectInput([SelectOption("vertex"), SelectOption("local")]),
)
VERTEX_REGION = StringParam(
    "VERTEX_REGION",
    default="us-central1",
    description="Vertex AI region of the training jobs (must have the chosen GPU).",
)
#: Where cloudbuild.yaml pushes the trainer image (its _REPOSITORY and _IMAGE; the
#: README and a test keep the three in agreement):
#: ``{region}-docker.pkg.dev/{project}/actorgen/lora-trainer:{tag}``.
TRAINER_IMAGE_REPOSITORY: Final = "actorgen"
TRAINER_IMAGE_NAME: Final = "lora-trainer"
TRAINER_IMAGE_EXAMPLE: Final = (
    f"{FUNCTIONS_REGION}-docker.pkg.dev/PROJECT/{TRAINER_IMAGE_REPOSITORY}/"
    f"{TRAINER_IMAGE_NAME}:TAG"
)
TRAINER_IMAGE_URI = StringParam(
    "TRAINER_IMAGE_URI",
    default="",
    description="Artifact Registry URI of the trainer image built from trainer_image/ "
    f"(e.g. {TRAINER_IMAGE_EXAMPLE}; cloudbuild.yaml sets it to the image it pushed). "
    "Required for vertex.",
)
MACHINE_TYPE = StringParam(
    "MACHINE_TYPE",
    default="g2-standard-8",
    description="Compute Engine machine type of a training job.",
)
ACCELERATOR_TYPE = StringParam(
    "ACCELERATOR_TYPE",
    default="NVIDIA_L4",
    description="GPU type (Vertex AcceleratorType name, e.g. NVIDIA_L4, NVIDIA_TESLA_A100).",
)
ACCELERATOR_COUNT = IntParam(
    "ACCELERATOR_COUNT",
    default=1,
    description="GPUs per training job. The trainer trains on one GPU, so only 1 is "
    "accepted (more would be paid for and sit idle).",
)
SCHEDULING_STRATEGY = StringParam(
    "SCHEDULING_STRATEGY",
    default="STANDARD",
    description="Vertex scheduling: STANDARD (on-demand), SPOT (cheaper, preemptible) or "
    "FLEX_START (waits for capacity).",
    input=SelectInput(
        [SelectOption("STANDARD"), SelectOption("SPOT"), SelectOption("FLEX_START")]
    ),
)
VERTEX_PERSISTENT_RESOURCE_ID = StringParam(
    "VERTEX_PERSISTENT_RESOURCE_ID",
    default="",
    description="ID of a Vertex AI persistent resource (a warm pool of training machines in "
    "VERTEX_REGION) that every job runs on; empty (the default) starts fresh machines per "
    "job. A warm pool saves each job minutes of machine start-up and image pull, but it is "
    "billed for every hour it runs, busy or idle (estimatedCostUsd counts only the "
    "jobs' own time). Its pool must match MACHINE_TYPE, ACCELERATOR_TYPE and "
    "ACCELERATOR_COUNT, and it needs SCHEDULING_STRATEGY=STANDARD; see docs/deployment.md.",
)
TRAINING_TIMEOUT_SECONDS = IntParam(
    "TRAINING_TIMEOUT_SECONDS",
    default=4 * 3600,
    description="Hard limit of one training attempt; the executor stops it after this.",
)
TRAINER_SERVICE_ACCOUNT = StringParam(
    "TRAINER_SERVICE_ACCOUNT",
    default="",
    description="Service account the training job runs as (e.g. actorgen-trainer@ for "
    "actorgen-trainer@PROJECT.iam.gserviceaccount.com; roles in docs/deployment.md). "
    "Required for vertex: without it the trainer cannot reach Firestore or Storage.",
)
VERTEX_API_ENDPOINT = StringParam(
    "VERTEX_API_ENDPOINT",
    default="",
    description="Override of the Vertex API endpoint (host:port); empty derives it from "
    "VERTEX_REGION. Tests point it at a local fake.",
)
LOCAL_TRAINER_PYTHON = StringParam(
    "LOCAL_TRAINER_PYTHON",
    default="",
    description="Python interpreter that runs `python -m lora_trainer` for the local "
    "executor; empty uses the interpreter running the functions.",
)
LOCAL_WORKDIR = StringParam(
    "LOCAL_WORKDIR",
    default="",
    description="Folder of the local executor's attempts (logs, exit codes); empty uses "
    "<repo>/.local/executor.",
)
HF_TOKEN_SECRET = StringParam(
    "HF_TOKEN_SECRET",
    default="",
    description="Name of the Secret Manager secret holding a Hugging Face token for gated "
    "base models. Only the name travels to the trainer, which reads the secret itself; "
    "empty means public models only. Setting it never pushes models (see HF_PUSH_MODELS).",
)
HF_PUSH_MODELS = BoolParam(
    "HF_PUSH_MODELS",
    default=False,
    description="Also push every trained LoRA (a user's face) to a private Hugging Face Hub "
    "repo <token's user>/actorgen-lora-<job>; needs HF_TOKEN_SECRET with a write token. "
    "Off by default: the models stay in Cloud Storage only.",
)

GPU_PRICES = StringParam(
    "GPU_PRICES",
    default=pricing.DEFAULT_GPU_PRICES,
    description="Price table for each job's estimatedCostUsd: comma-separated KEY=USD per "
    "hour, keys being machine types (without GPUs) and accelerator types (one GPU); "
    "'SPOT:KEY=USD' entries win for SPOT jobs. Empty: GPU seconds only, no cost estimate.",
)

# ---------------------------------------------------------------- job intake
# Checked 2026-12-03 against diffusers 0.42.1's own documentation, which loads SD 1.5 from
# the community mirror stable-diffusion-v1-5/stable-diffusion-v1-5 (Runway deleted
# runwayml/stable-diffusion-v1-5 with its whole Hub organisation in August 2024).
ALLOWED_BASE_MODELS = ListParam(
    "ALLOWED_BASE_MODELS",
    default=[
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "stabilityai/stable-diffusion-xl-base-1.0",
    ],
    description="Base models a job may name in baseModelId (Hugging Face repo ids).",
)
MIN_IMAGES = IntParam(
    "MIN_IMAGES", default=5, description="Accepted photos an actor needs before training."
)
MAX_IMAGES = IntParam(
    "MAX_IMAGES", default=30, description="Most photos accepted per actor; later ones are rejected."
)

# ---------------------------------------------------------------- uploads
MIN_IMAGE_SIDE = IntParam(
    "MIN_IMAGE_SIDE",
    default=512,
    description="Shortest side, in pixels, of an accepted photo (after EXIF rotation).",
)
MAX_UPLOAD_BYTES = IntParam(
    "MAX_UPLOAD_BYTES",
    default=20 * 1024 * 1024,
    description="Largest accepted upload in bytes (storage.rules caps uploads too).",
)

# ---------------------------------------------------------------- dispatcher
MAX_RUNNING_JOBS = IntParam(
    "MAX_RUNNING_JOBS",
    default=4,
    description="Most training jobs holding a GPU (or about to) at once, all users together.",
)
MAX_RUNNING_JOBS_PER_USER = IntParam(
    "MAX_RUNNING_JOBS_PER_USER", default=1, description="Most running training jobs per user."
)
MAX_ATTEMPTS = IntParam(
    "MAX_ATTEMPTS",
    default=3,
    description="GPU attempts per job (failed, preempted, lost) before it ends as failed.",
)
DISPATCH_LEASE_SECONDS = IntParam(
    "DISPATCH_LEASE_SECONDS",
    default=300,
    description="How long a dispatcher owns a claimed job while it submits; after this "
    "another pass re-drives the (idempotent) submission.",
)
BACKOFF_BASE_SECONDS = IntParam(
    "BACKOFF_BASE_SECONDS",
    default=60,
    description="Delay before the second attempt; doubles with each further attempt.",
)
BACKOFF_MAX_SECONDS = IntParam(
    "BACKOFF_MAX_SECONDS", default=3600, description="Longest delay between attempts."
)

# ---------------------------------------------------------------- reconciler / sweeper
HEARTBEAT_TIMEOUT_SECONDS = IntParam(
    "HEARTBEAT_TIMEOUT_SECONDS",
    default=900,
    description="A running job whose trainer wrote no heartbeat for this long (counted from "
    "dispatch until the first one) is a failed attempt.",
)
SWEEP_AFTER_SECONDS = IntParam(
    "SWEEP_AFTER_SECONDS",
    default=180,
    description="Jobs still pending and uploads still unvalidated this long after creation "
    "are taken in by the sweeper (their trigger is presumed lost).",
)
SWEEP_MAX_AGE_SECONDS = IntParam(
    "SWEEP_MAX_AGE_SECONDS",
    default=7 * 24 * 3600,
    description="Uploads older than this are no longer swept (orphans stop being retried).",
)
TRAINER_ARGS = StringParam(
    "TRAINER_ARGS",
    default="",
    description="Extra `python -m lora_trainer` options for every job, e.g. '--compile "
    "regional' for long trainings, '--gpu-memory-gib 24' to plan memory for an L4 or "
    "'--checkpoint-every 100' (see the trainer's --help).",
)
UPLOAD_SWEEP_MAX_SECONDS = IntParam(
    "UPLOAD_SWEEP_MAX_SECONDS",
    default=60,
    description="Time budget of the per-minute upload sweep (listing and validating); it "
    "runs after reconcile and dispatch, and the next pass resumes where it stopped.",
)
UPLOAD_SWEEP_MAX_OBJECTS = IntParam(
    "UPLOAD_SWEEP_MAX_OBJECTS",
    default=20000,
    description="Most uploaded objects one upload sweep lists; the next pass resumes after them.",
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Plain values of the params above, taken at one moment.

    Defaults are the params' own defaults (read from the declarations, not from the
    environment), so ``Settings()`` in a test means "as deployed without overrides".
    """

    project: str = ""
    bucket: str = ""
    executor_kind: str = EXECUTOR.default
    vertex_region: str = VERTEX_REGION.default
    trainer_image_uri: str = TRAINER_IMAGE_URI.default
    machine_type: str = MACHINE_TYPE.default
    accelerator_type: str = ACCELERATOR_TYPE.default
    accelerator_count: int = ACCELERATOR_COUNT.default
    scheduling_strategy: str = SCHEDULING_STRATEGY.default
    vertex_persistent_resource_id: str = VERTEX_PERSISTENT_RESOURCE_ID.default
    training_timeout_seconds: int = TRAINING_TIMEOUT_SECONDS.default
    trainer_service_account: str = TRAINER_SERVICE_ACCOUNT.default
    vertex_api_endpoint: str = VERTEX_API_ENDPOINT.default
    local_trainer_python: str = LOCAL_TRAINER_PYTHON.default
    local_workdir: str = LOCAL_WORKDIR.default
    hf_token_secret: str = HF_TOKEN_SECRET.default
    hf_push_models: bool = HF_PUSH_MODELS.default
    trainer_args: str = TRAINER_ARGS.default
    gpu_prices: str = GPU_PRICES.default
    allowed_base_models: tuple[str, ...] = tuple(ALLOWED_BASE_MODELS.default)
    min_images: int = MIN_IMAGES.default
    max_images: int = MAX_IMAGES.default
    min_image_side: int = MIN_IMAGE_SIDE.default
    max_upload_bytes: int = MAX_UPLOAD_BYTES.default
    max_running_jobs: int = MAX_RUNNING_JOBS.default
    max_running_jobs_per_user: int = MAX_RUNNING_JOBS_PER_USER.default
    max_attempts: int = MAX_ATTEMPTS.default
    dispatch_lease_seconds: int = DISPATCH_LEASE_SECONDS.default
    backoff_base_seconds: int = BACKOFF_BASE_SECONDS.default
    backoff_max_seconds: int = BACKOFF_MAX_SECONDS.default
    heartbeat_timeout_seconds: int = HEARTBEAT_TIMEOUT_SECONDS.default
    sweep_after_seconds: int = SWEEP_AFTER_SECONDS.default
    sweep_max_age_seconds: int = SWEEP_MAX_AGE_SECONDS.default
    upload_sweep_max_seconds: int = UPLOAD_SWEEP_MAX_SECONDS.default
    upload_sweep_max_objects: int = UPLOAD_SWEEP_MAX_OBJECTS.default
    functions_region: str = FUNCTIONS_REGION

    def executor_settings(self) -> ExecutorSettings:
        """The executor's configuration (imported lazily: only dispatch needs it)."""
        from actorgen.executors.settings import ExecutorSettings
        from actorgen.schema import (
            ENV_GPU_PRICE_PER_HOUR,
            ENV_HF_PUSH,
            ENV_HF_TOKEN_SECRET,
            ENV_TRAINER_ARGS,
        )

        extra_env = {}
        if self.hf_token_secret:
            extra_env[ENV_HF_TOKEN_SECRET] = self.hf_token_secret
        if self.hf_push_models:
            extra_env[ENV_HF_PUSH] = "1"
        if self.trainer_args:
            extra_env[ENV_TRAINER_ARGS] = self.trainer_args
        price = self.worker_price_per_hour()
        if price is not None:
            extra_env[ENV_GPU_PRICE_PER_HOUR] = pricing.format_price(price)

        return ExecutorSettings(
            kind=self.executor_kind,
            project=self.project,
            region=self.vertex_region,
            bucket=self.bucket,
            trainer_image_uri=self.trainer_image_uri,
            machine_type=self.machine_type,
            accelerator_type=self.accelerator_type,
            accelerator_count=self.accelerator_count,
            scheduling_strategy=self.scheduling_strategy,
            persistent_resource_id=self.vertex_persistent_resource_id,
            timeout_seconds=self.training_timeout_seconds,
            service_account=service_account_email(self.trainer_service_account, self.project),
            api_endpoint=self.vertex_api_endpoint,
            local_python=self.local_trainer_python,
            local_workdir=self.local_workdir,
            extra_env=extra_env,
        )


    def worker_price_per_hour(self) -> float | None:
        """USD per hour of one training worker from GPU_PRICES; None without an estimate.

        A bad table must not stop training: it is logged (naming the entry) and jobs
        record GPU seconds without a cost.
        """
        try:
            table = pricing.parse_price_table(self.gpu_prices)
        except pricing.PriceTableError as err:
            logging.getLogger(__name__).error("%s; jobs get no cost estimate", err)
            return None
        price = pricing.worker_price_per_hour(
            table, self.machine_type, self.accelerator_type, self.accelerator_count,
            self.scheduling_strategy,
        )
        if price is None and table:
            logging.getLogger(__name__).warning(
                "GPU_PRICES has no price for %s / %s; jobs get no cost estimate",
                self.machine_type, self.accelerator_type,
            )
        return price


def load_settings() -> Settings:
    """Read every param now (run time only: never call this at import)."""
    return Settings(
        project=_project_id(),
        bucket=_default_bucket(),
        executor_kind=EXECUTOR.value.strip().lower(),
        vertex_region=VERTEX_REGION.value,
        trainer_image_uri=TRAINER_IMAGE_URI.value,
        machine_type=MACHINE_TYPE.value,
        accelerator_type=ACCELERATOR_TYPE.value,
        accelerator_count=ACCELERATOR_COUNT.value,
        scheduling_strategy=SCHEDULING_STRATEGY.value.strip().upper(),
        vertex_persistent_resource_id=VERTEX_PERSISTENT_RESOURCE_ID.value.strip(),
        training_timeout_seconds=TRAINING_TIMEOUT_SECONDS.value,
        trainer_service_account=TRAINER_SERVICE_ACCOUNT.value,
        vertex_api_endpoint=VERTEX_API_ENDPOINT.value,
        local_trainer_python=LOCAL_TRAINER_PYTHON.value,
        local_workdir=LOCAL_WORKDIR.value,
        hf_token_secret=HF_TOKEN_SECRET.value,
        hf_push_models=HF_PUSH_MODELS.value,
        trainer_args=TRAINER_ARGS.value.strip(),
        gpu_prices=GPU_PRICES.value.strip(),
        allowed_base_models=tuple(m.strip() for m in ALLOWED_BASE_MODELS.value if m.strip()),
        min_images=MIN_IMAGES.value,
        max_images=MAX_IMAGES.value,
        min_image_side=MIN_IMAGE_SIDE.value,
        max_upload_bytes=MAX_UPLOAD_BYTES.value,
        max_running_jobs=MAX_RUNNING_JOBS.value,
        max_running_jobs_per_user=MAX_RUNNING_JOBS_PER_USER.value,
        max_attempts=MAX_ATTEMPTS.value,
        dispatch_lease_seconds=DISPATCH_LEASE_SECONDS.value,
        backoff_base_seconds=BACKOFF_BASE_SECONDS.value,
        backoff_max_seconds=BACKOFF_MAX_SECONDS.value,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_SECONDS.value,
        sweep_after_seconds=SWEEP_AFTER_SECONDS.value,
        sweep_max_age_seconds=SWEEP_MAX_AGE_SECONDS.value,
        upload_sweep_max_seconds=UPLOAD_SWEEP_MAX_SECONDS.value,
        upload_sweep_max_objects=UPLOAD_SWEEP_MAX_OBJECTS.value,
    )


def service_account_email(value: str, project: str) -> str:
    """``name@`` -> ``name@PROJECT.iam.gserviceaccount.com`` (the Firebase CLI's short form,
    which FUNCTIONS_SERVICE_ACCOUNT takes too); anything else as it is."""
    value = value.strip()
    if value.endswith("@") and project:
        return f"{value}{project}.iam.gserviceaccount.com"
    return value


def _project_id() -> str:
    for name in ("GCLOUD_PROJECT", "GOOGLE_CLOUD_PROJECT"):
        if os.environ.get(name):
            return os.environ[name]
    return _firebase_config().get("projectId", "")


def _default_bucket() -> str:
    """The project's default bucket: the STORAGE_BUCKET built-in param, else FIREBASE_CONFIG."""
    bucket = params.STORAGE_BUCKET.value or _firebase_config().get("storageBucket", "")
    if not bucket and _project_id():
        bucket = f"{_project_id()}.appspot.com"
    return bucket


def _firebase_config() -> dict:
    raw = os.environ.get("FIREBASE_CONFIG", "")
    if raw.startswith("{"):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return {}
    return {}
