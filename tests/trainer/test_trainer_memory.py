"""Fitting the step in the GPU's memory (memory.py): the decision, on a meter whose
peaks are given, and the probe step, which must leave the run exactly as it was.

The CUDA allocator's real peaks are read only on a GPU (test_trainer_gpu.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_trainer import memory, models, training
from lora_trainer.config import TrainConfig

GIB = memory.GIB


class GivenPeaks:
    """A meter that reports the peaks a test gives, one per probe, and counts resets."""

    def __init__(self, total_gib: float, peaks_gib: list[float | None]) -> None:
        self.total = int(total_gib * GIB)
        self.peaks = list(peaks_gib)
        self.current: float | None = None
        self.resets = 0

    def total_bytes(self) -> int:
        return self.total

    def reset_peak(self) -> None:
        self.resets += 1

    def peak_bytes(self) -> int:
        assert self.current is not None
        return int(self.current * GIB)

    def release(self) -> None:
        pass

    def probe(self) -> None:
        self.current = self.peaks.pop(0)
        if self.current is None:
            raise torch.OutOfMemoryError("CUDA out of memory (given)")


def test_a_step_that_fits_keeps_checkpointing_off() -> None:
    meter = GivenPeaks(24, [10.0])
    enabled: list[bool] = []
    plan = memory.plan_memory(meter.probe, lambda: enabled.append(True), meter,
                              gpu_memory_gib=0, extra_bytes=GIB // 2)
    assert not plan.gradient_checkpointing and not enabled
    assert plan.step_bytes == int(10.5 * GIB) and plan.fits
    assert plan.budget_bytes == 24 * GIB and meter.resets == 1


def test_a_step_over_the_budget_turns_checkpointing_on_and_is_measured_again() -> None:
    meter = GivenPeaks(80, [30.0, 12.0])  # an H100 planning for a 24 GB L4
    enabled: list[bool] = []
    plan = memory.plan_memory(meter.probe, lambda: enabled.append(True), meter,
                              gpu_memory_gib=24)
    assert enabled == [True] and plan.gradient_checkpointing
    assert plan.budget_bytes == 24 * GIB
    assert plan.step_bytes_without_checkpointing == 30 * GIB
    assert plan.step_bytes == 12 * GIB and plan.fits


def test_the_budget_never_exceeds_the_gpu() -> None:
    meter = GivenPeaks(24, [23.0, 20.0])
    plan = memory.plan_memory(meter.probe, lambda: None, meter, gpu_memory_gib=80)
    assert plan.budget_bytes == 24 * GIB
    assert plan.gradient_checkpointing  # 23 GiB is over 92% of 24 GiB


def test_out_of_memory_in_the_probe_counts_as_not_fitting() -> None:
    meter = GivenPeaks(24, [None, 15.0])
    plan = memory.plan_memory(meter.probe, lambda: None, meter, gpu_memory_gib=0)
    assert plan.gradient_checkpointing and plan.step_bytes == 15 * GIB
    assert plan.step_bytes_without_checkpointing is None


def test_a_step_that_fits_nowhere_is_reported_not_hidden(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    meter = GivenPeaks(24, [None, None])
    with caplog.at_level("WARNING"):
        plan = memory.plan_memory(meter.probe, lambda: None, meter, gpu_memory_gib=0)
    assert plan.gradient_checkpointing and plan.step_bytes is None and plan.fits is None
    assert "lower the batch size or the resolution" in caplog.text


def test_optimizer_states_are_two_moments_per_trainable_element() -> None:
    params = [torch.nn.Parameter(torch.zeros(10, 4)), torch.nn.Parameter(torch.zeros(3))]
    assert memory.optimizer_state_bytes(params) == 2 * 43 * 4


def _trainer(base: Path, pixels: torch.Tensor, **kw: object) -> training.LoraTrainer:
    config = TrainConfig(job_id="j", attempt=1, user_id="u", actor_id="a", instance_name="sks",
                         base_model_id=str(base), learning_rate=1e-3, lora_rank=4,
                         lora_alpha=4, max_train_steps=3, **kw)  # type: ignore[arg-type]
    model = models.load_base_model(config, torch.device("cpu"))
    return training.build_trainer(model, config, pixels).trainer


def test_the_probe_step_leaves_no_trace(tiny_sd: Path, face_pixels: torch.Tensor) -> None:
    probed = _trainer(tiny_sd, face_pixels)
    plain = _trainer(tiny_sd, face_pixels)
    probed.probe_step()
    assert all(p.grad is None for p in probed.params)
    assert probed.step == 0 and not probed.optimizer.state
    losses = [(probed.train_step().item(), plain.train_step().item()) for _ in range(3)]
    assert all(a == b for a, b in losses), losses
    for key, value in plain.trainable_state().items():
        assert torch.equal(probed.trainable_state()[key], value), key


def test_checkpointing_turned_on_by_the_plan_trains_to_the_same_weights(
        tiny_sd: Path, face_pixels: torch.Tensor) -> None:
    """What plan_memory switches on mid-set-up: recomputation, not other maths."""
    switched = _trainer(tiny_sd, face_pixels)
    plain = _trainer(tiny_sd, face_pixels)
    meter = GivenPeaks(24, [30.0, 10.0])

    def probe() -> None:
        meter.probe()
        switched.probe_step()

    plan = memory.plan_memory(probe, lambda: models.enable_gradient_checkpointing(
        switched.model, switched.config), meter, gpu_memory_gib=0)
    assert plan.gradient_checkpointing and switched.unet.is_gradient_checkpointing
    for _ in range(2):
        switched.train_step()
        plain.train_step()
    for key, value in plain.trainable_state().items():
        torch.testing.assert_close(switched.trainable_state()[key], value, rtol=1e-5,
                                   atol=1e-6)
