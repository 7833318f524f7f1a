"""The GPU benchmark script runs end to end (tiny shapes on the CPU here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lora_trainer import bench


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_bench_runs_both_families_and_reports(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.jsonl"
    code = bench.main(["--model", "sd15,sdxl", "--size", "tiny", "--device", "cpu",
                       "--steps", "2", "--warmup", "1", "--batch", "1", "--images", "2",
                       "--quiet", "--out", str(out)])
    assert code == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["model"] for r in lines] == ["sd15", "sdxl"]
    for result in lines:
        assert result["samples_per_second"] > 0 and result["steps"] == 2
        assert result["resolution"] == 64 and result["mixed_precision"] == "no"
    assert capsys.readouterr().out.count("samples_per_second") == 2


def test_bench_rejects_unknown_models() -> None:
    assert bench.main(["--model", "flux", "--size", "tiny", "--device", "cpu"]) == 2
