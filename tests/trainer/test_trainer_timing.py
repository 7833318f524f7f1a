"""Phase timings and worker seconds: the pure helpers, and the job's cost fields
written by the reporter against the Firestore emulator."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from actorgen import schema
from lora_trainer.errors import Cancelled
from lora_trainer.reporting import FinishResult, JobReporter
from lora_trainer.timing import (
    Phase,
    PhaseTimer,
    WorkerMeter,
    format_table,
    price_per_hour,
    process_start_monotonic,
)
from lora_trainer.training import Progress

from tests.trainer.seed import seed_job

F = schema.Field
S = schema.JobStatus


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_nested_phases_count_once_and_add_up_to_the_total() -> None:
    clock = FakeClock()
    timer = PhaseTimer(started=90.0, clock=clock)
    timer.mark_since_start(Phase.STARTUP)  # 10 s before the trainer's code ran
    with timer.phase(Phase.STEPS):
        clock.now += 30
        with timer.phase(Phase.CHECKPOINTS):  # inside the steps, counted once
            clock.now += 5
        clock.now += 20
    with timer.phase(Phase.STEPS):  # a phase entered again adds up
        clock.now += 1
    timer.move(Phase.STEPS, Phase.COMPILE, 12)
    timer.move(Phase.STEPS, Phase.COMPILE, 1000)  # never more than the source has
    values = timer.total()
    assert values[Phase.STARTUP] == 10 and values[Phase.CHECKPOINTS] == 5
    assert values[Phase.STEPS] == 0 and values[Phase.COMPILE] == 51
    assert values[Phase.TOTAL] == 66 == sum(v for k, v in values.items() if k != Phase.TOTAL)


def test_a_phase_that_raises_is_still_timed() -> None:
    clock = FakeClock()
    timer = PhaseTimer(clock=clock)
    with pytest.raises(RuntimeError), timer.phase(Phase.MODEL):
        clock.now += 3
        raise RuntimeError("download failed")
    assert timer.total()[Phase.MODEL] == 3


def test_table_lists_phases_in_job_order_with_shares() -> None:
    table = format_table({Phase.UPLOAD: 1.0, Phase.STEPS: 6.0, Phase.STARTUP: 2.0,
                          Phase.TOTAL: 10.0, "custom": 0.5, Phase.COMPILE: None})
    lines = table.splitlines()
    names = [line.split()[0] for line in lines[1:]]
    assert names == [Phase.STARTUP, Phase.COMPILE, Phase.STEPS, Phase.UPLOAD, "custom",
                     "(other)", Phase.TOTAL]
    assert "60.0%" in lines[3] and lines[2].split()[1] == "-"
    assert lines[-2].split()[1] == "0.50"  # 10 - 9.5 not in any phase


def test_process_start_is_before_now() -> None:
    started = process_start_monotonic()
    assert started <= time.monotonic()


@pytest.mark.parametrize(("raw", "expected"), [
    ("", None), ("  ", None), ("2.5", 2.5), ("0", 0.0), ("abc", None), ("-1", None),
    ("nan", None), ("inf", None),
])
def test_price_per_hour_from_the_environment(raw: str, expected: float | None) -> None:
    assert price_per_hour({schema.ENV_GPU_PRICE_PER_HOUR: raw}) == expected
    assert price_per_hour({}) is None


def test_meter_hands_out_each_second_once_and_takes_back_failed_writes() -> None:
    clock = FakeClock()
    meter = WorkerMeter(started=90.0, price_per_hour=3.6, clock=clock)
    with meter.charge() as amounts:
        assert amounts == {F.GPU_SECONDS: 10.0, F.ESTIMATED_COST_USD: 0.01}
    clock.now += 5
    with pytest.raises(OSError), meter.charge() as amounts:
        assert amounts[F.GPU_SECONDS] == 5
        raise OSError("write failed")
    clock.now += 1
    assert meter.take() == 6  # the failed write's 5 s travel with the next one
    assert meter.written == 10
    assert WorkerMeter(clock=clock).cost(3600) is None  # no price: seconds only


def _progress(step: int) -> Progress:
    return Progress(step=step, total_steps=10, loss=0.5, samples_per_second=1.0,
                    eta_seconds=1.0, elapsed_seconds=1.0)


def test_every_write_adds_the_worker_seconds_and_their_cost(emulators: Any, db: Any,
                                                             bucket: Any, tmp_path: Path) -> None:
    job = seed_job(db, bucket, tmp_path, images=1)
    # An earlier attempt's seconds are already on the job: they are added to, not replaced.
    db.collection(schema.TRAINING_JOBS).document(job.job_id).update(
        {F.GPU_SECONDS: 100.0, F.ESTIMATED_COST_USD: 0.1})
    clock = FakeClock()
    meter = WorkerMeter(started=clock.now - 20, price_per_hour=36.0, clock=clock)
    reporter = JobReporter(db, job.job_id, 1, min_interval=0, meter=meter)
    reporter.start()  # 20 s since the process started
    doc = job.job(db)
    assert doc[F.GPU_SECONDS] == pytest.approx(120.0)
    assert doc[F.ESTIMATED_COST_USD] == pytest.approx(0.1 + 20 * 36 / 3600)
    clock.now += 30
    reporter.set_status(S.TRAINING)
    clock.now += 5
    reporter.progress(_progress(1))
    with reporter.keepalive(S.TRAINING, every=0.05):  # the heartbeat thread charges too
        clock.now += 7
        time.sleep(0.5)
    assert job.job(db)[F.GPU_SECONDS] == pytest.approx(162.0)

    # A write that does not go through leaves its seconds for the next one.
    db.collection(schema.TRAINING_JOBS).document(job.job_id).update({F.CANCEL_REQUESTED: True})
    clock.now += 3
    with pytest.raises(Cancelled):
        reporter.progress(_progress(2), force=True)
    assert job.job(db)[F.GPU_SECONDS] == pytest.approx(162.0)
    clock.now += 1
    assert reporter.finish_cancelled()
    doc = job.job(db)
    assert doc[F.STATUS] == S.CANCELLED and doc[F.GPU_SECONDS] == pytest.approx(166.0)
    assert doc[F.ESTIMATED_COST_USD] == pytest.approx(0.1 + 66 * 36 / 3600)
    assert meter.written == pytest.approx(66.0)


def test_final_write_and_final_timings_carry_the_last_seconds(emulators: Any, db: Any,
                                                               bucket: Any,
                                                               tmp_path: Path) -> None:
    job = seed_job(db, bucket, tmp_path, images=1)
    clock = FakeClock()
    meter = WorkerMeter(started=clock.now, clock=clock)  # no price: no cost field
    reporter = JobReporter(db, job.job_id, 1, meter=meter)
    reporter.start()
    reporter.set_status(S.UPLOADING)
    clock.now += 50
    reporter.finish_success(FinishResult(
        trained_model_id=job.job_id, artifacts={}, metrics={}, timings={Phase.STEPS: 40.0},
        base_model_id="m", trigger="ohwx person", step=1, total_steps=1))
    clock.now += 2
    assert reporter.record_final_timings({Phase.FINAL_WRITE: 1.5, Phase.TOTAL: 52.0})
    doc = job.job(db)
    assert doc[F.STATUS] == S.COMPLETED and doc[F.GPU_SECONDS] == pytest.approx(52.0)
    assert F.ESTIMATED_COST_USD not in doc
    assert doc[F.TIMINGS] == {Phase.STEPS: 40.0, Phase.FINAL_WRITE: 1.5, Phase.TOTAL: 52.0}
    # A job that is gone: nothing raised, nothing written.
    db.collection(schema.TRAINING_JOBS).document(job.job_id).delete()
    assert not reporter.record_final_timings({Phase.TOTAL: 60.0})
