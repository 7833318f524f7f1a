"""Run training attempts as Vertex AI CustomJobs.

``google.cloud.aiplatform_v1`` is imported on the first API call, never at module
import: it costs seconds of cold start that most function invocations never need.
"""

from __future__ import annotations

import logging
import re
import threading
import zlib
from typing import TYPE_CHECKING, Any

from .. import schema
from .base import ExecutorError, ExecutorJob, ExecutorNotFound, ExecutorState, SubmitRequest
from .settings import KIND_VERTEX, SCHEDULING_FLEX_START, ExecutorSettings

if TYPE_CHECKING:  # pragma: no cover - typing only
    from google.cloud.aiplatform_v1 import CustomJob, JobServiceClient

log = logging.getLogger(__name__)

#: Vertex JobState name -> executor state. PAUSED and UNSPECIFIED map to UNKNOWN
#: (not terminal): the reconciler keeps watching the trainer's heartbeat instead.
STATE_MAP: dict[str, ExecutorState] = {
    "JOB_STATE_QUEUED": ExecutorState.QUEUED,
    "JOB_STATE_PENDING": ExecutorState.QUEUED,
    "JOB_STATE_RUNNING": ExecutorState.RUNNING,
    "JOB_STATE_UPDATING": ExecutorState.RUNNING,
    "JOB_STATE_SUCCEEDED": ExecutorState.SUCCEEDED,
    # A single-replica job cannot partially succeed; treat it as not done. A trainer
    # that did report completion still wins in the reconciler.
    "JOB_STATE_PARTIALLY_SUCCEEDED": ExecutorState.FAILED,
    "JOB_STATE_FAILED": ExecutorState.FAILED,
    # Once cancelling starts the attempt is lost; no need to wait for CANCELLED.
    "JOB_STATE_CANCELLING": ExecutorState.CANCELLED,
    "JOB_STATE_CANCELLED": ExecutorState.CANCELLED,
    "JOB_STATE_EXPIRED": ExecutorState.EXPIRED,
    "JOB_STATE_PAUSED": ExecutorState.UNKNOWN,
    "JOB_STATE_UNSPECIFIED": ExecutorState.UNKNOWN,
}

_JOB_NAME = re.compile(r"^projects/[^/]+/locations/[^/]+/customJobs/[^/]+$")
_RESERVATION_KEY = "compute.googleapis.com/reservation-name"
_LIST_PAGE_SIZE = 50
_CREATE = "create the custom job"  # the action named in create errors

# Two dispatches of the same attempt inside one process (threads, or two executor
# objects) must not both get past find(); striped locks keep the table bounded.
# Across processes the dispatcher's Firestore lease is what serialises submits.
_SUBMIT_LOCKS = tuple(threading.Lock() for _ in range(64))


def _submit_lock(parent: str, job_id: str, attempt: int) -> threading.Lock:
    key = f"{parent}\0{job_id}\0{attempt}".encode()
    return _SUBMIT_LOCKS[zlib.crc32(key) % len(_SUBMIT_LOCKS)]


def _quote(value: str) -> str:
    """A filter string literal (AIP-160)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def label_filter(job_id: str, attempt: int) -> str:
    """The list filter that selects one attempt's jobs by their labels.

    Keys are quoted because ours contain hyphens; Vertex documents quoted keys.
    """
    labels = schema.executor_labels(job_id, attempt)
    return " AND ".join(f"labels.{_quote(k)}={_quote(v)}" for k, v in sorted(labels.items()))


def display_name_filter(job_id: str, attempt: int) -> str:
    return f"display_name={_quote(schema.executor_display_name(job_id, attempt))}"


class VertexExecutor:
    """Submits, looks up and cancels Vertex AI CustomJobs through ``JobServiceClient``."""

    kind = KIND_VERTEX

    def __init__(self, settings: ExecutorSettings) -> None:
        self.settings = settings
        self._client: JobServiceClient | None = None
        self._client_lock = threading.Lock()
        # Set once Vertex refused our label filter; then we look up by display name.
        self._label_filter_rejected = False

    # ------------------------------------------------------------------ client
    @property
    def client(self) -> JobServiceClient:
        """The JobServiceClient, created on first use and reused (one channel)."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self) -> JobServiceClient:
        s = self.settings
        try:
            from google.api_core.client_options import ClientOptions
            from google.cloud.aiplatform_v1 import JobServiceClient
            from google.cloud.aiplatform_v1.services.job_service.transports import (
                JobServiceGrpcTransport,
            )

            if s.endpoint_is_loopback:
                # A fake JobService in tests or a local proxy: plain-text gRPC, no
                # credentials, and quick reconnects after the fake restarts.
                import grpc

                channel = grpc.insecure_channel(
                    s.endpoint,
                    options=[
                        ("grpc.initial_reconnect_backoff_ms", 100),
                        ("grpc.min_reconnect_backoff_ms", 100),
                        ("grpc.max_reconnect_backoff_ms", 1000),
                    ],
                )
                return JobServiceClient(transport=JobServiceGrpcTransport(channel=channel))
            credentials = None
            if s.anonymous_credentials:
                from google.auth.credentials import AnonymousCredentials

                credentials = AnonymousCredentials()
            return JobServiceClient(
                credentials=credentials, client_options=ClientOptions(api_endpoint=s.endpoint)
            )
        except Exception as exc:
            raise _map_error(exc, "connect to Vertex AI", s) from exc

    def _retry(self) -> Any:
        """Client-side retry for idempotent calls: transient codes only, bounded in time."""
        from google.api_core import exceptions as gexc
        from google.api_core.retry import Retry, if_exception_type

        return Retry(
            predicate=if_exception_type(*_transient_types(gexc)),
            initial=0.2,
            maximum=4.0,
            multiplier=2.0,
            timeout=self.settings.retry_deadline_seconds,
        )

    # ------------------------------------------------------------------ API
    def find(self, job_id: str, attempt: int) -> ExecutorJob | None:
        """The CustomJob of this attempt: the live one, else the newest that ended.

        An attempt has at most one live job: when a lost create answer and a retried
        submit made two, the one that got furthest (running, then the oldest) is kept
        and the others are cancelled, so none is left behind on a GPU.
        """
        jobs = self._list_attempt_jobs(job_id, attempt)
        if not jobs:
            return None
        # Newest first: list has no order_by for custom jobs.
        jobs.sort(key=lambda j: j.create_time.timestamp() if j.create_time else 0.0, reverse=True)
        views = [self._to_job(j) for j in jobs]
        if len(views) > 1:
            log.warning(
                "found %d Vertex jobs for job %s attempt %d: %s",
                len(views),
                job_id,
                attempt,
                [v.name for v in views],
            )
        live = [v for v in views if v.state.is_active]
        if not live:
            return views[0]
        running = [v for v in live if v.state is ExecutorState.RUNNING]
        keep = (running or live)[-1]  # newest first: the oldest running (else queued) one
        for extra in live:
            if extra.name != keep.name:
                log.warning("job %s attempt %d: cancelling duplicate Vertex job %s (keeping %s)",
                            job_id, attempt, extra.name, keep.name)
                self.cancel(extra.name)
        return keep

    def submit(self, request: SubmitRequest) -> ExecutorJob:
        """Create the CustomJob for this attempt unless one already exists."""
        problems = self.settings.problems()
        if problems:
            raise ExecutorError(
                "the Vertex executor is misconfigured: " + "; ".join(problems), retryable=False
            )
        custom_job = self.build_custom_job(request)
        with _submit_lock(self.settings.parent, request.job_id, request.attempt):
            existing = self.find(request.job_id, request.attempt)
            if existing is not None and not existing.state.is_active:
                # An ended job of this attempt number (its trainer stopped, e.g. the job
                # was re-queued after a lost create answer) is not this submission's:
                # adopting it would waste the attempt. Start the attempt afresh.
                log.info("job %s attempt %d: Vertex job %s already ended (%s); creating a "
                         "new one", request.job_id, request.attempt, existing.name,
                         existing.raw_state)
                existing = None
            if existing is not None:
                log.info(
                    "job %s attempt %d already on Vertex as %s",
                    request.job_id,
                    request.attempt,
                    existing.name,
                )
                return existing
            return self._create(request, custom_job)

    def _create(self, request: SubmitRequest, custom_job: CustomJob) -> ExecutorJob:
        from google.api_core import exceptions as gexc

        try:
            # No automatic retry: a create whose answer was lost may have succeeded,
            # and a blind retry would start a second GPU job.
            created = self.client.create_custom_job(
                parent=self.settings.parent,
                custom_job=custom_job,
                retry=None,
                timeout=self.settings.rpc_timeout_seconds,
            )
        except gexc.AlreadyExists as exc:
            found = self._find_after_error(request)
            if found is not None:
                return found
            raise ExecutorError(
                f"Vertex AI says the job for {request.job_id} attempt {request.attempt} "
                f"already exists but it cannot be listed yet ({exc.message}); try again shortly",
                retryable=True,
            ) from exc
        except Exception as exc:
            err = _map_error(exc, _CREATE, self.settings)
            if err.retryable:
                # The request may have reached Vertex before the failure.
                found = self._find_after_error(request)
                if found is not None:
                    return found
            raise err from exc
        job = self._to_job(created)
        on = (
            f" on persistent resource {self.settings.persistent_resource_id}"
            if self.settings.persistent_resource_id
            else ""
        )
        log.info(
            "submitted job %s attempt %d to Vertex as %s%s",
            request.job_id, request.attempt, job.name, on,
        )
        return job

    def _find_after_error(self, request: SubmitRequest) -> ExecutorJob | None:
        """The job a failed create may have made (live); None when it cannot be seen."""
        try:
            found = self.find(request.job_id, request.attempt)
        except ExecutorError as exc:
            log.warning("lookup after a failed create failed too: %s", exc)
            return None
        return found if found is not None and found.state.is_active else None

    def get(self, name: str) -> ExecutorJob:
        """The CustomJob's state; ExecutorNotFound when it does not exist."""
        from google.api_core import exceptions as gexc

        if not _JOB_NAME.match(name):
            raise ExecutorNotFound(f"{name!r} is not a Vertex AI custom job name")
        try:
            job = self.client.get_custom_job(
                name=name, retry=self._retry(), timeout=self.settings.rpc_timeout_seconds
            )
        except gexc.NotFound as exc:
            raise ExecutorNotFound(f"Vertex AI custom job {name} does not exist") from exc
        except Exception as exc:
            raise _map_error(exc, f"read custom job {name}", self.settings) from exc
        return self._to_job(job)

    def cancel(self, name: str) -> None:
        """Cancel the CustomJob; a finished or missing job is left alone."""
        from google.api_core import exceptions as gexc

        if not _JOB_NAME.match(name):
            log.info("cancel: %r is not a Vertex AI custom job name; nothing to cancel", name)
            return
        try:
            self.client.cancel_custom_job(
                name=name, retry=self._retry(), timeout=self.settings.rpc_timeout_seconds
            )
        except gexc.NotFound:
            log.info("cancel: Vertex AI custom job %s does not exist", name)
            return
        except gexc.FailedPrecondition as exc:
            # Vertex refuses to cancel a job that already ended: that is success here.
            try:
                job = self.get(name)
            except ExecutorNotFound:
                return
            if job.state.is_terminal:
                return
            raise _map_error(exc, f"cancel custom job {name}", self.settings) from exc
        except Exception as exc:
            raise _map_error(exc, f"cancel custom job {name}", self.settings) from exc
        log.info("cancel requested for Vertex AI custom job %s", name)

    # ------------------------------------------------------------------ helpers
    def _list_attempt_jobs(self, job_id: str, attempt: int) -> list[CustomJob]:
        from google.api_core import exceptions as gexc

        want_labels = schema.executor_labels(job_id, attempt)
        want_name = schema.executor_display_name(job_id, attempt)
        if not self._label_filter_rejected:
            try:
                jobs = self._list(label_filter(job_id, attempt))
            except gexc.InvalidArgument as exc:
                # Should Vertex ever reject the quoted-key label filter, fall back to the
                # display name (also unique per attempt) instead of breaking dispatch.
                log.warning("Vertex rejected the label filter (%s); using display_name", exc)
                self._label_filter_rejected = True
                jobs = None
            except Exception as exc:
                raise _map_error(exc, "list custom jobs", self.settings) from exc
            if jobs is not None:
                return _matching(jobs, want_labels, want_name)
        try:
            jobs = self._list(display_name_filter(job_id, attempt))
        except Exception as exc:
            raise _map_error(exc, "list custom jobs", self.settings) from exc
        return _matching(jobs, want_labels, want_name)

    def _list(self, filter_: str) -> list[CustomJob]:
        pager = self.client.list_custom_jobs(
            request={
                "parent": self.settings.parent,
                "filter": filter_,
                "page_size": _LIST_PAGE_SIZE,
            },
            retry=self._retry(),
            timeout=self.settings.rpc_timeout_seconds,
        )
        return list(pager)

    def build_custom_job(self, request: SubmitRequest) -> CustomJob:
        """The CustomJob message for one attempt (no I/O)."""
        from google.cloud import aiplatform_v1 as aip
        from google.protobuf import duration_pb2

        s = self.settings
        env = {
            **s.extra_env,
            **request.env,
            schema.ENV_JOB_ID: request.job_id,
            schema.ENV_ATTEMPT: str(request.attempt),
            schema.ENV_BUCKET: s.bucket,
            schema.ENV_PROJECT: s.project,
        }
        machine_spec = aip.MachineSpec(machine_type=s.machine_type)
        if s.accelerator_type and s.accelerator_count:
            try:
                machine_spec.accelerator_type = aip.AcceleratorType[s.accelerator_type]
            except KeyError:
                names = ", ".join(n for n in aip.AcceleratorType.__members__ if "NVIDIA" in n)
                raise ExecutorError(
                    f"unknown accelerator_type {s.accelerator_type!r}; use one of {names}",
                    retryable=False,
                ) from None
            machine_spec.accelerator_count = s.accelerator_count
        if s.reservation:
            machine_spec.reservation_affinity = aip.ReservationAffinity(
                reservation_affinity_type=aip.ReservationAffinity.Type.SPECIFIC_RESERVATION,
                key=_RESERVATION_KEY,
                values=[s.reservation],
            )
        scheduling = aip.Scheduling(
            timeout=duration_pb2.Duration(seconds=s.timeout_seconds),
            restart_job_on_worker_restart=s.restart_job_on_worker_restart,
            strategy=aip.Scheduling.Strategy[s.scheduling_strategy],
        )
        if s.scheduling_strategy == SCHEDULING_FLEX_START and s.max_wait_seconds:
            scheduling.max_wait_duration = duration_pb2.Duration(seconds=s.max_wait_seconds)
        labels = schema.executor_labels(request.job_id, request.attempt)
        if request.user_id:
            labels[schema.LABEL_USER] = schema.user_label_value(request.user_id)
        job_spec = aip.CustomJobSpec(
            worker_pool_specs=[
                aip.WorkerPoolSpec(
                    machine_spec=machine_spec,
                    replica_count=1,
                    container_spec=aip.ContainerSpec(
                        image_uri=s.trainer_image_uri,
                        args=schema.trainer_args(request.job_id, request.attempt),
                        env=[aip.EnvVar(name=k, value=v) for k, v in sorted(env.items())],
                    ),
                )
            ],
            scheduling=scheduling,
            # "" leaves it unset: fresh machines for this job. Set, the job runs on the
            # warm pool, whose resource pool must match machine_spec exactly (machine
            # type, GPUs, and the default pd-ssd boot disk) or Vertex rejects the job.
            persistent_resource_id=s.persistent_resource_id,
            service_account=s.service_account,
            network=s.network,
            base_output_directory=aip.GcsDestination(
                output_uri_prefix=schema.executor_output_dir(
                    s.bucket, request.job_id, request.attempt
                )
            ),
        )
        return aip.CustomJob(
            display_name=schema.executor_display_name(request.job_id, request.attempt),
            labels=labels,
            job_spec=job_spec,
        )

    @staticmethod
    def _to_job(job: CustomJob) -> ExecutorJob:
        raw = _state_name(job.state)
        state = STATE_MAP.get(raw, ExecutorState.UNKNOWN)
        error = job.error.message if job.error and job.error.message else None
        if error is None and state.is_failure:
            error = {
                ExecutorState.EXPIRED: "Vertex AI could not start the job before it expired "
                "(no GPU capacity within the wait time)",
                ExecutorState.CANCELLED: "the Vertex AI job was cancelled",
            }.get(state, f"the Vertex AI job ended in {raw}")
        return ExecutorJob(name=job.name, state=state, error=error, raw_state=raw)


def _state_name(state: Any) -> str:
    name = getattr(state, "name", None)
    if name:
        return str(name)
    from google.cloud.aiplatform_v1 import JobState

    try:
        return JobState(int(state)).name
    except ValueError:
        return f"JOB_STATE_{int(state)}"


def _matching(jobs: list[CustomJob], labels: dict[str, str], display_name: str) -> list[CustomJob]:
    """Keep jobs whose labels and display name really are this attempt's (trust, but verify)."""
    return [
        j
        for j in jobs
        if j.display_name == display_name and all(j.labels.get(k) == v for k, v in labels.items())
    ]


def _transient_types(gexc: Any) -> tuple[type[BaseException], ...]:
    return (
        gexc.ServiceUnavailable,
        gexc.DeadlineExceeded,
        gexc.InternalServerError,
        gexc.ResourceExhausted,
        gexc.Aborted,
        gexc.Unknown,
        gexc.BadGateway,
        gexc.GatewayTimeout,
    )


def _persistent_resource_hint(s: ExecutorSettings) -> str:
    """What to check about the warm pool when Vertex refuses a job; "" without one."""
    if not s.persistent_resource_id:
        return ""
    return (
        f", and the persistent resource {s.persistent_resource_id!r} "
        f"(VERTEX_PERSISTENT_RESOURCE_ID): it must exist in {s.parent}, be RUNNING, have a "
        f"resource pool whose machine type, accelerator and boot disk match the job's exactly "
        f"(MACHINE_TYPE, ACCELERATOR_TYPE, ACCELERATOR_COUNT; pd-ssd), the same network, and "
        f"custom service accounts enabled (--enable-custom-service-account)"
    )


def _map_error(exc: BaseException, action: str, s: ExecutorSettings) -> ExecutorError:
    """A client exception as an ExecutorError whose message says what to do."""
    from google.api_core import exceptions as gexc

    if isinstance(exc, ExecutorError):
        return exc
    where = f"in {s.parent} via {s.endpoint}"
    # Only a create involves the pool; reads and cancels of existing jobs do not.
    pool = _persistent_resource_hint(s) if action == _CREATE else ""
    if isinstance(exc, gexc.RetryError):
        cause = exc.cause if exc.cause is not None else exc
        return ExecutorError(
            f"Vertex AI did not answer while trying to {action} {where} "
            f"(gave up after {s.retry_deadline_seconds:g}s): {cause}",
            retryable=True,
        )
    if isinstance(exc, gexc.GoogleAPICallError):
        msg = exc.message or str(exc)
        if isinstance(exc, gexc.ResourceExhausted):
            return ExecutorError(
                f"Vertex AI quota exhausted while trying to {action} {where}: {msg}. "
                f"It is retried; if it persists, raise the custom-training quota for "
                f"{s.accelerator_type or s.machine_type} in {s.region}",
                retryable=True,
            )
        if isinstance(exc, _transient_types(gexc)):
            return ExecutorError(
                f"Vertex AI is unavailable ({exc.__class__.__name__}) while trying to {action} "
                f"{where}: {msg}",
                retryable=True,
            )
        if isinstance(exc, gexc.PermissionDenied):
            sa = (
                f" and roles/iam.serviceAccountUser on the trainer service account "
                f"{s.service_account}"
                if s.service_account
                else ""
            )
            return ExecutorError(
                f"Vertex AI denied permission to {action} {where}: {msg}. Make sure the "
                f"Vertex AI API (aiplatform.googleapis.com) is enabled in project {s.project} "
                f"and the Cloud Functions service account has roles/aiplatform.user there{sa}",
                retryable=False,
            )
        if isinstance(exc, gexc.Unauthenticated):
            return ExecutorError(
                f"Vertex AI rejected our credentials while trying to {action} {where}: {msg}",
                retryable=False,
            )
        if isinstance(exc, gexc.InvalidArgument):
            accel = f"{s.accelerator_type} x{s.accelerator_count}" if s.accelerator_type else "none"
            return ExecutorError(
                f"Vertex AI rejected the request to {action} {where}: {msg}. Check the executor "
                f"settings: trainer image URI {s.trainer_image_uri!r}, machine type "
                f"{s.machine_type!r}, accelerator {accel} (must be offered in {s.region}), "
                f"scheduling {s.scheduling_strategy}, service account "
                f"{s.service_account or '(default)'}, network {s.network or '(none)'}{pool}",
                retryable=False,
            )
        if isinstance(exc, gexc.FailedPrecondition):
            return ExecutorError(
                f"Vertex AI cannot {action} {where} in its current state: {msg}. Check that the "
                f"Vertex AI API is enabled and the project's billing and region settings{pool}",
                retryable=False,
            )
        if isinstance(exc, gexc.NotFound):
            return ExecutorError(
                f"Vertex AI could not find what was needed to {action} {where}: {msg}. Check the "
                f"project ({s.project!r}) and region ({s.region!r}) settings{pool}",
                retryable=False,
            )
        return ExecutorError(
            f"Vertex AI refused to {action} {where} ({exc.__class__.__name__}): {msg}",
            retryable=False,
        )
    # google.auth errors carry their own notion of retryability (metadata server hiccups).
    try:
        from google.auth import exceptions as auth_exc
    except ImportError:  # pragma: no cover
        auth_exc = None  # type: ignore[assignment]
    if auth_exc is not None and isinstance(exc, auth_exc.GoogleAuthError):
        if isinstance(exc, auth_exc.DefaultCredentialsError):
            return ExecutorError(
                f"no Google credentials to {action} {where}: {exc}. On Cloud Functions the "
                f"runtime service account is used; locally run `gcloud auth application-default "
                f"login`",
                retryable=False,
            )
        retryable = bool(getattr(exc, "retryable", False)) or isinstance(
            exc, auth_exc.TransportError
        )
        return ExecutorError(
            f"could not obtain Google credentials to {action} {where}: {exc}", retryable=retryable
        )
    return ExecutorError(
        f"unexpected error while trying to {action} {where}: {exc.__class__.__name__}: {exc}",
        retryable=False,
    )
