"""tools/reference_bench.py, the harness that times diffusers' example script for the
speed ratios: run here with a stand-in script (the real one is not in this project and
needs torchvision), which checks what the harness hands it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tools import reference_bench  # noqa: E402

#: Parses the options the example script has, and records what it was given.
STAND_IN = """
import argparse, json, pathlib
p = argparse.ArgumentParser()
for name in ("pretrained_model_name_or_path", "instance_data_dir", "instance_prompt",
             "output_dir", "mixed_precision", "lr_scheduler"):
    p.add_argument("--" + name, required=True)
for name in ("resolution", "train_batch_size", "max_train_steps", "rank",
             "lr_warmup_steps", "checkpointing_steps", "seed"):
    p.add_argument("--" + name, type=int, required=True)
p.add_argument("--learning_rate", type=float, required=True)
args = p.parse_args()
out = pathlib.Path(args.output_dir)
out.mkdir(parents=True)
(out / "args.json").write_text(json.dumps(vars(args)))
"""


def test_the_reference_gets_the_model_photos_and_settings(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    from PIL import Image

    script = tmp_path / "train_dreambooth_lora.py"
    script.write_text(STAND_IN)
    work = tmp_path / "work"
    out = tmp_path / "lines.jsonl"
    assert reference_bench.main(["--script", str(script), "--size", "tiny", "--steps", "3,7",
                                 "--batch", "2", "--resolution", "64", "--images", "3",
                                 "--work-dir", str(work), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line.get("steps") for line in lines[:2]] == [3, 7]
    assert lines[-1]["summary"] and lines[-1]["runs"] == 2
    assert capsys.readouterr().out.count("\n") == 3
    for steps in (3, 7):
        given = json.loads((work / f"out-{steps}" / "args.json").read_text())
        assert given["max_train_steps"] == steps and given["train_batch_size"] == 2
        assert given["rank"] == 16 and given["mixed_precision"] == "bf16"
        assert given["checkpointing_steps"] > steps
        model = Path(given["pretrained_model_name_or_path"])
        assert (model / "model_index.json").is_file() and (model / "unet").is_dir()
        photos = sorted(Path(given["instance_data_dir"]).glob("*.png"))
        assert len(photos) == 3
        assert all(Image.open(photo).size == (64, 64) for photo in photos)


def test_a_failing_reference_stops_with_its_command(tmp_path: Path) -> None:
    script = tmp_path / "broken.py"
    script.write_text("raise SystemExit(3)\n")
    with pytest.raises(SystemExit, match="exit 3"):
        reference_bench.main(["--script", str(script), "--size", "tiny", "--steps", "2",
                              "--resolution", "64", "--work-dir", str(tmp_path / "w")])


def test_a_missing_script_says_where_to_put_it(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        reference_bench.main(["--script", str(tmp_path / "absent.py")])
    assert ".ref/" in capsys.readouterr().err


def test_the_steady_rate_cancels_start_up() -> None:
    runs = [{"steps": 50, "wall_seconds": 40.0}, {"steps": 150, "wall_seconds": 60.0}]
    assert reference_bench.steady_rate(runs, batch=4) == pytest.approx(100 * 4 / 20.0)
    assert reference_bench.steady_rate(runs[:1] * 2, batch=4) is None
