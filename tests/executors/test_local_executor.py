"""LocalExecutor against real subprocesses running a stand-in trainer module."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from actorgen import schema
from actorgen.executors import (
    ExecutorJob,
    ExecutorNotFound,
    ExecutorSettings,
    ExecutorState,
    SubmitRequest,
    build_executor,
)
from actorgen.executors.local import (
    EXIT_FILE,
    FUNCTIONS_DIR,
    LOG_FILE,
    SPEC_FILE,
    TRAINER_DIR,
    LocalExecutor,
    _group_alive,
    job_dir_name,
)

FAKE_TRAINER_DIR = Path(__file__).parent / "fake_trainer"
WAIT_LIMIT = 60.0  # generous: only bounds a hang, never asserts speed


def make_settings(workdir: Path, **overrides: object) -> ExecutorSettings:
    return ExecutorSettings(
        kind="local",
        project="demo-actorgen",
        bucket="demo-actorgen.appspot.com",
        local_workdir=str(workdir),
        local_module="fake_lora_trainer",
        local_pythonpath=(str(FAKE_TRAINER_DIR),),
        extra_env={"ACTORGEN_FROM_SETTINGS": "yes"},
    ).replace(**overrides)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """The executor's folder; any trainer a failed test left running is killed afterwards."""
    path = tmp_path / "executor"
    yield path
    for spec_file in path.glob(f"*/{SPEC_FILE}"):
        pid = json.loads(spec_file.read_text()).get("pid")
        if pid and _group_alive(pid):
            os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def executor(workdir: Path) -> LocalExecutor:
    ex = build_executor(make_settings(workdir))
    assert isinstance(ex, LocalExecutor)
    return ex


def req(mode: str, job_id: str = "JobXyZ", attempt: int = 1) -> SubmitRequest:
    return SubmitRequest(job_id, attempt, "uid-42", env={"FAKE_TRAINER_MODE": mode})


def wait_for(ex: LocalExecutor, name: str, pred: object) -> ExecutorJob:
    deadline = time.monotonic() + WAIT_LIMIT
    while True:
        job = ex.get(name)
        if pred(job):  # type: ignore[operator]
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} stuck in {job}")
        time.sleep(0.02)


def wait_terminal(ex: LocalExecutor, name: str) -> ExecutorJob:
    return wait_for(ex, name, lambda j: j.state.is_terminal)


def release(ex: LocalExecutor, name: str) -> None:
    (ex.workdir / name / "release").touch()


def report(ex: LocalExecutor, name: str) -> dict:
    """The JSON line the fake trainer printed first."""
    deadline = time.monotonic() + WAIT_LIMIT
    while time.monotonic() < deadline:
        for line in (ex.workdir / name / LOG_FILE).read_text().splitlines():
            if line.startswith("{"):
                return json.loads(line)
        time.sleep(0.02)
    raise AssertionError("the fake trainer never reported")


def test_runs_the_module_with_schema_args_and_filtered_env(
    executor: LocalExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", "127.0.0.1:8080")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9199")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SOME_FUNCTION_SECRET", "do-not-leak")
    assert executor.find("JobXyZ", 1) is None

    job = executor.submit(req("exit0"))
    assert job.name == job_dir_name("JobXyZ", 1) == f"{schema.job_label_value('JobXyZ')}-a1"
    assert job.state in (ExecutorState.QUEUED, ExecutorState.RUNNING, ExecutorState.SUCCEEDED)
    done = wait_terminal(executor, job.name)
    assert done == ExecutorJob(job.name, ExecutorState.SUCCEEDED, None, "exited:0")

    seen = report(executor, job.name)
    assert seen["argv"] == schema.trainer_args("JobXyZ", 1)
    env = seen["env"]
    assert env[schema.ENV_JOB_ID] == "JobXyZ" and env[schema.ENV_ATTEMPT] == "1"
    assert env[schema.ENV_BUCKET] == "demo-actorgen.appspot.com"
    assert env[schema.ENV_PROJECT] == "demo-actorgen"
    assert env["FIRESTORE_EMULATOR_HOST"] == "127.0.0.1:8080"
    assert env["STORAGE_EMULATOR_HOST"] == "http://127.0.0.1:9199"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["ACTORGEN_FROM_SETTINGS"] == "yes"
    assert "SOME_FUNCTION_SECRET" not in env
    assert env["PYTHONPATH"].split(os.pathsep) == [
        str(FAKE_TRAINER_DIR),
        str(TRAINER_DIR),
        str(FUNCTIONS_DIR),
    ]
    assert Path(seen["schema_file"]).resolve() == (FUNCTIONS_DIR / "actorgen" / "schema.py")
    assert Path(seen["cwd"]) == executor.workdir / job.name

    folder = executor.workdir / job.name
    spec = json.loads((folder / SPEC_FILE).read_text())
    assert spec["jobId"] == "JobXyZ" and spec["attempt"] == 1 and spec["pid"] > 0
    assert spec["command"] == [
        sys.executable,
        "-m",
        "fake_lora_trainer",
        *schema.trainer_args("JobXyZ", 1),
    ]
    assert (folder / EXIT_FILE).read_text().strip() == "0"
    assert executor.find("JobXyZ", 1) == done


def test_default_command_is_the_trainer_module(tmp_path: Path) -> None:
    ex = LocalExecutor(ExecutorSettings(kind="local", local_workdir=str(tmp_path)))
    assert ex.command(req("x", attempt=3)) == [
        sys.executable,
        "-m",
        schema.TRAINER_MODULE,
        *schema.trainer_args("JobXyZ", 3),
    ]


def test_failure_reports_the_end_of_the_log(executor: LocalExecutor) -> None:
    name = executor.submit(req("exit1")).name
    job = wait_terminal(executor, name)
    assert job.state is ExecutorState.FAILED and job.raw_state == "exited:1"
    assert job.error is not None
    assert job.error.startswith("trainer exited with code 1")
    assert "CUDA out of memory" in job.error


def test_bad_python_fails_the_attempt_with_a_reason(workdir: Path) -> None:
    ex = build_executor(make_settings(workdir, local_python=str(workdir / "no-python")))
    name = ex.submit(req("exit0")).name
    job = wait_terminal(ex, name)
    assert job.state is ExecutorState.FAILED and "no-python" in (job.error or "")


def test_submit_is_idempotent_and_states_follow_the_process(executor: LocalExecutor) -> None:
    first = executor.submit(req("wait"))
    running = wait_for(executor, first.name, lambda j: j.state is ExecutorState.RUNNING)
    assert executor.submit(req("wait")) == running
    assert executor.find("JobXyZ", 1) == running
    assert executor.find("JobXyZ", 2) is None
    release(executor, first.name)
    assert wait_terminal(executor, first.name).state is ExecutorState.SUCCEEDED
    log = (executor.workdir / first.name / LOG_FILE).read_text()
    assert log.count('"argv"') == 1


@pytest.mark.parametrize("mode", ["exit0", "exit1"])
def test_a_retried_submit_never_adopts_an_ended_run_of_the_attempt(
        executor: LocalExecutor, mode: str) -> None:
    """The attempt's earlier run ended (its trainer found the job re-queued and stopped):
    submitting the attempt again starts it, instead of adopting a run that would count
    as "succeeded without completion" or as a failure."""
    first = executor.submit(req(mode))
    assert wait_terminal(executor, first.name).state.is_terminal
    again = executor.submit(req("wait"))
    assert again.name == first.name and again.state.is_active
    running = wait_for(executor, again.name, lambda j: j.state is ExecutorState.RUNNING)
    assert executor.find("JobXyZ", 1) == running
    release(executor, again.name)
    assert wait_terminal(executor, again.name).state is ExecutorState.SUCCEEDED


def test_concurrent_submits_start_one_process(executor: LocalExecutor) -> None:
    barrier = threading.Barrier(6)
    names: list[str] = []

    def worker() -> None:
        barrier.wait()
        names.append(executor.submit(req("wait")).name)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(names) == 6 and len(set(names)) == 1
    release(executor, names[0])
    assert wait_terminal(executor, names[0]).state is ExecutorState.SUCCEEDED
    assert (executor.workdir / names[0] / LOG_FILE).read_text().count('"argv"') == 1


SUBMIT_AND_EXIT = """
import sys
sys.path.insert(0, sys.argv[1])
from actorgen.executors import ExecutorSettings, SubmitRequest, build_executor
settings = ExecutorSettings(kind="local", local_workdir=sys.argv[2],
    local_module="fake_lora_trainer", local_pythonpath=(sys.argv[3],))
job = build_executor(settings).submit(
    SubmitRequest("JobXyZ", 1, "uid-42", env={"FAKE_TRAINER_MODE": "wait"}))
print(job.name)
"""


def test_trainer_outlives_the_submitting_process(executor: LocalExecutor) -> None:
    """Like the Functions emulator restarting: the state is in files, the process detached."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                SUBMIT_AND_EXIT,
                str(FUNCTIONS_DIR),
                str(executor.workdir),
                str(FAKE_TRAINER_DIR),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=WAIT_LIMIT)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs[0] == outputs[1]  # two processes raced: one trainer
    name = outputs[0]
    assert wait_for(executor, name, lambda j: j.state is ExecutorState.RUNNING)
    release(executor, name)
    assert wait_terminal(executor, name).state is ExecutorState.SUCCEEDED
    assert (executor.workdir / name / LOG_FILE).read_text().count('"argv"') == 1


def test_cancel_stops_the_process_group(executor: LocalExecutor) -> None:
    name = executor.submit(req("wait")).name
    wait_for(executor, name, lambda j: j.state is ExecutorState.RUNNING)
    pid = json.loads((executor.workdir / name / SPEC_FILE).read_text())["pid"]
    executor.cancel(name)
    job = executor.get(name)
    assert job.state is ExecutorState.CANCELLED and job.state.is_failure
    assert not (executor.workdir / name / EXIT_FILE).exists()
    assert not _group_alive(pid)  # nothing of the group is left running
    executor.cancel(name)  # idempotent
    assert executor.get(name).state is ExecutorState.CANCELLED


def test_cancel_kills_a_trainer_that_ignores_sigterm(workdir: Path) -> None:
    ex = build_executor(make_settings(workdir, local_cancel_grace_seconds=0.2))
    name = ex.submit(req("ignore-term")).name
    seen = report(ex, name)  # SIGTERM is ignored from here on
    assert seen["job_id"] == "JobXyZ"
    pid = json.loads((ex.workdir / name / SPEC_FILE).read_text())["pid"]
    ex.cancel(name)
    assert not _group_alive(pid)
    assert ex.get(name).state is ExecutorState.CANCELLED


def test_cancelling_a_finished_job_keeps_its_outcome(executor: LocalExecutor) -> None:
    name = executor.submit(req("exit0")).name
    wait_terminal(executor, name)
    executor.cancel(name)
    assert executor.get(name).state is ExecutorState.SUCCEEDED
    executor.cancel(job_dir_name("never-submitted", 1))  # missing: no-op


def test_a_vanished_process_is_a_failed_attempt(executor: LocalExecutor) -> None:
    name = executor.submit(req("wait")).name
    report(executor, name)
    pid = json.loads((executor.workdir / name / SPEC_FILE).read_text())["pid"]
    os.killpg(pid, signal.SIGKILL)  # e.g. the OOM killer took the whole group
    job = wait_terminal(executor, name)
    assert job.state is ExecutorState.FAILED and job.raw_state == "vanished"
    assert "vanished" in (job.error or "")


def test_unknown_names_are_not_found(executor: LocalExecutor) -> None:
    for name in ("../../etc", job_dir_name("nope", 1), "projects/p/locations/r/customJobs/1"):
        with pytest.raises(ExecutorNotFound):
            executor.get(name)
