"""Params of the Functions emulator for the end-to-end test: the local executor runs the
real trainer (``python -m lora_trainer`` from this dev venv) on a tiny synthetic model.

The params and the model builder are shared with the local demo (``tools.local_pipeline``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tools.local_pipeline import build_tiny_base_model, local_functions_env


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 1.x-shaped pipeline on disk: the job's baseModelId (no download offline)."""
    return build_tiny_base_model(tmp_path_factory.mktemp("e2e-model") / "sd")


@pytest.fixture(scope="session")
def functions_env(tiny_base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    # sys.executable: the dev venv running pytest has torch and diffusers.
    return local_functions_env(
        tiny_base_model, tmp_path_factory.mktemp("e2e-work"), trainer_python=sys.executable
    )
