"""The whole-job benchmark prints the job's phase table (tiny shapes on the CPU here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lora_trainer import bench_job
from lora_trainer.timing import Phase


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_whole_job_bench_reports_every_phase(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "job.jsonl"
    code = bench_job.main(["--model", "sd15", "--size", "tiny", "--device", "cpu",
                           "--steps", "3", "--batch", "1", "--images", "2", "--prior",
                           "--num-class-images", "2", "--sample-steps", "1",
                           "--num-samples", "1", "--checkpoint-every", "2", "--quiet",
                           "--identity-samples", "1", "--identity-sample-steps", "1",
                           "--out", str(out)])
    assert code == 0
    [result] = [json.loads(line) for line in out.read_text().splitlines()]
    timings = result["timings"]
    assert set(Phase.ORDER) - {Phase.COMPILE} <= set(timings)  # compile only with --compile
    for name in bench_job.NOT_RUN:  # no Firestore or Storage here
        assert timings[name] is None
    ran = {k: v for k, v in timings.items() if v is not None and k != Phase.TOTAL}
    assert all(v >= 0 for v in ran.values()) and timings[Phase.STEPS] > 0
    assert sum(ran.values()) <= timings[Phase.TOTAL] + 0.01
    assert result["steps"] == 3 and result["prior_preservation"] is True
    assert result["identity"]["steps"] == [2, 3]  # the last 30% of 3 steps
    table = capsys.readouterr().err
    assert Phase.CLASS_IMAGES in table and Phase.TOTAL in table
