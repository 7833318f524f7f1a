"""`actorgen redispatch` and `actorgen cancel` against the Functions emulator: the real
on_job_updated function acts on what the command writes, and the command reports it.

The command runs as its own process with only the suite's client variables, as an
operator's shell would have them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from actorgen import config, schema
from actorgen.schema import AttemptOutcome, Field, JobStatus, ModelStatus

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]


def actorgen(suite: Any, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **suite.env, "PYTHONPATH": str(REPO_ROOT / "functions")}
    return subprocess.run([sys.executable, "-m", "actorgen.cli", *argv], env=env,
                          capture_output=True, text=True, timeout=180)


def test_redispatch_and_cancel_through_the_deployed_function(
    functions_emulators: Any, unique_id: str
) -> None:
    db = functions_emulators.firestore_client()
    uid, actor_id = f"u-{unique_id}", f"actor-{unique_id}"
    db.collection(schema.ACTORS).document(actor_id).set(
        {Field.USER_ID: uid, Field.MODEL_STATUS: ModelStatus.FAILED})
    now = datetime.now(UTC)
    job_id = f"failed-{unique_id}"
    # A failed job as the pipeline leaves it, its actor otherwise idle.
    db.collection(schema.TRAINING_JOBS).document(job_id).set({
        Field.USER_ID: uid, Field.ACTOR_ID: actor_id, Field.INSTANCE_NAME: "ohwx",
        Field.BASE_MODEL_ID: "stable-diffusion-v1-5/stable-diffusion-v1-5",
        Field.STATUS: JobStatus.FAILED, Field.ATTEMPT: 2, Field.MAX_ATTEMPTS: 2,
        Field.ATTEMPT_HISTORY: [], Field.ERROR: "Training failed after 2 attempts",
        Field.CREATED_AT: now - timedelta(hours=1), Field.FINISHED_AT: now,
        Field.STATUS_HISTORY: [{"status": JobStatus.FAILED, "at": now}],
    })
    db.collection(schema.ACTORS).document(actor_id).update({Field.LATEST_JOB_ID: job_id})

    done = actorgen(functions_emulators, "redispatch", job_id, "--wait", "120", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["confirmed"] is True
    job = db.collection(schema.TRAINING_JOBS).document(job_id).get().to_dict()
    assert job[Field.MAX_ATTEMPTS] == 2 + config.MAX_ATTEMPTS.default  # a fresh budget
    assert job[Field.ATTEMPT_HISTORY][0]["outcome"] == AttemptOutcome.ADMIN_REDISPATCH

    # Re-dispatched (queued, or already handed to the executor): now stop it.
    cancelled = actorgen(functions_emulators, "cancel", job_id, "--wait", "180")
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"cancel of job {job_id} done: now cancelled" in cancelled.stdout

    shown = json.loads(actorgen(functions_emulators, "job", job_id, "--json").stdout)
    statuses = [e["status"] for e in shown["timeline"]]
    assert statuses[:2] == [JobStatus.FAILED, JobStatus.QUEUED]
    assert statuses[-1] == JobStatus.CANCELLED

    again = actorgen(functions_emulators, "redispatch", job_id, "--wait", "0")
    assert again.returncode == 4 and "only a failed job can be re-dispatched" in again.stderr
