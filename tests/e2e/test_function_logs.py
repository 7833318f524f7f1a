"""The deployed functions' log lines, read where the Functions emulator puts them.

The emulator prints every line a Python function writes (``>  {...}``); in
production Cloud Run parses the same JSON object into a log entry. So this reads
the lines of a real trigger run and parses them as Cloud Logging would.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from actorgen import schema
from actorgen.schema import Field, JobStatus

pytestmark = pytest.mark.e2e


def _function_lines(log_text: str) -> list[dict[str, Any]]:
    out = []
    for line in log_text.splitlines():
        start = line.find("{")
        if start < 0 or not line[:start].strip().startswith(">"):
            continue
        try:
            entry = json.loads(line[start:])
        except ValueError:
            continue
        if isinstance(entry, dict) and "severity" in entry:
            out.append(entry)
    return out


def test_intake_lines_carry_the_job_and_user(functions_emulators: Any, unique_id: str) -> None:
    db = functions_emulators.firestore_client()
    uid, job_id = f"u-{unique_id}", f"job-{unique_id}"
    job_ref = db.collection(schema.TRAINING_JOBS).document(job_id)
    # A job for an actor that does not exist: intake rejects it at once.
    job_ref.set({Field.USER_ID: uid, Field.ACTOR_ID: f"missing-{unique_id}",
                 Field.STATUS: JobStatus.PENDING})

    deadline = time.monotonic() + 120  # bounds a hang; not a speed check
    mine: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        status = (job_ref.get().to_dict() or {}).get(Field.STATUS)
        lines = _function_lines(functions_emulators.log_path.read_text(errors="replace"))
        mine = [e for e in lines if e.get("jobId") == job_id]
        if status == JobStatus.REJECTED and mine:
            break
        time.sleep(0.5)
    assert mine, "no structured line of intake_job for this job in the emulator's log"
    for entry in mine:
        assert entry["function"] == "intake_job"
        assert entry["userId"] == uid
        assert "attempt" in entry and entry["severity"] in ("INFO", "WARNING", "ERROR")
    assert any(f"intake of job {job_id}" in e["message"] for e in mine)
