"""Shared set-up of the trainer tests: CPU threads, offline hub, tiny base models.

The trainer package lives in trainer_image/ and imports ``actorgen`` from
functions/ (pyproject's pytest pythonpath; the Docker image puts both side by
side); ``tests.photos`` builds the photos from real photos of one person.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test may reach the network for a model; the machines share two cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: on two shared cores, a second OpenMP thread that waits for a busy core
# made steps 10-25x slower (measured with other test suites running).
TORCH_THREADS = 1


@pytest.fixture(autouse=True, scope="session")
def _few_threads() -> None:
    import torch

    torch.set_num_threads(TORCH_THREADS)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 1.x-shaped model saved with save_pretrained (64 px native)."""
    from lora_trainer import synthetic

    return synthetic.save_synthetic_model(tmp_path_factory.mktemp("models") / "sd", "sd")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lora_trainer import synthetic

    return synthetic.save_synthetic_model(tmp_path_factory.mktemp("models") / "sdxl", "sdxl")


@pytest.fixture(scope="session")
def tiny_sd_vpred(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD 2.x-style: same shapes, v-prediction scheduler."""
    from lora_trainer import synthetic

    return synthetic.save_synthetic_model(
        tmp_path_factory.mktemp("models") / "sdv", "sd", prediction_type="v_prediction"
    )


@pytest.fixture(scope="session")
def face_pixels() -> object:
    """Four photos of one person, face-cropped at 64 px, as the VAE's input tensor."""
    from lora_trainer import data

    from tests import photos

    images = []
    for index in range(4):
        ref = data.ImageRef(image_id=f"img{index}", path=f"users/u/actors/a/images/{index}.jpg")
        images.append(data.prepare_image(photos.jpeg(photos.portrait(index)), ref, 64, 1.0))
    return data.images_to_tensor(images)
