"""Time diffusers' DreamBooth-LoRA example script on the benchmark's model, for ratios.

The issue's speed targets are ratios against diffusers' ``train_dreambooth_lora.py``
(SD 1.x) and ``train_dreambooth_lora_sdxl.py`` measured side by side on one GPU. That
script is not part of this project and is never committed: put a copy in the ignored
folder ``.ref/`` and name it with ``--script``. This tool gives it the same
random-weight model as ``python -m lora_trainer.bench`` (saved with
``save_pretrained``), the same number of synthetic photos as PNG files, and the
issue's settings (rank, batch, resolution, bf16), runs it for two step counts and
reports:

- ``wall_seconds`` of each run (start-up, model loading and saving included: the
  reference's whole job for that many steps);
- ``steady_samples_per_second``: the extra samples of the longer run over its extra
  seconds, which cancels start-up, loading and saving.

    python tools/reference_bench.py --script .ref/train_dreambooth_lora.py --kind sd \\
        --steps 50,150 --batch 4 --resolution 512 --out $OUT/reference.jsonl

One JSON line per run and one summary line. Needs what the script imports
(torchvision, diffusers, ...). Asserts nothing: figures, not tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "trainer_image", ROOT / "functions"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

INSTANCE_PROMPT = "a photo of ohwx person"


def write_photos(folder: Path, count: int, resolution: int) -> Path:
    """``count`` synthetic photos (the benchmark's) as PNG files in ``folder``."""
    import numpy as np
    from lora_trainer.bench import synthetic_photos
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = synthetic_photos(count, resolution)
    for index, image in enumerate(pixels):
        array = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255)
        Image.fromarray(array.astype(np.uint8)).save(folder / f"photo-{index:02d}.png")
    return folder


def reference_args(*, model: Path, photos: Path, output: Path, steps: int, batch: int,
                   resolution: int, rank: int, precision: str, seed: int) -> list[str]:
    """The example script's options for the issue's comparison job."""
    return [
        "--pretrained_model_name_or_path", str(model),
        "--instance_data_dir", str(photos),
        "--instance_prompt", INSTANCE_PROMPT,
        "--output_dir", str(output),
        "--resolution", str(resolution),
        "--train_batch_size", str(batch),
        "--max_train_steps", str(steps),
        "--rank", str(rank),
        "--learning_rate", "1e-4",
        "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0",
        "--mixed_precision", precision,
        "--checkpointing_steps", str(steps + 1),  # no intermediate checkpoints
        "--seed", str(seed),
    ]


def run_reference(script: Path, args: list[str], env: dict[str, str]) -> float:
    """Run the script to the end; its wall seconds."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(script), *args], env=env, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the reference script failed (exit {done.returncode}): "
                         f"{script} {' '.join(args)}")
    return seconds


def steady_rate(runs: list[dict[str, Any]], batch: int) -> float | None:
    """Samples/s of the longest run's steps beyond the shortest's (start-up cancels)."""
    short, long = min(runs, key=lambda r: r["steps"]), max(runs, key=lambda r: r["steps"])
    extra_seconds = long["wall_seconds"] - short["wall_seconds"]
    if long["steps"] == short["steps"] or extra_seconds <= 0:
        return None
    return (long["steps"] - short["steps"]) * batch / extra_seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--script", type=Path, required=True,
                   help="diffusers' train_dreambooth_lora.py (or _sdxl.py), e.g. in .ref/")
    p.add_argument("--kind", choices=("sd", "sdxl"), default="sd")
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--steps", default="50,150", help="step counts, comma-separated")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--mixed-precision", default="bf16", choices=("no", "fp16", "bf16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=None,
                   help="keep the model and photos here (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=None, help="append the JSON lines here")
    args = p.parse_args(argv)
    if not args.script.is_file():
        p.error(f"no reference script at {args.script}: copy diffusers' "
                "examples/dreambooth script into the ignored folder .ref/")
    from lora_trainer import synthetic

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="reference-bench-"))
    model = work / f"model-{args.kind}-{args.size}"
    if not (model / "model_index.json").is_file():
        synthetic.save_synthetic_model(model, args.kind, args.size, seed=args.seed)
    photos = write_photos(work / "photos", args.images, args.resolution)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    runs = []
    for steps in sorted({int(s) for s in args.steps.split(",") if s.strip()}):
        argv_ = reference_args(model=model, photos=photos, output=work / f"out-{steps}",
                               steps=steps, batch=args.batch, resolution=args.resolution,
                               rank=args.rank, precision=args.mixed_precision,
                               seed=args.seed)
        seconds = run_reference(args.script, argv_, env)
        runs.append({"reference": args.script.name, "kind": args.kind, "size": args.size,
                     "steps": steps, "batch": args.batch, "resolution": args.resolution,
                     "wall_seconds": round(seconds, 2),
                     "samples_per_second_overall": round(steps * args.batch / seconds, 2)})
        _emit(runs[-1], args.out)
    rate = steady_rate(runs, args.batch) if len(runs) > 1 else None
    _emit({"reference": args.script.name, "kind": args.kind, "summary": True,
           "steady_samples_per_second": None if rate is None else round(rate, 2),
           "runs": len(runs)}, args.out)
    return 0


def _emit(line: dict[str, Any], out: Path | None) -> None:
    text = json.dumps(line)
    print(text, flush=True)
    if out is not None:
        with out.open("a", encoding="utf-8") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
