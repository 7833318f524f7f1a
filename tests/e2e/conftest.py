"""Params of the Functions emulator for the end-to-end test: the local executor runs the
real trainer (``python -m lora_trainer`` from this dev venv) on a tiny synthetic model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ALLOWED_HUB_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 1.x-shaped pipeline on disk: the job's baseModelId (no download offline)."""
    from lora_trainer import synthetic

    return synthetic.save_synthetic_model(tmp_path_factory.mktemp("e2e-model") / "sd", "sd")


@pytest.fixture(scope="session")
def functions_env(tiny_base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("e2e-work")
    return {
        "EXECUTOR": "local",
        "LOCAL_TRAINER_PYTHON": sys.executable,  # the dev venv has torch and diffusers
        "LOCAL_WORKDIR": str(work / "executor"),
        "ALLOWED_BASE_MODELS": f"{tiny_base_model},{ALLOWED_HUB_MODEL}",
        # Passed on to the trainer process by the LocalExecutor (HF_*, ACTORGEN_*, OMP_*).
        "HF_HUB_OFFLINE": "1",
        "ACTORGEN_WORK_DIR": str(work / "trainer"),
        "OMP_NUM_THREADS": "2",
    }
