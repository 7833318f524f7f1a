"""The training step never waits for the GPU (no ``.item()``, no host copies): the
loss is summed on the device and read only when progress is reported. CUDA's
sync debug mode turns any synchronising call into an error. Skipped without a GPU;
on the GPU machine: ``python -m pytest -q -m gpu tests/trainer/test_trainer_gpu_sync.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_trainer import models, synthetic, training
from lora_trainer.config import TrainConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("prior", [False, True], ids=["plain", "prior-preservation"])
def test_training_steps_do_not_synchronise_with_the_host(prior: bool, tmp_path: Path) -> None:
    if not torch.cuda.is_bf16_supported():
        pytest.skip("fp16 loss scaling checks for inf on the host by design")
    base = synthetic.save_synthetic_model(tmp_path / "sd", "sd")
    config = TrainConfig(job_id="j", attempt=1, user_id="u", actor_id="a", instance_name="sks",
                         base_model_id=str(base), max_train_steps=10, train_batch_size=2,
                         lora_rank=4, lora_alpha=8, prior_preservation=prior,
                         num_class_images=2, sample_steps=2)
    model = models.load_base_model(config, torch.device("cuda"))
    trainer = training.build_trainer(model, config, torch.rand(3, 3, 64, 64) * 2 - 1).trainer
    trainer.run(2, report_every_seconds=1e9, progress_bar=False)  # warm-up: allocations
    losses = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            losses.append(trainer.train_step())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(loss.is_cuda for loss in losses)
    assert torch.isfinite(torch.stack(losses)).all()
