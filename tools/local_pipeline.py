"""The whole pipeline on one machine: function params and a tiny base model.

Shared by the end-to-end test (``tests/e2e/conftest.py``) and the local demo
(``tools.demo``, ``bin/demo``): the Functions emulator runs the functions with the
``local`` executor, which starts the real trainer (``python -m lora_trainer``) from
the dev venv on a tiny, randomly initialised SD 1.x-shaped model (no download).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Where ``actorgen`` (functions/) and ``lora_trainer`` (trainer_image/) live.
SOURCE_DIRS = (REPO_ROOT / "functions", REPO_ROOT / "trainer_image")
#: A hub model that stays allowed next to the local one (as deployed).
ALLOWED_HUB_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
#: Interpreter of the dev venv (bin/setup): it has torch and diffusers for the trainer.
DEV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
#: The demo's tiny base model, built once (git-ignored).
TINY_MODEL_CACHE = REPO_ROOT / ".cache" / "demo-base-model"
_STAMP = ".actorgen-model"


def add_source_paths() -> None:
    """Put functions/ and trainer_image/ on ``sys.path`` (pytest's pythonpath does it for tests)."""
    for folder in reversed(SOURCE_DIRS):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))


def build_tiny_base_model(path: Path) -> Path:
    """Save a tiny SD 1.x-shaped pipeline (64 px native) to ``path``; returns the folder."""
    add_source_paths()
    from lora_trainer import synthetic  # imports torch: only when a model is built

    return synthetic.save_synthetic_model(path, "sd")


def _builder_stamp() -> str:
    """Changes when the synthetic model builder changes (so the cached model is rebuilt)."""
    source = REPO_ROOT / "trainer_image" / "lora_trainer" / "synthetic.py"
    return hashlib.sha256(source.read_bytes()).hexdigest()


def cached_tiny_base_model(folder: Path = TINY_MODEL_CACHE) -> tuple[Path, bool]:
    """The tiny model in ``folder``, built there first if missing or stale.

    Returns ``(folder, built)``. Built in a sibling folder and renamed into place, so
    an interrupted build never leaves a half-written model behind.
    """
    stamp = _builder_stamp()
    marker = folder / _STAMP
    if marker.is_file() and marker.read_text().strip() == stamp:
        return folder, False
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        build_tiny_base_model(partial)
        (partial / _STAMP).write_text(stamp + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder, True


def executor_dir(work_dir: Path) -> Path:
    """The LocalExecutor's folder (LOCAL_WORKDIR) inside a run's ``work_dir``."""
    return work_dir / "executor"


def local_functions_env(
    base_model: Path, work_dir: Path, trainer_python: str | Path | None = None
) -> dict[str, str]:
    """Params/env of the Functions emulator for a local run (``start_emulators(extra_env=)``).

    The LocalExecutor runs the trainer with ``trainer_python`` (default: the dev venv's,
    else this interpreter) and keeps its attempt folders in ``work_dir/executor``; the
    trainer's scratch space is ``work_dir/trainer``. ``base_model`` is allowed as a job's
    ``baseModelId``.
    """
    if trainer_python is None:
        trainer_python = DEV_PYTHON if DEV_PYTHON.exists() else sys.executable
    return {
        "EXECUTOR": "local",
        "LOCAL_TRAINER_PYTHON": str(trainer_python),
        "LOCAL_WORKDIR": str(executor_dir(work_dir)),
        "ALLOWED_BASE_MODELS": f"{base_model},{ALLOWED_HUB_MODEL}",
        # Passed on to the trainer process by the LocalExecutor (HF_*, ACTORGEN_*, OMP_*).
        "HF_HUB_OFFLINE": "1",
        "ACTORGEN_WORK_DIR": str(work_dir / "trainer"),
        "OMP_NUM_THREADS": "2",
        # Short sample renders, one identity score (at the last step) and a small disk
        # floor: a tiny model on a laptop (three scores of 4 samples took 40% of the run).
        "TRAINER_ARGS": "--sample-steps 8 --num-samples 2 --identity-checkpoints 1 "
                        "--identity-samples 2 --identity-sample-steps 8 --min-free-disk-mb 200",
    }
