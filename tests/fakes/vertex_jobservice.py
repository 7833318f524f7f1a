"""A fake Vertex AI JobService: a real gRPC server on 127.0.0.1.

google-cloud-aiplatform ships no servicer stubs (no ``*_pb2_grpc``), so the
service is registered as a generic handler under its real full name,
``google.cloud.aiplatform.v1.JobService``, with the library's own proto-plus
messages as (de)serializers. The real ``JobServiceClient`` talks to it over the
wire exactly as it talks to Vertex.

It records every request, keeps custom jobs in memory, lets tests script job
states and errors, and can be restarted on the same port with or without its
state.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Self

import grpc
from google.cloud.aiplatform_v1 import (
    CancelCustomJobRequest,
    CreateCustomJobRequest,
    CustomJob,
    DeleteCustomJobRequest,
    GetCustomJobRequest,
    JobState,
    ListCustomJobsRequest,
    ListCustomJobsResponse,
)
from google.longrunning import operations_pb2
from google.protobuf import any_pb2, empty_pb2

SERVICE = "google.cloud.aiplatform.v1.JobService"

TERMINAL_STATES = frozenset(
    {
        JobState.JOB_STATE_SUCCEEDED,
        JobState.JOB_STATE_FAILED,
        JobState.JOB_STATE_CANCELLED,
        JobState.JOB_STATE_EXPIRED,
        JobState.JOB_STATE_PARTIALLY_SUCCEEDED,
    }
)
_PARENT = re.compile(r"^projects/[^/]+/locations/[^/]+$")
_STRING = r'"(?:[^"\\]|\\.)*"'
_TERM = re.compile(
    rf"\s*(?P<field>[A-Za-z_]+)(?:\.(?P<key>{_STRING}|[A-Za-z0-9_-]+))?"
    rf"\s*(?P<op>!=|=)\s*(?P<value>{_STRING}|[^\s\"]+)\s*"
)
_AND = re.compile(r"AND\s+")


class FilterError(ValueError):
    pass


def _unquote(token: str) -> str:
    if token.startswith('"'):
        return re.sub(r"\\(.)", r"\1", token[1:-1])
    return token


def parse_filter(text: str) -> list[tuple[str, str | None, str, str]]:
    """``field[.key] (=|!=) value`` terms joined by AND -> (field, key, op, value)."""
    terms: list[tuple[str, str | None, str, str]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TERM.match(text, pos)
        if not m:
            raise FilterError(f"cannot parse filter at {text[pos:]!r}")
        key = _unquote(m["key"]) if m["key"] else None
        terms.append((m["field"], key, m["op"], _unquote(m["value"])))
        pos = m.end()
        if pos < len(text):
            a = _AND.match(text, pos)
            if not a:
                raise FilterError(f"expected AND at {text[pos:]!r}")
            pos = a.end()
    return terms


@dataclass
class Fault:
    """An error the next matching call(s) answer with."""

    method: str
    code: grpc.StatusCode
    message: str
    times: int = 1  # -1: forever
    after_commit: bool = False  # do the work first, then fail (a lost answer)


class FakeJobService:
    """In-memory JobService served over real gRPC. Use as a context manager."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._ids = itertools.count(1_000_001)
        self._clock = itertools.count(1)
        self.jobs: dict[str, CustomJob] = {}
        self.requests: list[tuple[str, Any]] = []
        self.faults: list[Fault] = []
        #: A new job stays invisible to this many ListCustomJobs calls (eventual consistency).
        self.list_lag = 0
        #: Answer INVALID_ARGUMENT to any filter on labels (to test the fallback).
        self.reject_label_filters = False
        #: Cap on page size, to exercise paging.
        self.max_page_size = 100
        self._hidden: dict[str, int] = {}
        self._server: grpc.Server | None = None
        self.port = 0

    # ------------------------------------------------------------- lifecycle
    def start(self, port: int = 0) -> FakeJobService:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        server.add_generic_rpc_handlers((self._handler(),))
        bound = server.add_insecure_port(f"127.0.0.1:{port or self.port or 0}")
        if not bound:
            raise RuntimeError(f"could not bind 127.0.0.1:{port or self.port}")
        self.port = bound
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def restart(self, *, keep_state: bool = True) -> None:
        """Stop and serve again on the same port; optionally forget every job."""
        self.stop()
        if not keep_state:
            with self._lock:
                self.jobs.clear()
                self._hidden.clear()
        self.start(self.port)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------- scripting
    def inject(
        self,
        method: str,
        code: grpc.StatusCode,
        message: str = "injected",
        *,
        times: int = 1,
        after_commit: bool = False,
    ) -> None:
        """Make the next ``times`` calls of ``method`` (e.g. "CreateCustomJob") fail."""
        with self._lock:
            self.faults.append(Fault(method, code, message, times, after_commit))

    def set_state(self, name: str, state: JobState | str, error: str | None = None) -> None:
        """Move a job to ``state`` (a JobState or its name), optionally with an error."""
        st = JobState[state] if isinstance(state, str) else JobState(state)
        with self._lock:
            job = self.jobs[name]
            job.state = st
            now = self._now()
            job.update_time = now
            if st == JobState.JOB_STATE_RUNNING and not job.start_time:
                job.start_time = now
            if st in TERMINAL_STATES:
                job.end_time = now
            if error is not None:
                job.error.code = 13
                job.error.message = error

    def add_job(self, custom_job: CustomJob, parent: str) -> CustomJob:
        """Insert a job directly (bypassing the API), e.g. a leftover duplicate."""
        with self._lock:
            return self._insert(parent, custom_job)

    def calls(self, method: str) -> list[Any]:
        with self._lock:
            return [req for m, req in self.requests if m == method]

    # ------------------------------------------------------------- internals
    def _now(self) -> dt.datetime:
        # Strictly increasing timestamps: "newest" is well defined without sleeping.
        base = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
        return base + dt.timedelta(seconds=next(self._clock))

    def _insert(self, parent: str, custom_job: CustomJob) -> CustomJob:
        job = CustomJob(custom_job)
        job.name = f"{parent}/customJobs/{next(self._ids)}"
        job.state = JobState.JOB_STATE_PENDING
        job.create_time = self._now()
        job.update_time = job.create_time
        self.jobs[job.name] = job
        if self.list_lag:
            self._hidden[job.name] = self.list_lag
        return job

    def _fault(self, method: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.method == method and fault.times != 0:
                    if fault.times > 0:
                        fault.times -= 1
                    return fault
        return None

    def _wrap(self, method: str, fn: Callable[[Any, grpc.ServicerContext], Any]) -> Callable:
        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            with self._lock:
                self.requests.append((method, type(request)(request)))
            fault = self._fault(method)
            if fault and not fault.after_commit:
                context.abort(fault.code, fault.message)
            with self._lock:
                result = fn(request, context)
            if fault:
                context.abort(fault.code, fault.message)
            return result

        return handler

    def _handler(self) -> grpc.GenericRpcHandler:
        def unary(method: str, fn: Callable, req_cls: Any, resp_ser: Callable) -> Any:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap(method, fn),
                request_deserializer=req_cls.deserialize,
                response_serializer=resp_ser,
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "CreateCustomJob": unary(
                    "CreateCustomJob", self._create, CreateCustomJobRequest, CustomJob.serialize
                ),
                "GetCustomJob": unary(
                    "GetCustomJob", self._get, GetCustomJobRequest, CustomJob.serialize
                ),
                "ListCustomJobs": unary(
                    "ListCustomJobs",
                    self._list,
                    ListCustomJobsRequest,
                    ListCustomJobsResponse.serialize,
                ),
                "CancelCustomJob": unary(
                    "CancelCustomJob",
                    self._cancel,
                    CancelCustomJobRequest,
                    empty_pb2.Empty.SerializeToString,
                ),
                "DeleteCustomJob": unary(
                    "DeleteCustomJob",
                    self._delete,
                    DeleteCustomJobRequest,
                    operations_pb2.Operation.SerializeToString,
                ),
            },
        )

    def _job(self, name: str, context: grpc.ServicerContext) -> CustomJob:
        job = self.jobs.get(name)
        if job is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"CustomJob {name} not found")
        return job

    def _create(self, req: CreateCustomJobRequest, context: grpc.ServicerContext) -> CustomJob:
        if not _PARENT.match(req.parent):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad parent {req.parent!r}")
        cj = req.custom_job
        if not cj.display_name:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "display_name is required")
        pools = cj.job_spec.worker_pool_specs
        if not pools or not pools[0].container_spec.image_uri:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "worker_pool_specs[0] needs a container image"
            )
        return self._insert(req.parent, cj)

    def _get(self, req: GetCustomJobRequest, context: grpc.ServicerContext) -> CustomJob:
        return self._job(req.name, context)

    def _list(
        self, req: ListCustomJobsRequest, context: grpc.ServicerContext
    ) -> ListCustomJobsResponse:
        try:
            terms = parse_filter(req.filter) if req.filter else []
        except FilterError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self.reject_label_filters and any(t[0] == "labels" for t in terms):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unsupported filter on labels")
        matches = []
        for name, job in self.jobs.items():
            if not name.startswith(req.parent + "/"):
                continue
            if self._hidden.get(name, 0) > 0:
                continue
            if all(self._term_matches(job, t, context) for t in terms):
                matches.append(job)
        # Every list call ages the hidden jobs by one.
        for name in list(self._hidden):
            self._hidden[name] -= 1
            if self._hidden[name] <= 0:
                del self._hidden[name]
        start = int(req.page_token or 0)
        size = min(req.page_size or self.max_page_size, self.max_page_size)
        page = matches[start : start + size]
        token = str(start + size) if start + size < len(matches) else ""
        return ListCustomJobsResponse(custom_jobs=page, next_page_token=token)

    @staticmethod
    def _term_matches(
        job: CustomJob, term: tuple[str, str | None, str, str], context: grpc.ServicerContext
    ) -> bool:
        field, key, op, value = term
        if field == "labels" and key is not None:
            actual: str | None = job.labels.get(key)
        elif field == "display_name" and key is None:
            actual = job.display_name
        elif field == "state" and key is None:
            actual = JobState(job.state).name
        else:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported filter field {field}")
        return (actual == value) if op == "=" else (actual != value)

    def _cancel(self, req: CancelCustomJobRequest, context: grpc.ServicerContext) -> Any:
        job = self._job(req.name, context)
        if job.state in TERMINAL_STATES:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"CustomJob {req.name} is already in state {JobState(job.state).name}",
            )
        if job.state != JobState.JOB_STATE_CANCELLING:
            job.state = JobState.JOB_STATE_CANCELLING
            job.update_time = self._now()
        return empty_pb2.Empty()

    def _delete(self, req: DeleteCustomJobRequest, context: grpc.ServicerContext) -> Any:
        job = self._job(req.name, context)
        if job.state not in TERMINAL_STATES:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"CustomJob {req.name} is running; cancel it first",
            )
        del self.jobs[req.name]
        response = any_pb2.Any()
        response.Pack(empty_pb2.Empty())
        return operations_pb2.Operation(
            name=f"{req.name}/operations/{next(self._ids)}", done=True, response=response
        )
