"""Plain-value configuration of an executor.

``actorgen.config`` builds one from Firebase params; tests build one directly.
Nothing here imports Firebase or Google clients, so it costs nothing at cold start.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

KIND_VERTEX: Final = "vertex"
KIND_LOCAL: Final = "local"
KINDS: Final = (KIND_VERTEX, KIND_LOCAL)

SCHEDULING_STANDARD: Final = "STANDARD"
SCHEDULING_SPOT: Final = "SPOT"
SCHEDULING_FLEX_START: Final = "FLEX_START"
SCHEDULING_STRATEGIES: Final = (SCHEDULING_STANDARD, SCHEDULING_SPOT, SCHEDULING_FLEX_START)

#: GPUs the trainer can use: it is a single-process, single-device trainer.
MAX_ACCELERATORS_PER_JOB: Final = 1

#: Without its own service account the trainer runs as Vertex's service agent, which has
#: no access to the project's Firestore or Storage: every attempt would fail.
TRAINER_IDENTITY_MISSING: Final = (
    "the Vertex executor needs service_account, the trainer's identity (functions param "
    "TRAINER_SERVICE_ACCOUNT, e.g. actorgen-trainer@PROJECT.iam.gserviceaccount.com; "
    "roles in docs/deployment.md): without it the trainer cannot reach Firestore or Storage"
)

_LOOPBACK_NAMES: Final = frozenset({"localhost", "ip6-localhost"})

#: A PersistentResource ID, as CreatePersistentResourceRequest.persistent_resource_id
#: defines it (google.cloud.aiplatform_v1): at most 63 characters, lowercase letters,
#: digits and hyphens, starting with a letter. CustomJobSpec takes the ID, not the name.
_PERSISTENT_RESOURCE_ID: Final = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")

#: Scheduling strategies that only describe how Vertex obtains a job's own machines.
#: See persistent_resource_problems.
_PROVISIONING_STRATEGIES: Final = (SCHEDULING_SPOT, SCHEDULING_FLEX_START)


def persistent_resource_problems(
    persistent_resource_id: str, scheduling_strategy: str, reservation: str = ""
) -> list[str]:
    """Why a job cannot run on this persistent resource with these settings (no I/O).

    A CustomJob whose ``job_spec.persistent_resource_id`` is set "will be run on
    existing machines held by the PersistentResource instead of on-demand short-live
    machines" (aiplatform_v1 CustomJobSpec). Those machines exist from the resource's
    creation and are billed while it runs; its ResourcePool says which machines
    (machine spec, replica count, boot disk, autoscaling), and nothing in it selects
    spot or flex-start capacity. SPOT ("uses spot resources") and FLEX_START ("uses DWS
    to queue for resources"; max_wait_duration bounds the wait "for the requested
    resources to be provisioned") only choose how Vertex obtains a job's *own*
    machines, which never happens on a persistent resource. Neither the API reference
    nor the persistent-resource guides say what either means on one, so we refuse
    before submitting, naming the two params to reconcile. Dropping the strategy with a warning would leave an
    operator who asked for cheap preemptible GPUs paying for an on-demand pool, with
    jobs costed at SPOT prices. Reservations are refused for the same reason, and
    because Vertex's "use reservations with training" guide lists training on a
    persistent resource among what reservations do not support.
    """
    if not persistent_resource_id:
        return []
    out: list[str] = []
    if not _PERSISTENT_RESOURCE_ID.match(persistent_resource_id):
        hint = (
            " (give the last part of projects/P/locations/R/persistentResources/ID only)"
            if "/" in persistent_resource_id
            else ""
        )
        out.append(
            "persistent_resource_id (functions param VERTEX_PERSISTENT_RESOURCE_ID) must be "
            "a persistent resource ID: up to 63 lowercase letters, digits and hyphens, "
            f"starting with a letter{hint}; got {persistent_resource_id!r}"
        )
    if scheduling_strategy in _PROVISIONING_STRATEGIES:
        out.append(
            f"scheduling_strategy {scheduling_strategy} cannot be combined with a persistent "
            f"resource ({persistent_resource_id!r}): jobs on it run on machines the resource "
            "already holds, so there is nothing to provision as spot or flex-start. Set the "
            "functions param SCHEDULING_STRATEGY to STANDARD, or clear "
            "VERTEX_PERSISTENT_RESOURCE_ID to get fresh machines per job"
        )
    if reservation:
        out.append(
            f"reservation {reservation!r} cannot be combined with a persistent resource "
            f"({persistent_resource_id!r}): a job on it runs on the resource's machines, "
            "and Vertex does not support reservations with persistent resources for "
            "training; clear the reservation or VERTEX_PERSISTENT_RESOURCE_ID"
        )
    return out


@dataclass(frozen=True)
class ExecutorSettings:
    """Everything an executor needs, as plain values.

    Vertex fields are ignored by the local executor and vice versa. Empty strings
    mean "not set" so that Firebase string params map over directly.
    """

    kind: str = KIND_LOCAL
    # -- shared --
    project: str = ""
    bucket: str = ""
    #: Extra environment for the trainer (both executors); schema ENV_* always win.
    extra_env: Mapping[str, str] = field(default_factory=dict, hash=False)
    # -- vertex --
    region: str = "us-central1"
    trainer_image_uri: str = ""
    machine_type: str = "g2-standard-8"
    accelerator_type: str = "NVIDIA_L4"  # aiplatform_v1.AcceleratorType name; "" for none
    accelerator_count: int = 1
    scheduling_strategy: str = SCHEDULING_STANDARD
    timeout_seconds: int = 2 * 3600
    #: FLEX_START only: how long Vertex may wait for capacity (0 = Vertex's default).
    max_wait_seconds: int = 0
    service_account: str = ""  # the trainer's identity; required for vertex
    network: str = ""  # projects/{number}/global/networks/{name}; "" = none
    reservation: str = ""  # a Compute Engine reservation name (SPECIFIC_RESERVATION)
    #: The ID of a Vertex AI PersistentResource (a warm pool) in this project and region
    #: that every job runs on; "" = fresh machines per job. Its pool must match the
    #: machine spec above (Vertex rejects the job otherwise); see
    #: persistent_resource_problems for the settings it excludes.
    persistent_resource_id: str = ""
    api_endpoint: str = ""  # "" = f"{region}-aiplatform.googleapis.com"
    anonymous_credentials: bool = False  # tests against the fake JobService only
    restart_job_on_worker_restart: bool = True
    #: Per-RPC deadline and the total time spent retrying transient errors of one call.
    rpc_timeout_seconds: float = 20.0
    retry_deadline_seconds: float = 30.0
    # -- local --
    local_python: str = ""  # "" = the interpreter running the functions
    local_workdir: str = ""  # "" = <repo>/.local/executor
    local_module: str = ""  # "" = schema.TRAINER_MODULE (tests point this at a fake)
    #: Prepended to the trainer's PYTHONPATH (before trainer_image/ and functions/).
    local_pythonpath: tuple[str, ...] = ()
    #: How long cancel() waits after SIGTERM before it sends SIGKILL.
    local_cancel_grace_seconds: float = 5.0

    def __post_init__(self) -> None:
        # Freeze the mapping too, so a settings object can be shared across threads.
        object.__setattr__(self, "extra_env", MappingProxyType(dict(self.extra_env)))
        object.__setattr__(self, "local_pythonpath", tuple(self.local_pythonpath))

    @property
    def endpoint(self) -> str:
        """The Vertex AI API endpoint (regional unless overridden)."""
        return self.api_endpoint or f"{self.region}-aiplatform.googleapis.com"

    @property
    def endpoint_is_loopback(self) -> bool:
        """True for a fake JobService on this machine (plain-text gRPC is fine there)."""
        host = self.endpoint.rsplit(":", 1)[0] if ":" in self.endpoint else self.endpoint
        host = host.strip("[]")
        if host in _LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"

    def replace(self, **changes: object) -> ExecutorSettings:
        """A copy with some fields changed (handy in tests and config)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def problems(self) -> list[str]:
        """Human-readable configuration errors for this kind; empty when usable."""
        out: list[str] = []
        if self.kind not in KINDS:
            out.append(f"executor kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
            return out
        if self.kind == KIND_VERTEX:
            for name in ("project", "region", "bucket", "trainer_image_uri", "machine_type"):
                if not getattr(self, name):
                    out.append(f"the Vertex executor needs {name} to be set")
            if not self.service_account:
                out.append(TRAINER_IDENTITY_MISSING)
            if self.scheduling_strategy not in SCHEDULING_STRATEGIES:
                out.append(
                    f"scheduling_strategy must be one of {', '.join(SCHEDULING_STRATEGIES)}, "
                    f"got {self.scheduling_strategy!r}"
                )
            if self.accelerator_count < 0:
                out.append(f"accelerator_count must be >= 0, got {self.accelerator_count}")
            if self.accelerator_type and self.accelerator_count == 0:
                out.append(f"accelerator_type {self.accelerator_type} needs accelerator_count >= 1")
            if self.accelerator_count > MAX_ACCELERATORS_PER_JOB:
                # The trainer runs one process on one device: extra GPUs would be billed idle.
                out.append(
                    f"accelerator_count is {self.accelerator_count}, but the trainer trains "
                    f"on one GPU; set ACCELERATOR_COUNT to {MAX_ACCELERATORS_PER_JOB} (a "
                    "faster GPU type, not more of them, speeds a job up)"
                )
            if self.timeout_seconds <= 0:
                out.append(f"timeout_seconds must be > 0, got {self.timeout_seconds}")
            if self.max_wait_seconds < 0:
                out.append(f"max_wait_seconds must be >= 0, got {self.max_wait_seconds}")
            out.extend(
                persistent_resource_problems(
                    self.persistent_resource_id, self.scheduling_strategy, self.reservation
                )
            )
            if self.trainer_image_uri and (
                " " in self.trainer_image_uri or "/" not in self.trainer_image_uri
            ):
                out.append(
                    "trainer_image_uri must be a full image reference such as "
                    "us-docker.pkg.dev/PROJECT/REPO/trainer:TAG, "
                    f"got {self.trainer_image_uri!r}"
                )
        return out
