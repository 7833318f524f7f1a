"""The `actorgen` command against the Firestore and Storage emulators.

Commands run through the console script's own entry point (``main(argv)``, and a
real ``python -m actorgen.cli`` process); where a command waits for the
``on_job_updated`` function, the test delivers the update event to the function's
real handler (:func:`actorgen.admin.handle_job_update`), as the Functions runtime would.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from actorgen import admin, schema
from actorgen.cli.main import (
    EXIT_NOT_COMPLETED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    main,
)
from actorgen.config import Settings
from actorgen.schema import (
    AttemptField,
    AttemptOutcome,
    Field,
    JobStatus,
    ModelVersionField,
    StatusChangeField,
)

from tests.functions.jobdocs import new_id, put_actor, read

REPO_ROOT = Path(__file__).resolve().parents[2]
JOBS = schema.TRAINING_JOBS
NOW = datetime.now(UTC)


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def put_job(db: Any, status: str, *, user: str = "alice", actor_id: str | None = None,
            created: datetime | None = None, **fields: Any) -> str:
    job_id = new_id("job")
    db.collection(JOBS).document(job_id).set({
        Field.USER_ID: user, Field.ACTOR_ID: actor_id or new_id("actor"),
        Field.STATUS: status, Field.CREATED_AT: created or NOW, Field.ATTEMPT: 0,
        Field.ATTEMPT_HISTORY: [], **fields,
    })
    return job_id


def in_background(target: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``target`` in a thread; the returned function joins it and gives its result."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(target()), daemon=True)
    thread.start()

    def join() -> Any:
        thread.join(timeout=60)
        assert not thread.is_alive(), "the command did not return"
        return result[0]

    return join


def deliver_update_when(db: Any, job_id: str, changed: Callable[[dict], bool],
                        before: dict) -> str:
    """Wait for the command's write, then hand the update event to on_job_updated's handler."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = read(db, JOBS, job_id)
        if changed(after):
            return admin.handle_job_update(job_id, before, after, Settings(executor_kind="local"),
                                           db=db)
        time.sleep(0.05)
    raise AssertionError("the command never wrote its request")


def test_jobs_filters_by_status_user_actor_and_age(db: Any) -> None:
    actor = new_id("actor")
    failed = put_job(db, JobStatus.FAILED, actor_id=actor, created=NOW - timedelta(minutes=5))
    queued = put_job(db, JobStatus.QUEUED, actor_id=actor, created=NOW - timedelta(minutes=1))
    old = put_job(db, JobStatus.COMPLETED, user="bob", created=NOW - timedelta(days=3),
                  **{Field.GPU_SECONDS: 720.0, Field.ESTIMATED_COST_USD: 0.2})

    code, out, _ = run("jobs", "--json")
    assert code == EXIT_OK
    assert [r["id"] for r in json.loads(out)] == [queued, failed, old]  # newest first
    assert [r["id"] for r in json.loads(run("jobs", "--json", "--status", "failed,completed")[1])] \
        == [failed, old]
    assert [r["id"] for r in json.loads(run("--json", "jobs", "--user", "bob")[1])] == [old]
    assert [r["id"] for r in json.loads(run("jobs", "--actor", actor, "--status", "queued",
                                            "--json")[1])] == [queued]
    assert [r["id"] for r in json.loads(run("jobs", "--since", "1h", "--json")[1])] == [queued, failed]
    assert [r["id"] for r in json.loads(run("jobs", "--older-than", "1d", "--json")[1])] == [old]
    assert [r["id"] for r in json.loads(run("jobs", "--limit", "1", "--json")[1])] == [queued]

    code, out, _ = run("jobs")
    header, *rows = out.splitlines()
    assert header.split() == ["JOB", "STATUS", "PROG", "TRY", "USER", "ACTOR", "AGE", "GPU", "COST"]
    assert rows[2].split()[:2] == [old, "completed"] and rows[2].split()[-2:] == ["12m00s", "$0.20"]

    code, _, err = run("jobs", "--status", "done")
    assert code == EXIT_USAGE and "unknown status 'done'" in err
    code, _, err = run("jobs", "--since", "yesterday")
    assert code == EXIT_USAGE and "e.g. 90s, 15m" in err


def test_job_shows_timeline_attempts_timings_metrics_artifacts_and_cost(db: Any) -> None:
    history = [
        {StatusChangeField.STATUS: s, StatusChangeField.AT: NOW + timedelta(minutes=m)}
        for s, m in ((JobStatus.PENDING, 0), (JobStatus.QUEUED, 0.5), (JobStatus.DISPATCHING, 1),
                     (JobStatus.DISPATCHED, 1.1), (JobStatus.QUEUED, 20),
                     (JobStatus.DISPATCHING, 22), (JobStatus.DISPATCHED, 22.1),
                     (JobStatus.PREPARING, 25), (JobStatus.TRAINING, 27),
                     (JobStatus.UPLOADING, 40), (JobStatus.COMPLETED, 41))
    ]
    job_id = put_job(db, JobStatus.COMPLETED, **{
        Field.STATUS_HISTORY: history, Field.ATTEMPT: 2, Field.MAX_ATTEMPTS: 3,
        Field.EXECUTOR_JOB_NAME: "projects/p/locations/r/customJobs/222",
        Field.ATTEMPT_HISTORY: [{
            AttemptField.ATTEMPT: 1, AttemptField.OUTCOME: AttemptOutcome.LOST,
            AttemptField.EXECUTOR_JOB_NAME: "projects/p/locations/r/customJobs/111",
            AttemptField.ERROR: "the executor no longer knows the job",
            AttemptField.ENDED_AT: NOW + timedelta(minutes=20),
        }],
        Field.TIMINGS: {"trainSeconds": 780.5}, Field.METRICS: {"finalLoss": 0.0812},
        Field.ARTIFACTS: {"lora_kohya.safetensors": "users/alice/x/lora_kohya.safetensors"},
        Field.GPU_SECONDS: 1500.0, Field.ESTIMATED_COST_USD: 0.4125, Field.PROGRESS: 100,
    })

    code, out, _ = run("job", job_id, "--json")
    assert code == EXIT_OK
    detail = json.loads(out)
    assert [e["status"] for e in detail["timeline"]] == [e["status"] for e in history]
    assert detail["timeline"][-1]["at"] == history[-1]["at"].isoformat()
    assert [(a["attempt"], a["outcome"], a["executorJobName"]) for a in detail["attempts"]] == [
        (1, "lost", "projects/p/locations/r/customJobs/111"),
        (2, None, "projects/p/locations/r/customJobs/222"),
    ]
    assert detail["timings"] == {"trainSeconds": 780.5} and detail["metrics"]["finalLoss"] == 0.0812
    assert detail["artifacts"]["lora_kohya.safetensors"].endswith("lora_kohya.safetensors")
    assert (detail["gpuSeconds"], detail["estimatedCostUsd"]) == (1500.0, 0.4125)

    code, out, _ = run("job", job_id)
    assert code == EXIT_OK
    assert f"job {job_id}: completed" in out
    assert "GPU time: 25m00s, estimated cost: $0.41" in out
    assert "completed (+1m00s)" in out and "the executor no longer knows the job" in out
    assert "trainSeconds: 780.5" in out and "finalLoss: 0.0812" in out

    code, _, err = run("job", "no-such-job")
    assert code == EXIT_NOT_FOUND and "no job 'no-such-job'" in err


def test_redispatch_goes_through_the_on_job_updated_function(db: Any) -> None:
    actor_id = put_actor(db, "alice")
    job_id = put_job(db, JobStatus.FAILED, actor_id=actor_id, **{
        Field.ATTEMPT: 3, Field.MAX_ATTEMPTS: 3, Field.ERROR: "Training failed after 3 attempts",
        Field.FINISHED_AT: NOW,
    })
    db.collection(schema.ACTORS).document(actor_id).update({Field.LATEST_JOB_ID: job_id})
    before = read(db, JOBS, job_id)

    join = in_background(lambda: run("redispatch", job_id, "--wait", "30", "--json"))
    action = deliver_update_when(db, job_id, lambda j: j[Field.STATUS] == JobStatus.QUEUED, before)
    assert action == admin.AdminAction.REDISPATCH
    code, out, _ = join()
    assert code == EXIT_OK
    assert json.loads(out) == {"id": job_id, "requested": "re-dispatch", "confirmed": True,
                               "status": "queued", "error": None}
    job = read(db, JOBS, job_id)
    assert job[Field.MAX_ATTEMPTS] == 3 + 3 and job[Field.NEXT_ATTEMPT_AT] is not None
    assert job[Field.ATTEMPT_HISTORY][-1][AttemptField.OUTCOME] == AttemptOutcome.ADMIN_REDISPATCH


@pytest.mark.parametrize("status", [JobStatus.COMPLETED, JobStatus.TRAINING, JobStatus.QUEUED])
def test_redispatch_of_a_job_that_is_not_failed_is_refused_untouched(db: Any, status: str) -> None:
    job_id = put_job(db, status)
    before = read(db, JOBS, job_id)
    code, _, err = run("redispatch", job_id, "--wait", "0")
    assert code == EXIT_REFUSED
    assert f"job is {status!r}: only a failed job can be re-dispatched" in err
    assert read(db, JOBS, job_id) == before


def test_redispatch_without_a_function_running_times_out_and_says_why(db: Any) -> None:
    job_id = put_job(db, JobStatus.FAILED, **{Field.ATTEMPT: 1, Field.MAX_ATTEMPTS: 1})
    code, out, err = run("redispatch", job_id, "--wait", "0.5")
    assert code == EXIT_TIMEOUT
    assert "has not acted within 0.5s" in err and "requested" in out
    assert read(db, JOBS, job_id)[Field.STATUS] == JobStatus.QUEUED  # the console's edit


def test_cancel_goes_through_the_on_job_updated_function(db: Any) -> None:
    job_id = put_job(db, JobStatus.QUEUED, **{Field.NEXT_ATTEMPT_AT: NOW})
    before = read(db, JOBS, job_id)
    join = in_background(lambda: run("cancel", job_id, "--wait", "30"))
    action = deliver_update_when(db, job_id, lambda j: bool(j.get(Field.CANCEL_REQUESTED)), before)
    assert action == admin.AdminAction.CANCEL
    code, out, _ = join()
    assert code == EXIT_OK and f"cancel of job {job_id} done: now cancelled" in out
    assert read(db, JOBS, job_id)[Field.STATUS] == JobStatus.CANCELLED

    code, _, err = run("cancel", job_id)
    assert code == EXIT_REFUSED and "a cancelled job has nothing to cancel" in err
    code, _, err = run("cancel", put_job(db, JobStatus.FAILED))
    assert code == EXIT_REFUSED and "'failed'" in err


def test_follow_shows_progress_until_the_job_ends(db: Any) -> None:
    job_id = put_job(db, JobStatus.TRAINING, **{Field.PROGRESS: 10, Field.STEP: 80,
                                                Field.TOTAL_STEPS: 800})
    join = in_background(lambda: run("follow", job_id, "--interval", "0.05", "--json"))
    ref = db.collection(JOBS).document(job_id)
    time.sleep(0.5)
    ref.update({Field.PROGRESS: 60, Field.STEP: 480, Field.LOSS: 0.1})
    time.sleep(0.5)
    ref.update({Field.STATUS: JobStatus.COMPLETED, Field.PROGRESS: 100, Field.STEP: 800})
    code, out, _ = join()
    assert code == EXIT_OK
    states = [json.loads(line) for line in out.splitlines()]
    assert [(s["status"], s["progress"]) for s in states] == [
        ("training", 10), ("training", 60), ("completed", 100)
    ]

    failed = put_job(db, JobStatus.FAILED, **{Field.ERROR: "out of attempts"})
    code, out, err = run("follow", failed, "--interval", "0.05")
    assert code == EXIT_NOT_COMPLETED and "failed" in out and "out of attempts" in err
    code, _, err = run("follow", put_job(db, JobStatus.QUEUED), "--interval", "0.05",
                       "--timeout", "0.3")
    assert code == EXIT_TIMEOUT and "still queued" in err


def test_models_lists_versions_with_their_files(db: Any, bucket: Any) -> None:
    actor_id = put_actor(db, "alice")
    versions = []
    for version, job_id in ((1, "jobA"), (2, "jobB")):
        prefix = schema.model_prefix("alice", actor_id, job_id)
        bucket.blob(prefix + "lora_kohya.safetensors").upload_from_string(b"x" * (100 * version))
        versions.append({
            ModelVersionField.VERSION: version, ModelVersionField.MODEL_ID: job_id,
            ModelVersionField.JOB_ID: job_id, ModelVersionField.TRIGGER: "ohwx person",
            ModelVersionField.BASE_MODEL_ID: "stable-diffusion-v1-5/stable-diffusion-v1-5",
            ModelVersionField.ARTIFACTS: {"lora_kohya.safetensors": prefix + "lora_kohya.safetensors"},
            ModelVersionField.CREATED_AT: NOW,
        })
    db.collection(schema.ACTORS).document(actor_id).update({
        Field.MODEL_VERSIONS: list(reversed(versions)), Field.MODEL_ID: "jobB",
        Field.MODEL_STATUS: "ready",
    })
    code, out, _ = run("models", actor_id, "--json")
    assert code == EXIT_OK
    result = json.loads(out)
    assert (result["modelStatus"], result["modelId"]) == ("ready", "jobB")
    assert [(v["version"], [(f["path"].rsplit("/", 2)[-2], f["size"]) for f in v["files"]])
            for v in result["versions"]] == [(1, [("jobA", 100)]), (2, [("jobB", 200)])]
    code, out, _ = run("models", actor_id)
    assert "v2  model jobB" in out and "200  users/alice/" in out
    code, _, err = run("models", "nobody")
    assert code == EXIT_NOT_FOUND and "no actor 'nobody'" in err


def test_stats_over_a_period(db: Any) -> None:
    put_job(db, JobStatus.COMPLETED, created=NOW - timedelta(hours=2), **{
        Field.ATTEMPT: 1, Field.GPU_SECONDS: 900, Field.ESTIMATED_COST_USD: 0.25})
    put_job(db, JobStatus.FAILED, created=NOW - timedelta(hours=3), **{
        Field.ATTEMPT: 3, Field.GPU_SECONDS: 300, Field.ESTIMATED_COST_USD: 0.1})
    put_job(db, JobStatus.QUEUED, created=NOW - timedelta(minutes=30), **{
        Field.QUEUED_AT: NOW - timedelta(minutes=30), Field.NEXT_ATTEMPT_AT: NOW})
    put_job(db, JobStatus.COMPLETED, created=NOW - timedelta(days=30), **{
        Field.ATTEMPT: 1, Field.GPU_SECONDS: 5000, Field.ESTIMATED_COST_USD: 9.0})
    code, out, _ = run("stats", "--since", "1d", "--json")
    assert code == EXIT_OK
    s = json.loads(out)
    assert s["perStatus"] == {"completed": 1, "failed": 1, "queued": 1}
    assert s["gpuSeconds"] == 1200 and s["estimatedCostUsd"] == pytest.approx(0.35)
    assert s["attempts"]["histogram"] == {"1": 1, "3": 1}
    assert s["queue"]["queued"] == 1 and s["queue"]["oldestAgeSeconds"] >= 1800
    code, out, _ = run("stats", "--since", "1d")
    assert "estimated cost $0.35" in out and "queue now: 1 queued" in out


def test_the_installed_entry_point_runs_as_a_process(emulators: Any, db: Any) -> None:
    job_id = put_job(db, JobStatus.QUEUED)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "functions")}
    proc = subprocess.run([sys.executable, "-m", "actorgen.cli", "jobs", "--json"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert [r["id"] for r in json.loads(proc.stdout)] == [job_id]
    proc = subprocess.run([sys.executable, "-m", "actorgen.cli", "job", "missing"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_NOT_FOUND and "no job 'missing'" in proc.stderr


def test_redispatch_keeps_one_active_job_per_actor(db: Any) -> None:
    actor_id = put_actor(db, "alice")
    failed = put_job(db, JobStatus.FAILED, actor_id=actor_id, **{Field.ATTEMPT: 3,
                                                                 Field.MAX_ATTEMPTS: 3})
    running = put_job(db, JobStatus.TRAINING, actor_id=actor_id)
    before = read(db, JOBS, failed)
    code, _, err = run("redispatch", failed, "--wait", "0")
    assert code == EXIT_REFUSED
    assert f"actor {actor_id!r} already has a training job in progress ({running})" in err
    assert read(db, JOBS, failed) == before


def test_a_redispatch_the_function_turns_down_is_reported_refused(db: Any) -> None:
    actor_id = put_actor(db, "alice")
    failed = put_job(db, JobStatus.FAILED, actor_id=actor_id, **{Field.ATTEMPT: 3,
                                                                 Field.MAX_ATTEMPTS: 3})
    before = read(db, JOBS, failed)
    join = in_background(lambda: run("redispatch", failed, "--wait", "30"))

    def another_job_started_meanwhile(after: dict) -> bool:
        if after[Field.STATUS] != JobStatus.QUEUED:
            return False
        put_job(db, JobStatus.QUEUED, actor_id=actor_id)
        return True

    action = deliver_update_when(db, failed, another_job_started_meanwhile, before)
    assert action == admin.AdminAction.REFUSE
    code, out, err = join()
    assert code == EXIT_REFUSED and "refused: now failed" in out
    assert "put the job back to failed" in err


def test_an_unreachable_firestore_is_an_error_after_the_rpc_timeout(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "functions"),
           "FIRESTORE_EMULATOR_HOST": f"127.0.0.1:{port}", "GCLOUD_PROJECT": "demo-actorgen"}
    proc = subprocess.run([sys.executable, "-m", "actorgen.cli", "jobs", "--rpc-timeout", "2"],
                          env=env, capture_output=True, text=True, timeout=100, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("actorgen jobs: RetryError") and "failed to connect" in proc.stderr
