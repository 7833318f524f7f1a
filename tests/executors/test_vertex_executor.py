"""VertexExecutor through the real aiplatform_v1 client against a fake JobService over gRPC."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest
from actorgen import schema
from actorgen.executors import (
    ExecutorError,
    ExecutorNotFound,
    ExecutorSettings,
    ExecutorState,
    SubmitRequest,
    build_executor,
)
from actorgen.executors.vertex import VertexExecutor, display_name_filter, label_filter
from google.cloud.aiplatform_v1 import AcceleratorType, CustomJob, JobState, Scheduling

from tests.fakes.vertex_jobservice import FakeJobService, parse_filter

PROJECT = "demo-actorgen"
REGION = "europe-west4"
PARENT = f"projects/{PROJECT}/locations/{REGION}"
IMAGE = "europe-west4-docker.pkg.dev/demo-actorgen/actorgen/trainer:test"
SA = "trainer@demo-actorgen.iam.gserviceaccount.com"


@pytest.fixture
def fake() -> Iterator[FakeJobService]:
    with FakeJobService() as server:
        yield server


def make_settings(fake: FakeJobService, **overrides: object) -> ExecutorSettings:
    settings = ExecutorSettings(
        kind="vertex",
        project=PROJECT,
        region=REGION,
        bucket="demo-actorgen.appspot.com",
        trainer_image_uri=IMAGE,
        machine_type="g2-standard-8",
        accelerator_type="NVIDIA_L4",
        accelerator_count=1,
        scheduling_strategy="SPOT",
        timeout_seconds=5400,
        service_account=SA,
        api_endpoint=fake.endpoint,
        extra_env={"HF_HUB_ENABLE_HF_TRANSFER": "1", "ACTORGEN_JOB_ID": "must-be-overridden"},
        rpc_timeout_seconds=10,
        retry_deadline_seconds=3,
    )
    return settings.replace(**overrides)


@pytest.fixture
def executor(fake: FakeJobService) -> VertexExecutor:
    ex = build_executor(make_settings(fake))
    assert isinstance(ex, VertexExecutor)
    return ex


def req(job_id: str = "Job_AbC123", attempt: int = 1, **env: str) -> SubmitRequest:
    return SubmitRequest(job_id=job_id, attempt=attempt, user_id="uid-42", env=env)


# ---------------------------------------------------------------------- create
def test_submit_sends_the_full_custom_job(fake: FakeJobService, executor: VertexExecutor) -> None:
    job = executor.submit(req(ACTORGEN_EXTRA="x"))

    assert job.name.startswith(f"{PARENT}/customJobs/")
    assert job.state is ExecutorState.QUEUED and job.raw_state == "JOB_STATE_PENDING"
    [create] = fake.calls("CreateCustomJob")
    assert create.parent == PARENT
    cj = create.custom_job
    assert cj.display_name == schema.executor_display_name("Job_AbC123", 1)
    assert dict(cj.labels) == {
        **schema.executor_labels("Job_AbC123", 1),
        schema.LABEL_USER: schema.user_label_value("uid-42"),
    }
    spec = cj.job_spec
    [pool] = spec.worker_pool_specs
    assert pool.replica_count == 1
    assert pool.machine_spec.machine_type == "g2-standard-8"
    assert pool.machine_spec.accelerator_type == AcceleratorType.NVIDIA_L4
    assert pool.machine_spec.accelerator_count == 1
    assert pool.container_spec.image_uri == IMAGE
    assert list(pool.container_spec.args) == schema.trainer_args("Job_AbC123", 1)
    assert not pool.container_spec.command  # the image's entry point runs the module
    env = {e.name: e.value for e in pool.container_spec.env}
    assert env == {
        schema.ENV_JOB_ID: "Job_AbC123",  # schema values win over extra_env
        schema.ENV_ATTEMPT: "1",
        schema.ENV_BUCKET: "demo-actorgen.appspot.com",
        schema.ENV_PROJECT: PROJECT,
        "HF_HUB_ENABLE_HF_TRANSFER": "1",
        "ACTORGEN_EXTRA": "x",
    }
    assert spec.scheduling.strategy == Scheduling.Strategy.SPOT
    assert spec.scheduling.timeout.total_seconds() == 5400
    assert spec.scheduling.restart_job_on_worker_restart is True
    assert not spec.scheduling.max_wait_duration
    assert spec.service_account == SA
    assert spec.network == ""
    assert spec.base_output_directory.output_uri_prefix == schema.executor_output_dir(
        "demo-actorgen.appspot.com", "Job_AbC123", 1
    )


def test_flex_start_reservation_network_and_no_gpu(fake: FakeJobService) -> None:
    ex = build_executor(
        make_settings(
            fake,
            scheduling_strategy="FLEX_START",
            max_wait_seconds=1800,
            reservation="projects/demo-actorgen/zones/europe-west4-a/reservations/l4",
            network="projects/123/global/networks/vpc",
            restart_job_on_worker_restart=False,
        )
    )
    ex.submit(req())
    spec = fake.calls("CreateCustomJob")[0].custom_job.job_spec
    assert spec.scheduling.strategy == Scheduling.Strategy.FLEX_START
    assert spec.scheduling.max_wait_duration.total_seconds() == 1800
    assert spec.scheduling.restart_job_on_worker_restart is False
    affinity = spec.worker_pool_specs[0].machine_spec.reservation_affinity
    assert list(affinity.values) == ["projects/demo-actorgen/zones/europe-west4-a/reservations/l4"]
    assert affinity.key == "compute.googleapis.com/reservation-name"
    assert spec.network == "projects/123/global/networks/vpc"

    cpu = build_executor(
        make_settings(
            fake, accelerator_type="", accelerator_count=0, scheduling_strategy="STANDARD"
        )
    )
    cpu.submit(req("cpu-job"))
    spec = fake.calls("CreateCustomJob")[1].custom_job.job_spec
    assert spec.scheduling.strategy == Scheduling.Strategy.STANDARD
    machine = spec.worker_pool_specs[0].machine_spec
    assert machine.accelerator_type == AcceleratorType.ACCELERATOR_TYPE_UNSPECIFIED
    assert machine.accelerator_count == 0


def test_misconfiguration_fails_before_any_call(fake: FakeJobService) -> None:
    ex = build_executor(make_settings(fake, trainer_image_uri="", scheduling_strategy="CHEAP"))
    with pytest.raises(ExecutorError) as err:
        ex.submit(req())
    assert not err.value.retryable
    assert "trainer_image_uri" in str(err.value) and "scheduling_strategy" in str(err.value)

    ex = build_executor(make_settings(fake, accelerator_type="NVIDIA_GTX_1080"))
    with pytest.raises(
        ExecutorError, match="unknown accelerator_type 'NVIDIA_GTX_1080'.*NVIDIA_L4"
    ):
        ex.submit(req())
    assert fake.requests == []


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ExecutorError, match="unknown executor kind 'k8s'"):
        build_executor(ExecutorSettings(kind="k8s"))


# ---------------------------------------------------------------- idempotency
def test_second_submit_finds_the_first(fake: FakeJobService, executor: VertexExecutor) -> None:
    first = executor.submit(req())
    again = executor.submit(req())
    other_attempt = executor.submit(req(attempt=2))

    assert again == first
    assert other_attempt.name != first.name
    assert len(fake.calls("CreateCustomJob")) == 2
    [lst, *_] = fake.calls("ListCustomJobs")
    assert lst.filter == label_filter("Job_AbC123", 1)
    assert executor.find("Job_AbC123", 1) == first
    assert executor.find("Job_AbC123", 3) is None
    assert executor.find("another-job", 1) is None


def test_a_fresh_executor_finds_jobs_by_label(fake: FakeJobService) -> None:
    """A new function instance (no memory of the first) still does not create twice."""
    first = build_executor(make_settings(fake)).submit(req())
    second = build_executor(make_settings(fake)).submit(req())
    assert second.name == first.name
    assert len(fake.calls("CreateCustomJob")) == 1


def test_concurrent_submits_create_one_job(fake: FakeJobService) -> None:
    executors = [build_executor(make_settings(fake)) for _ in range(2)]
    barrier = threading.Barrier(8)
    names: list[str] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        barrier.wait()
        try:
            names.append(executors[i % 2].submit(req()).name)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(names)) == 1 and len(names) == 8
    assert len(fake.calls("CreateCustomJob")) == 1


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ],
)
def test_lost_create_answer_is_recovered_by_lookup(
    fake: FakeJobService, executor: VertexExecutor, code: grpc.StatusCode
) -> None:
    # Vertex created the job but the answer was an error: look, do not create again.
    fake.inject("CreateCustomJob", code, "answer lost", after_commit=True)
    job = executor.submit(req())
    assert len(fake.jobs) == 1 and job.name in fake.jobs
    assert len(fake.calls("CreateCustomJob")) == 1


def test_create_failing_before_commit_is_retryable_and_creates_nothing(
    fake: FakeJobService, executor: VertexExecutor
) -> None:
    fake.inject("CreateCustomJob", grpc.StatusCode.UNAVAILABLE, "connection reset")
    with pytest.raises(ExecutorError) as err:
        executor.submit(req())
    assert err.value.retryable
    assert "unavailable" in str(err.value).lower() and "connection reset" in str(err.value)
    assert fake.jobs == {}
    # The create is never retried blindly by the client: one call only.
    assert len(fake.calls("CreateCustomJob")) == 1
    # The dispatcher's next try goes through.
    assert executor.submit(req()).name in fake.jobs


def test_eventually_consistent_list_is_reported_as_retryable(
    fake: FakeJobService, executor: VertexExecutor
) -> None:
    """Lost answer AND a list that lags: we cannot know, so we say "retry" and create nothing."""
    fake.list_lag = 1  # the job stays invisible to the one lookup right after the create
    fake.inject("CreateCustomJob", grpc.StatusCode.ALREADY_EXISTS, "exists", after_commit=True)
    with pytest.raises(ExecutorError, match="cannot be listed yet") as err:
        executor.submit(req())
    assert err.value.retryable
    created = next(iter(fake.jobs))
    # Once the list catches up, a retried submit finds the job instead of creating a second.
    assert executor.submit(req()).name == created
    assert len(fake.jobs) == 1


def test_find_pages_and_prefers_a_live_job_among_duplicates(
    fake: FakeJobService, executor: VertexExecutor
) -> None:
    fake.max_page_size = 1
    template = executor.build_custom_job(req())
    old_failed = fake.add_job(template, PARENT)
    running = fake.add_job(template, PARENT)
    newest_failed = fake.add_job(template, PARENT)
    decoy = CustomJob(template)
    decoy.display_name = "someone-else"  # right labels, wrong name: not ours
    fake.add_job(decoy, PARENT)
    for job, state in (
        (old_failed, "JOB_STATE_FAILED"),
        (running, "JOB_STATE_RUNNING"),
        (newest_failed, "JOB_STATE_FAILED"),
    ):
        fake.set_state(job.name, state)

    found = executor.find("Job_AbC123", 1)
    assert found is not None and found.name == running.name
    assert len(fake.calls("ListCustomJobs")) == 4  # one page per job

    fake.set_state(running.name, "JOB_STATE_CANCELLED")
    found = executor.find("Job_AbC123", 1)
    assert found is not None and found.name == newest_failed.name  # newest when all ended


@pytest.mark.parametrize("ended", ["JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED",
                                   "JOB_STATE_CANCELLED"])
def test_a_retried_submit_never_adopts_an_ended_job_of_the_attempt(
    fake: FakeJobService, executor: VertexExecutor, ended: str
) -> None:
    """Lost create answer, list lagging: the first job ran and ended (its trainer found the
    job re-queued and stopped). The retried submit must start the attempt, not adopt it
    (a SUCCEEDED one would be counted "succeeded without completion")."""
    fake.list_lag = 1
    fake.inject("CreateCustomJob", grpc.StatusCode.UNAVAILABLE, "answer lost", after_commit=True)
    with pytest.raises(ExecutorError) as err:
        executor.submit(req())
    assert err.value.retryable
    first = next(iter(fake.jobs))
    fake.set_state(first, ended)
    fake.list_lag = 0

    job = executor.submit(req())
    assert job.name != first and job.state is ExecutorState.QUEUED
    assert len(fake.calls("CreateCustomJob")) == 2
    assert executor.find("Job_AbC123", 1) == job


def test_duplicate_live_jobs_of_an_attempt_are_cut_to_one(
    fake: FakeJobService, executor: VertexExecutor
) -> None:
    """Two live jobs for one attempt (a lost create, then a create while the list lagged):
    the running one is kept even when a newer one ended, and the other live one is
    cancelled instead of being left behind on a GPU."""
    template = executor.build_custom_job(req())
    running = fake.add_job(template, PARENT)
    pending = fake.add_job(template, PARENT)
    succeeded = fake.add_job(template, PARENT)
    fake.set_state(running.name, "JOB_STATE_RUNNING")
    fake.set_state(succeeded.name, "JOB_STATE_SUCCEEDED")

    found = executor.submit(req())
    assert found.name == running.name and found.state is ExecutorState.RUNNING
    assert fake.calls("CreateCustomJob") == []
    assert [c.name for c in fake.calls("CancelCustomJob")] == [pending.name]


def test_rejected_label_filter_falls_back_to_display_name(
    fake: FakeJobService, executor: VertexExecutor
) -> None:
    fake.reject_label_filters = True
    first = executor.submit(req())
    assert executor.submit(req()).name == first.name
    filters = [r.filter for r in fake.calls("ListCustomJobs")]
    assert filters[0] == label_filter("Job_AbC123", 1)
    assert filters[1:] == [display_name_filter("Job_AbC123", 1)] * 2  # label filter not retried
    assert len(fake.jobs) == 1


def test_label_filter_quotes_keys_and_parses() -> None:
    text = label_filter('we"ird\\id', 7)
    terms = parse_filter(text)
    assert {(f, k, v) for f, k, _, v in terms} == {
        ("labels", k, v) for k, v in schema.executor_labels('we"ird\\id', 7).items()
    }
    assert parse_filter(display_name_filter('a"b', 1)) == [
        ("display_name", None, "=", schema.executor_display_name('a"b', 1))
    ]


# ---------------------------------------------------------------------- states
@pytest.mark.parametrize(
    ("vertex_state", "expected"),
    [
        ("JOB_STATE_QUEUED", ExecutorState.QUEUED),
        ("JOB_STATE_PENDING", ExecutorState.QUEUED),
        ("JOB_STATE_RUNNING", ExecutorState.RUNNING),
        ("JOB_STATE_UPDATING", ExecutorState.RUNNING),
        ("JOB_STATE_SUCCEEDED", ExecutorState.SUCCEEDED),
        ("JOB_STATE_PARTIALLY_SUCCEEDED", ExecutorState.FAILED),
        ("JOB_STATE_FAILED", ExecutorState.FAILED),
        ("JOB_STATE_CANCELLING", ExecutorState.CANCELLED),
        ("JOB_STATE_CANCELLED", ExecutorState.CANCELLED),
        ("JOB_STATE_EXPIRED", ExecutorState.EXPIRED),
        ("JOB_STATE_PAUSED", ExecutorState.UNKNOWN),
        ("JOB_STATE_UNSPECIFIED", ExecutorState.UNKNOWN),
    ],
)
def test_state_mapping(
    fake: FakeJobService, executor: VertexExecutor, vertex_state: str, expected: ExecutorState
) -> None:
    name = executor.submit(req()).name
    fake.set_state(name, vertex_state)
    job = executor.get(name)
    assert (job.state, job.raw_state) == (expected, vertex_state)
    assert job.state.is_terminal == (
        expected
        in {
            ExecutorState.SUCCEEDED,
            ExecutorState.FAILED,
            ExecutorState.CANCELLED,
            ExecutorState.EXPIRED,
        }
    )
    assert (job.error is not None) == job.state.is_failure


def test_covers_every_vertex_job_state() -> None:
    from actorgen.executors.vertex import STATE_MAP

    assert set(STATE_MAP) == set(JobState.__members__)


def test_failure_carries_vertex_error_message(
    fake: FakeJobService, executor: VertexExecutor
) -> None:
    name = executor.submit(req()).name
    fake.set_state(name, "JOB_STATE_RUNNING")
    assert executor.get(name).state is ExecutorState.RUNNING
    fake.set_state(
        name,
        "JOB_STATE_FAILED",
        error="The replica workerpool0-0 exited with a "
        "non-zero status of 1. Termination reason: OOMKilled",
    )
    job = executor.get(name)
    assert job.state is ExecutorState.FAILED
    assert job.error is not None and "OOMKilled" in job.error
    assert executor.find("Job_AbC123", 1) == job

    name2 = executor.submit(req(attempt=2)).name
    fake.set_state(name2, "JOB_STATE_EXPIRED")
    assert "expired" in (executor.get(name2).error or "")


def test_get_missing_or_foreign_name_is_not_found(
    fake: FakeJobService, executor: VertexExecutor
) -> None:
    with pytest.raises(ExecutorNotFound, match="does not exist"):
        executor.get(f"{PARENT}/customJobs/999")
    with pytest.raises(ExecutorNotFound):
        executor.get("j0123-a1")  # e.g. a name the local executor gave
    assert len(fake.calls("GetCustomJob")) == 1


# ---------------------------------------------------------------------- cancel
def test_cancel_is_idempotent(fake: FakeJobService, executor: VertexExecutor) -> None:
    name = executor.submit(req()).name
    fake.set_state(name, "JOB_STATE_RUNNING")
    executor.cancel(name)
    assert executor.get(name).state is ExecutorState.CANCELLED  # CANCELLING
    executor.cancel(name)
    fake.set_state(name, "JOB_STATE_CANCELLED")
    executor.cancel(name)  # Vertex answers FAILED_PRECONDITION: already over
    assert len(fake.calls("CancelCustomJob")) == 3

    done = executor.submit(req(attempt=2)).name
    fake.set_state(done, "JOB_STATE_SUCCEEDED")
    executor.cancel(done)
    assert executor.get(done).state is ExecutorState.SUCCEEDED

    executor.cancel(f"{PARENT}/customJobs/404")  # gone: nothing to do
    executor.cancel("not-a-vertex-name")


def test_cancel_surfaces_permission_problems(
    fake: FakeJobService, executor: VertexExecutor
) -> None:
    name = executor.submit(req()).name
    fake.inject(
        "CancelCustomJob", grpc.StatusCode.PERMISSION_DENIED, "aiplatform.customJobs.cancel"
    )
    with pytest.raises(ExecutorError) as err:
        executor.cancel(name)
    assert not err.value.retryable


# ---------------------------------------------------------------------- errors
def test_transient_read_errors_are_retried_by_the_client(
    fake: FakeJobService, executor: VertexExecutor
) -> None:
    name = executor.submit(req()).name
    fake.inject("GetCustomJob", grpc.StatusCode.UNAVAILABLE, times=2)
    fake.inject("ListCustomJobs", grpc.StatusCode.INTERNAL)
    assert executor.get(name).name == name
    assert len(fake.calls("GetCustomJob")) == 3
    assert executor.find("Job_AbC123", 1) is not None


def test_persistent_unavailability_is_retryable(
    fake: FakeJobService, executor: VertexExecutor
) -> None:
    name = executor.submit(req()).name
    fake.inject("GetCustomJob", grpc.StatusCode.UNAVAILABLE, "backend down", times=-1)
    with pytest.raises(ExecutorError) as err:
        executor.get(name)
    assert err.value.retryable
    assert "backend down" in str(err.value)


@pytest.mark.parametrize(
    ("code", "retryable", "hint"),
    [
        (grpc.StatusCode.PERMISSION_DENIED, False, "roles/aiplatform.user"),
        (
            grpc.StatusCode.PERMISSION_DENIED,
            False,
            (f"roles/iam.serviceAccountUser on the trainer service account {SA}"),
        ),
        (grpc.StatusCode.INVALID_ARGUMENT, False, f"trainer image URI '{IMAGE}'"),
        (grpc.StatusCode.FAILED_PRECONDITION, False, "API is enabled"),
        (grpc.StatusCode.UNAUTHENTICATED, False, "credentials"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, True, "quota for NVIDIA_L4 in europe-west4"),
        (grpc.StatusCode.INTERNAL, True, "unavailable"),
    ],
)
def test_create_errors_are_classified_with_a_fix(
    fake: FakeJobService,
    executor: VertexExecutor,
    code: grpc.StatusCode,
    retryable: bool,
    hint: str,
) -> None:
    fake.inject("CreateCustomJob", code, "the server's words")
    with pytest.raises(ExecutorError) as err:
        executor.submit(req())
    assert err.value.retryable is retryable
    assert hint in str(err.value) and "the server's words" in str(err.value)
    assert fake.jobs == {}


def test_list_permission_denied_is_permanent(
    fake: FakeJobService, executor: VertexExecutor
) -> None:
    fake.inject("ListCustomJobs", grpc.StatusCode.PERMISSION_DENIED, "aiplatform.customJobs.list")
    with pytest.raises(ExecutorError) as err:
        executor.submit(req())
    assert not err.value.retryable and "aiplatform.customJobs.list" in str(err.value)
    assert fake.calls("CreateCustomJob") == []  # never create without having looked


# --------------------------------------------------------------------- restarts
def test_client_recovers_after_server_restart(
    fake: FakeJobService, executor: VertexExecutor
) -> None:
    name = executor.submit(req()).name
    fake.stop()
    executor.settings = executor.settings.replace(retry_deadline_seconds=0.5)
    with pytest.raises(ExecutorError) as err:
        executor.get(name)
    assert err.value.retryable

    fake.restart(keep_state=True)
    executor.settings = executor.settings.replace(retry_deadline_seconds=30)
    assert executor.get(name).name == name  # same client, same channel, reconnected
    assert executor.submit(req()).name == name
    assert len(fake.jobs) == 1


def test_server_losing_state_means_not_found_and_a_new_submit(
    fake: FakeJobService, executor: VertexExecutor
) -> None:
    name = executor.submit(req()).name
    fake.restart(keep_state=False)
    executor.settings = executor.settings.replace(retry_deadline_seconds=30)
    with pytest.raises(ExecutorNotFound):
        executor.get(name)
    assert executor.find("Job_AbC123", 1) is None
    assert executor.submit(req()).name != name


def test_client_is_created_once(fake: FakeJobService, executor: VertexExecutor) -> None:
    executor.submit(req())
    client = executor.client
    executor.find("Job_AbC123", 1)
    assert executor.client is client


def test_more_than_one_gpu_is_refused_before_any_call(fake: FakeJobService) -> None:
    # The trainer uses one GPU: a second one would be billed and sit idle.
    ex = build_executor(make_settings(fake, accelerator_type="NVIDIA_L4", accelerator_count=2))
    with pytest.raises(ExecutorError, match="accelerator_count is 2.*ACCELERATOR_COUNT to 1") as err:
        ex.submit(req())
    assert not err.value.retryable
    assert fake.requests == []


# ------------------------------------------------------------ persistent resource
POOL = "actorgen-l4-pool"


def test_a_persistent_resource_is_named_in_the_submitted_job(fake: FakeJobService) -> None:
    ex = build_executor(
        make_settings(fake, scheduling_strategy="STANDARD", persistent_resource_id=POOL)
    )
    name = ex.submit(req()).name
    spec = fake.calls("CreateCustomJob")[0].custom_job.job_spec
    assert spec.persistent_resource_id == POOL
    # The machine spec still travels: Vertex matches it against the resource's pools.
    machine = spec.worker_pool_specs[0].machine_spec
    assert (machine.machine_type, machine.accelerator_type, machine.accelerator_count) == (
        "g2-standard-8", AcceleratorType.NVIDIA_L4, 1
    )
    assert spec.scheduling.strategy == Scheduling.Strategy.STANDARD
    assert spec.service_account == SA
    assert fake.jobs[name].job_spec.persistent_resource_id == POOL  # as Vertex stored it
    # Re-driving the attempt finds the job as before: the pool changes nothing there.
    assert ex.submit(req()).name == name
    assert len(fake.calls("CreateCustomJob")) == 1


def test_without_a_persistent_resource_the_job_names_none(
    fake: FakeJobService, executor: VertexExecutor
) -> None:
    assert executor.settings.persistent_resource_id == ""
    executor.submit(req())
    [create] = fake.calls("CreateCustomJob")
    spec = create.custom_job.job_spec
    assert spec.persistent_resource_id == ""
    # Not even an empty value went over the wire: Vertex provisions fresh machines.
    sent = {f.name for f, _ in type(spec).pb(spec).ListFields()}
    assert "persistent_resource_id" not in sent and "worker_pool_specs" in sent


@pytest.mark.parametrize("strategy", ["SPOT", "FLEX_START"])
def test_spot_or_flex_start_on_a_persistent_resource_is_refused_before_any_call(
    fake: FakeJobService, strategy: str
) -> None:
    """Jobs on a persistent resource run on machines it already holds: there is nothing to
    provision as spot or flex-start, so the combination is refused, naming both params."""
    ex = build_executor(
        make_settings(fake, scheduling_strategy=strategy, persistent_resource_id=POOL,
                      max_wait_seconds=600)
    )
    with pytest.raises(ExecutorError) as err:
        ex.submit(req())
    assert not err.value.retryable
    text = str(err.value)
    assert f"scheduling_strategy {strategy}" in text and POOL in text
    assert "SCHEDULING_STRATEGY to STANDARD" in text and "VERTEX_PERSISTENT_RESOURCE_ID" in text
    assert fake.requests == []


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"reservation": "l4-reservation"}, "reservation 'l4-reservation' cannot be combined"),
        (
            {"persistent_resource_id": f"projects/p/locations/{REGION}/persistentResources/x"},
            "give the last part",
        ),
        ({"persistent_resource_id": "Pool_1"}, "must be a persistent resource ID"),
    ],
)
def test_other_persistent_resource_misconfigurations_are_refused(
    fake: FakeJobService, overrides: dict[str, str], needle: str
) -> None:
    settings = {"scheduling_strategy": "STANDARD", "persistent_resource_id": POOL, **overrides}
    ex = build_executor(make_settings(fake, **settings))
    with pytest.raises(ExecutorError, match=needle) as err:
        ex.submit(req())
    assert not err.value.retryable and "VERTEX_PERSISTENT_RESOURCE_ID" in str(err.value)
    assert fake.requests == []


def test_a_pool_vertex_rejects_is_named_in_the_error(fake: FakeJobService) -> None:
    """A pool whose machines differ from the job's (or that is missing or not running) is
    Vertex's to reject; the error says which pool and what must match."""
    ex = build_executor(
        make_settings(fake, scheduling_strategy="STANDARD", persistent_resource_id=POOL)
    )
    fake.inject("CreateCustomJob", grpc.StatusCode.INVALID_ARGUMENT, "no matching resource pool")
    with pytest.raises(ExecutorError) as err:
        ex.submit(req())
    assert not err.value.retryable
    text = str(err.value)
    assert "no matching resource pool" in text and f"persistent resource '{POOL}'" in text
    assert "MACHINE_TYPE, ACCELERATOR_TYPE, ACCELERATOR_COUNT" in text
    assert "--enable-custom-service-account" in text
    assert fake.jobs == {}

    # Without a pool the hint is not there.
    plain = build_executor(make_settings(fake))
    fake.inject("CreateCustomJob", grpc.StatusCode.INVALID_ARGUMENT, "bad machine type")
    with pytest.raises(ExecutorError) as err:
        plain.submit(req("other"))
    assert "persistent resource" not in str(err.value)
