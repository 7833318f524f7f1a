"""The final write (job completed, actor ready) survives transient Firestore errors.

The artifacts are uploaded before it; without retries a blip there became a
retryable attempt error and the next attempt trained again from step 0. The
reporter is the real JobReporter on the Firestore emulator; only its first
calls are made to fail, with the google.api_core errors the client raises.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from actorgen import schema
from google.api_core import exceptions as gexc
from lora_trainer import run
from lora_trainer.errors import Superseded
from lora_trainer.reporting import FinishResult, JobReporter

from tests.trainer.seed import TOY_SETTINGS, seed_job

F = schema.Field
S = schema.JobStatus


class FlakyReporter(JobReporter):
    """Raises ``failures`` (one per call) before finishing for real.

    ``commit_first``: the first failing call commits, then raises (the answer was lost).
    """

    def __init__(self, *args: Any, failures: list[BaseException], commit_first: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failures = list(failures)
        self.commit_first = commit_first
        self.calls = 0

    def finish_success(self, result: FinishResult) -> int:
        self.calls += 1
        if self.failures:
            if self.commit_first and self.calls == 1:
                super().finish_success(result)
            raise self.failures.pop(0)
        return super().finish_success(result)


def _result(job_id: str) -> FinishResult:
    return FinishResult(trained_model_id=job_id, artifacts={"a.safetensors": "x/a"},
                        metrics={"finalLoss": 0.1}, timings={"totalSeconds": 1.0},
                        base_model_id="m", trigger="ohwx person", step=10, total_steps=10)


def _uploading(db: Any, bucket: Any, tmp_path: Path, **kwargs: Any) -> tuple[Any, FlakyReporter]:
    job = seed_job(db, bucket, tmp_path, images=1)
    reporter = FlakyReporter(db, job.job_id, 1, **kwargs)
    reporter.start()
    reporter.set_status(S.UPLOADING)
    return job, reporter


def _contention() -> ValueError:
    # What firestore.transactional raises when Aborted persists through its own retries.
    try:
        try:
            raise gexc.Aborted("too much contention on these documents")
        except gexc.Aborted as aborted:
            raise ValueError("Failed to commit transaction in 5 attempts.") from aborted
    except ValueError as err:
        return err


def test_transient_errors_are_retried_with_backoff(emulators: Any, db: Any, bucket: Any,
                                                   tmp_path: Path) -> None:
    job, reporter = _uploading(db, bucket, tmp_path, failures=[
        gexc.ServiceUnavailable("unavailable"), gexc.DeadlineExceeded("deadline"),
        gexc.InternalServerError("internal"), _contention()])
    sleeps: list[float] = []
    assert run.finish_with_retry(reporter, _result(job.job_id), sleep=sleeps.append) == 1
    assert reporter.calls == 5 and sleeps == [1.0, 2.0, 4.0, 8.0]
    doc = job.job(db)
    assert doc[F.STATUS] == S.COMPLETED and doc[F.ERROR] is None
    assert len(job.actor(db)[F.MODEL_VERSIONS]) == 1


def test_a_commit_whose_answer_was_lost_counts_as_done(emulators: Any, db: Any, bucket: Any,
                                                       tmp_path: Path) -> None:
    job, reporter = _uploading(db, bucket, tmp_path, commit_first=True,
                               failures=[gexc.DeadlineExceeded("answer lost")])
    sleeps: list[float] = []
    assert run.finish_with_retry(reporter, _result(job.job_id), sleep=sleeps.append) is None
    assert reporter.calls == 2 and sleeps == [1.0]
    assert job.job(db)[F.STATUS] == S.COMPLETED
    assert len(job.actor(db)[F.MODEL_VERSIONS]) == 1


def test_gives_up_after_five_retries(emulators: Any, db: Any, bucket: Any,
                                     tmp_path: Path) -> None:
    job, reporter = _uploading(db, bucket, tmp_path,
                               failures=[gexc.ServiceUnavailable(f"down {i}") for i in range(9)])
    sleeps: list[float] = []
    with pytest.raises(gexc.ServiceUnavailable, match="down 5"):
        run.finish_with_retry(reporter, _result(job.job_id), sleep=sleeps.append)
    assert reporter.calls == 6 and sleeps == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert job.job(db)[F.STATUS] == S.UPLOADING


@pytest.mark.parametrize("error", [gexc.PermissionDenied("no"), ValueError("a bug"),
                                   KeyError("metrics")])
def test_errors_a_retry_cannot_cure_are_raised_at_once(emulators: Any, db: Any, bucket: Any,
                                                       tmp_path: Path, error: Exception) -> None:
    job, reporter = _uploading(db, bucket, tmp_path, failures=[error])
    sleeps: list[float] = []
    with pytest.raises(type(error)):
        run.finish_with_retry(reporter, _result(job.job_id), sleep=sleeps.append)
    assert reporter.calls == 1 and sleeps == []


def test_cancelled_meanwhile_is_not_retried_into_completed(emulators: Any, db: Any, bucket: Any,
                                                          tmp_path: Path) -> None:
    job, reporter = _uploading(db, bucket, tmp_path,
                               failures=[gexc.ServiceUnavailable("unavailable")])
    db.collection(schema.TRAINING_JOBS).document(job.job_id).update({F.STATUS: S.CANCELLED})
    sleeps: list[float] = []
    with pytest.raises(Superseded):
        run.finish_with_retry(reporter, _result(job.job_id), sleep=sleeps.append)
    assert reporter.calls == 2 and sleeps == [1.0]
    assert job.job(db)[F.STATUS] == S.CANCELLED


def test_whole_run_completes_through_a_firestore_blip(emulators: Any, db: Any, bucket: Any,
                                                      tiny_sd: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    job = seed_job(db, bucket, tiny_sd, images=2)
    failures = [gexc.ServiceUnavailable("blip"), gexc.DeadlineExceeded("blip")]
    real_finish = JobReporter.finish_success

    def flaky(self: JobReporter, result: FinishResult) -> int:
        if failures:
            raise failures.pop(0)
        return real_finish(self, result)

    monkeypatch.setattr(JobReporter, "finish_success", flaky)
    monkeypatch.setattr(run, "FINISH_BACKOFF_SECONDS", (0.0, 0.0))
    code = run.run_job(run.RunOptions(
        job_id=job.job_id, attempt=1, project=emulators.project, bucket=emulators.bucket,
        work_dir=tmp_path / "work", max_steps_override=2, device="cpu", push_to_hub=False,
        progress_bar=False, settings=dict(TOY_SETTINGS)))
    assert code == run.EXIT_OK and not failures
    doc = job.job(db)
    assert doc[F.STATUS] == S.COMPLETED and doc[F.ERROR] is None and doc[F.MODEL_VERSION] == 1
    # Published, so the checkpoints went (the run did not end as an attempt error).
    assert not list(bucket.list_blobs(prefix=schema.checkpoint_prefix(job.job_id, 1)))
