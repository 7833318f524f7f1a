"""The trainer's log lines, as Vertex hands them to Cloud Logging: one JSON object each,
with the job, attempt, user and function, severity mapped, and no token."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from actorgen import logs, schema
from lora_trainer import models
from lora_trainer.run import RunOptions, run_job

from tests.trainer.seed import REPO_ROOT, TOY_ARGS, TOY_SETTINGS, seed_job, trainer_env

F = schema.Field
TOKEN = "hf_" + "Zy8xW7vU6tS5rQ4pO3nM2lK1jI0hG9fE8d"


def _json_lines(text: str) -> list[dict[str, Any]]:
    # Libraries may print plain text (warnings, progress bars); log records are JSON.
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_the_entry_point_writes_structured_lines(emulators: Any, db: Any, bucket: Any,
                                                 tmp_path: Path) -> None:
    # An actor that does not exist: the job fails in seconds, with an ERROR line.
    job = seed_job(db, bucket, tmp_path / "model", images=1, with_actor=False, attempt=3)
    result = subprocess.run(
        [sys.executable, "-m", "lora_trainer", *schema.trainer_args(job.job_id, 3),
         "--project", emulators.project, "--bucket", emulators.bucket,
         "--work-dir", str(tmp_path / "work"), *TOY_ARGS],
        env=trainer_env({**emulators.env, "HF_TOKEN": TOKEN}), cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 1, result.stderr[-3000:]
    assert TOKEN not in result.stderr + result.stdout
    lines = _json_lines(result.stderr)
    assert lines, result.stderr[-3000:]
    for line in lines:
        assert (line["jobId"], line["attempt"], line["function"]) == (
            job.job_id, 3, "lora_trainer"), line
    failed = [line for line in lines if line["severity"] == "ERROR"]
    assert failed and "does not exist" in failed[-1]["message"]
    assert failed[-1]["userId"] == job.uid  # known once the job document was read
    assert job.job(db)[F.STATUS] == schema.JobStatus.FAILED


def test_a_run_never_logs_the_token_it_read(emulators: Any, db: Any, bucket: Any,
                                            tiny_sd: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    levels = {name: logging.getLogger(name).level for name in logs.PROJECT_LOGGERS}
    stream = io.StringIO()
    handler = logs.install(stream=stream, function="lora_trainer")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real_load = models.load_base_model

    def chatty_load(*args: Any, **kwargs: Any) -> Any:
        # A library that prints the credential it was given, in a shape no pattern knows.
        logging.getLogger("lora_trainer.models").warning(
            "retrying with credential <%s>", kwargs.get("token", "")[::-1][::-1])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(models, "load_base_model", chatty_load)
    job = seed_job(db, bucket, tiny_sd, images=2)
    try:
        code = run_job(RunOptions(job_id=job.job_id, attempt=1, project=emulators.project,
                                  bucket=emulators.bucket, work_dir=tmp_path / "work",
                                  max_steps_override=2, device="cpu", progress_bar=False,
                                  settings=dict(TOY_SETTINGS)))
    finally:
        logging.getLogger().removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        logs.set_defaults(function=None, job_id=None, attempt=None, user_id=None)
    assert code == 0, job.job(db).get(F.ERROR)
    text = stream.getvalue()
    assert TOKEN not in text
    lines = _json_lines(text)
    assert "retrying with credential <***>" in [line["message"] for line in lines]
    done = [line for line in lines if "completed" in line["message"]]
    assert done and done[-1]["userId"] == job.uid and done[-1]["jobId"] == job.job_id
