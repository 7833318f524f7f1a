"""The executor interface, settings and client construction (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from actorgen.executors import (
    Executor,
    ExecutorError,
    ExecutorNotFound,
    ExecutorSettings,
    ExecutorState,
    SubmitRequest,
    build_executor,
)
from actorgen.executors.local import LocalExecutor
from actorgen.executors.vertex import VertexExecutor


def test_state_properties() -> None:
    terminal = {s for s in ExecutorState if s.is_terminal}
    failures = {s for s in ExecutorState if s.is_failure}
    assert terminal == {"succeeded", "failed", "cancelled", "expired"}
    assert failures == {"failed", "cancelled", "expired"}
    assert ExecutorState.UNKNOWN.is_active and ExecutorState.QUEUED.is_active
    assert f"{ExecutorState.RUNNING}" == "running" == ExecutorState("running").value


def test_errors_carry_retryability() -> None:
    assert ExecutorError("x").retryable is False
    assert ExecutorError("quota", retryable=True).retryable is True
    nf = ExecutorNotFound("gone")
    assert isinstance(nf, ExecutorError) and not nf.retryable and str(nf) == "gone"


def test_submit_request_is_validated_and_frozen() -> None:
    env = {"A": "1"}
    r = SubmitRequest("job", 2, "uid", env=env)
    env["A"] = "changed"
    assert r.env == {"A": "1"}
    with pytest.raises(TypeError):
        r.env["B"] = "2"  # type: ignore[index]
    for bad in (0, -1, True, "1"):
        with pytest.raises(ValueError, match="attempt"):
            SubmitRequest("job", bad, "uid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="job_id"):
        SubmitRequest("", 1, "uid")


def test_build_executor_picks_by_kind(tmp_path: Path) -> None:
    local = build_executor(ExecutorSettings(kind="local", local_workdir=str(tmp_path)))
    vertex = build_executor(ExecutorSettings(kind="vertex"))
    assert isinstance(local, LocalExecutor) and local.kind == "local"
    assert isinstance(vertex, VertexExecutor) and vertex.kind == "vertex"
    assert isinstance(local, Executor) and isinstance(vertex, Executor)


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("", False),
        ("127.0.0.1:50051", True),
        ("localhost:8080", True),
        ("[::1]:443", True),
        ("europe-west4-aiplatform.googleapis.com", False),
        ("10.0.0.1:443", False),
    ],
)
def test_endpoint(endpoint: str, loopback: bool) -> None:
    s = ExecutorSettings(kind="vertex", region="europe-west4", api_endpoint=endpoint)
    assert s.endpoint == (endpoint or "europe-west4-aiplatform.googleapis.com")
    assert s.endpoint_is_loopback is loopback


def test_settings_problems_name_what_to_fix() -> None:
    assert ExecutorSettings(kind="local").problems() == []
    problems = ExecutorSettings(
        kind="vertex", accelerator_count=0, timeout_seconds=0, trainer_image_uri="trainer"
    ).problems()
    text = "; ".join(problems)
    for needle in ("project", "bucket", "accelerator_count", "timeout_seconds", "full image"):
        assert needle in text
    assert ExecutorSettings(kind="k8s").problems() == [
        "executor kind must be one of vertex, local, got 'k8s'"
    ]
    frozen = ExecutorSettings(extra_env={"A": "1"})
    with pytest.raises(TypeError):
        frozen.extra_env["B"] = "2"  # type: ignore[index]


def test_real_endpoint_client_with_anonymous_credentials() -> None:
    ex = VertexExecutor(ExecutorSettings(kind="vertex", anonymous_credentials=True))
    client = ex.client  # no network: the channel connects lazily
    assert client.api_endpoint == "us-central1-aiplatform.googleapis.com"
    assert ex.client is client


def test_missing_credentials_are_a_permanent_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    ex = VertexExecutor(ExecutorSettings(kind="vertex", project="p"))
    with pytest.raises(ExecutorError, match="no Google credentials") as err:
        _ = ex.client
    assert not err.value.retryable
