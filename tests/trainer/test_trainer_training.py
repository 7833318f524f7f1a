"""The training step on tiny models: learning, v-prediction, SDXL, prior
preservation, text-encoder LoRA, and exact resumption from saved state."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from lora_trainer import models, training
from lora_trainer.config import TrainConfig


def _trainer(base: Path, pixels: torch.Tensor, **kw: object) -> training.LoraTrainer:
    settings: dict[str, object] = dict(learning_rate=1e-3, lora_rank=8, lora_alpha=8,
                                       sample_steps=2, num_class_images=2)
    settings.update(kw)
    config = TrainConfig(job_id="j", attempt=1, user_id="u", actor_id="a", instance_name="sks",
                         base_model_id=str(base), **settings)  # type: ignore[arg-type]
    model = models.load_base_model(config, torch.device("cpu"))
    return training.build_trainer(model, config, pixels).trainer


def test_loss_goes_down_on_fixed_noise(tiny_sd: Path, face_pixels: torch.Tensor) -> None:
    trainer = _trainer(tiny_sd, face_pixels, max_train_steps=40)
    before = trainer.fixed_noise_loss()
    result = trainer.run(40, report_every_seconds=0.0, progress_bar=False)
    after = trainer.fixed_noise_loss()
    assert result.steps == 40 and len(result.losses) == 40
    assert after < before * 0.97, (before, after)
    print(f"fixed-noise loss {before:.4f} -> {after:.4f}")


def test_v_prediction_model_learns(tiny_sd_vpred: Path, face_pixels: torch.Tensor) -> None:
    trainer = _trainer(tiny_sd_vpred, face_pixels, max_train_steps=30)
    assert trainer.prediction_type == "v_prediction"
    before = trainer.fixed_noise_loss()
    trainer.run(30, report_every_seconds=1e9, progress_bar=False)
    assert trainer.fixed_noise_loss() < before


# diffusers' Euler scheduler trips a numpy 2 deprecation in its own code.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_sdxl_with_prior_preservation_and_text_encoder_lora(
        tiny_sdxl: Path, face_pixels: torch.Tensor) -> None:
    trainer = _trainer(tiny_sdxl, face_pixels, max_train_steps=4, prior_preservation=True,
                       train_text_encoder=True, train_batch_size=2)
    assert trainer.data.class_latents is not None and len(trainer.data.class_latents) == 2
    assert trainer.samples_per_step == 4
    assert set(trainer.modules) == {"unet", "text_encoder", "text_encoder_2"}
    te_before = {k: v.clone() for k, v in trainer.trainable_state().items()
                 if k.startswith("text_encoder_2.")}
    result = trainer.run(4, report_every_seconds=1e9, progress_bar=False)
    assert result.steps == 4 and all(torch.isfinite(torch.tensor(v)) for _, v in result.losses)
    after = trainer.trainable_state()
    assert any(not torch.equal(after[k], v) for k, v in te_before.items())


def test_resume_from_saved_state_continues_exactly(tiny_sd: Path,
                                                   face_pixels: torch.Tensor) -> None:
    straight = _trainer(tiny_sd, face_pixels, max_train_steps=12)
    straight.run(12, report_every_seconds=1e9, progress_bar=False)

    first = _trainer(tiny_sd, face_pixels, max_train_steps=12)
    saved: dict[str, object] = {}

    def checkpoint(step: int) -> None:
        if step == 5:
            saved["weights"] = first.trainable_state()
            saved["state"] = first.training_state()

    first.run(7, report_every_seconds=1e9, checkpoint_every=5, on_checkpoint=checkpoint,
              progress_bar=False)
    resumed = _trainer(tiny_sd, face_pixels, max_train_steps=12)
    resumed.load_trainable_state(saved["weights"])  # type: ignore[arg-type]
    resumed.load_training_state(saved["state"])  # type: ignore[arg-type]
    assert resumed.step == 5
    result = resumed.run(12, report_every_seconds=1e9, progress_bar=False)
    assert result.steps == 12
    expected, got = straight.trainable_state(), resumed.trainable_state()
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_stop_request_checkpoints_then_raises(tiny_sd: Path, face_pixels: torch.Tensor) -> None:
    from lora_trainer.errors import Preempted

    trainer = _trainer(tiny_sd, face_pixels, max_train_steps=10)
    saved: list[int] = []
    stop = training.StopFlag()
    try:
        trainer.run(10, report_every_seconds=1e9, checkpoint_every=100,
                    on_checkpoint=saved.append, should_stop=lambda: trainer.step >= 3 or stop(),
                    progress_bar=False)
    except Preempted:
        pass
    else:
        raise AssertionError("expected Preempted")
    assert saved == [3] and trainer.step == 3


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("base_name", ["tiny_sd", "tiny_sdxl"])
def test_pure_bf16_trains_without_autocast(base_name: str, face_pixels: torch.Tensor,
                                           request: pytest.FixtureRequest) -> None:
    trainer = _trainer(request.getfixturevalue(base_name), face_pixels, max_train_steps=40,
                       mixed_precision="bf16-pure")
    assert trainer.accelerator.mixed_precision == "no" and trainer.compute_dtype == torch.bfloat16
    assert next(trainer.unet.parameters()).dtype == torch.bfloat16  # frozen weights
    assert all(p.dtype == torch.float32 for p in trainer.params)  # LoRA and optimiser state
    before = trainer.fixed_noise_loss()
    result = trainer.run(40, report_every_seconds=1e9, progress_bar=False)
    assert all(torch.isfinite(torch.tensor(v)) for _, v in result.losses)
    assert trainer.fixed_noise_loss() < before


def test_final_loss_is_the_mean_of_the_last_steps_whatever_the_report_windows(
        tiny_sd: Path, face_pixels: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training, "FINAL_LOSS_STEPS", 5, raising=False)
    every_step = _trainer(tiny_sd, face_pixels, max_train_steps=12)
    reported = every_step.run(12, report_every_seconds=0.0, progress_bar=False)
    per_step = [loss for _, loss in reported.losses]  # one report per step
    assert len(per_step) == 12
    expected = sum(per_step[-5:]) / 5
    assert reported.final_loss == pytest.approx(expected, rel=1e-5)

    # One report window over the whole run, and a run resumed from a checkpoint at
    # step 10 (inside the final steps): the same run, the same figure.
    one_window = _trainer(tiny_sd, face_pixels, max_train_steps=12)
    assert one_window.run(12, report_every_seconds=1e9, progress_bar=False).final_loss == (
        pytest.approx(expected, rel=1e-5))
    first = _trainer(tiny_sd, face_pixels, max_train_steps=12)
    first.run(10, report_every_seconds=1e9, progress_bar=False)
    resumed = _trainer(tiny_sd, face_pixels, max_train_steps=12)
    resumed.load_trainable_state(first.trainable_state())
    resumed.load_training_state(first.training_state())
    assert resumed.run(12, report_every_seconds=1e9, progress_bar=False).final_loss == (
        pytest.approx(expected, rel=1e-5))


def test_stop_flag_raises_only_where_stopping_at_once_is_safe() -> None:
    """Real SIGTERMs to this process: raised inside the work, deferred to the loop's next
    step inside it, only noted before and after (start-up, recording the outcome)."""
    import os
    import signal

    from lora_trainer.errors import Preempted

    stop = training.StopFlag()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # start-up: noted only
        assert stop()
        with pytest.raises(Preempted):  # the work does not even start
            with stop.interrupting():
                raise AssertionError("not reached")

        stop = training.StopFlag()
        stop.install()
        with pytest.raises(Preempted), stop.interrupting():
            with stop.deferred():
                os.kill(os.getpid(), signal.SIGTERM)  # in the loop: noted, raised at its end
                assert stop()
            raise AssertionError("not reached")

        stop = training.StopFlag()
        stop.install()
        with pytest.raises(Preempted), stop.interrupting():
            os.kill(os.getpid(), signal.SIGTERM)  # loading, class images, export: at once
            for _ in range(100):
                time.sleep(0.01)
            raise AssertionError("not reached")
        os.kill(os.getpid(), signal.SIGTERM)  # recording the outcome: noted only
    finally:
        stop.restore()
