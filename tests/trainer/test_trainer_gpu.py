"""The CUDA-only code paths (bf16 autocast, fused AdamW, channels-last, encoder
offload, device RNG) on a tiny model. Skipped without a GPU; on the GPU machine:
``python -m pytest -q -m gpu tests/trainer/test_trainer_gpu.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_trainer import export, identity, models, synthetic, training
from lora_trainer.config import TrainConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_cuda_training_resume_and_export(kind: str, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    base = synthetic.save_synthetic_model(tmp_path / kind, kind)
    config = TrainConfig(job_id="j", attempt=1, user_id="u", actor_id="a", instance_name="sks",
                         base_model_id=str(base), max_train_steps=6, train_batch_size=2,
                         learning_rate=1e-3, lora_rank=4, lora_alpha=8,
                         prior_preservation=True, num_class_images=2, sample_steps=2,
                         num_samples=1)
    device = torch.device("cuda")
    pixels = torch.rand(3, 3, 64, 64) * 2 - 1

    def fresh() -> training.LoraTrainer:
        model = models.load_base_model(config, device)
        return training.build_trainer(model, config, pixels).trainer

    trainer = fresh()
    # auto: pure bf16 where supported (no autocast), else fp16 autocast with loss scaling.
    assert trainer.compute_dtype == torch.bfloat16 or trainer.accelerator.mixed_precision == "fp16"
    assert trainer.model.vae.device.type == "cpu"  # offloaded after caching
    assert all(p.dtype == torch.float32 and p.is_cuda for p in trainer.params)
    trainer.run(3, report_every_seconds=0.0, progress_bar=False)
    weights, state = trainer.trainable_state(), trainer.training_state()
    result = trainer.run(6, report_every_seconds=0.0, progress_bar=False)
    assert result.steps == 6 and all(torch.isfinite(torch.tensor(v)) for _, v in result.losses)

    resumed = fresh()
    resumed.load_trainable_state(weights)
    resumed.load_training_state(state)
    resumed.run(6, report_every_seconds=0.0, progress_bar=False)
    straight, again = trainer.trainable_state(), resumed.trainable_state()
    # Same draws from the restored RNG: the resumed run follows the straight one
    # up to GPU non-determinism, far closer than the distance both travelled.
    travelled = sum(float((straight[k] - weights[k]).abs().mean()) for k in weights)
    apart = sum(float((straight[k] - again[k]).abs().mean()) for k in weights)
    assert apart < 0.25 * travelled, (apart, travelled)

    out = tmp_path / "export"
    out.mkdir()
    export.save_diffusers_lora(trainer.model, config, out)
    export.save_kohya_lora(trainer.model, config, out)
    samples = export.render_samples(trainer.model, config, 64, out)
    assert samples and samples[0].stat().st_size > 0
    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")


def _cuda_config(base: Path, **kw: object) -> TrainConfig:
    return TrainConfig(job_id="j", attempt=1, user_id="u", actor_id="a", instance_name="sks",
                       base_model_id=str(base), max_train_steps=6, train_batch_size=2,
                       learning_rate=1e-3, lora_rank=4, lora_alpha=8,
                       **kw)  # type: ignore[arg-type]


def test_the_memory_probe_measures_the_allocator_and_switches_checkpointing_on(
        tmp_path: Path) -> None:
    base = synthetic.save_synthetic_model(tmp_path / "sd", "sd")
    pixels = torch.rand(3, 3, 64, 64) * 2 - 1
    device = torch.device("cuda")
    roomy = training.build_trainer(models.load_base_model(_cuda_config(base), device),
                                   _cuda_config(base), pixels)
    assert roomy.memory is not None and roomy.memory.step_bytes > 0
    assert not roomy.gradient_checkpointing  # a tiny model fits any GPU
    # A budget below the measured step: checkpointing on, and measured again.
    tight = _cuda_config(base, gpu_memory_gib=roomy.memory.step_bytes / 1024**3 / 2)
    cramped = training.build_trainer(models.load_base_model(tight, device), tight, pixels)
    assert cramped.gradient_checkpointing and cramped.trainer.unet.is_gradient_checkpointing
    assert cramped.memory is not None
    assert cramped.memory.step_bytes_without_checkpointing is not None


@pytest.mark.parametrize("mode", ["regional", "full"])
def test_compiled_steps_with_cuda_graphs_train_like_eager_ones(mode: str,
                                                               tmp_path: Path) -> None:
    base = synthetic.save_synthetic_model(tmp_path / "sd", "sd")
    pixels = torch.rand(3, 3, 64, 64) * 2 - 1
    device = torch.device("cuda")
    runs = {}
    for compile_mode in ("off", mode):
        config = _cuda_config(base, compile_mode=compile_mode, mixed_precision="no")
        prepared = training.build_trainer(models.load_base_model(config, device), config, pixels)
        assert prepared.trainer.cuda_graphs is (compile_mode != "off")
        result = prepared.trainer.run(6, report_every_seconds=1e9, progress_bar=False)
        runs[compile_mode] = (result.final_loss, prepared.trainer.trainable_state())
        torch._dynamo.reset()
    (eager_loss, eager), (compiled_loss, compiled) = runs["off"], runs[mode]
    assert eager_loss == pytest.approx(compiled_loss, rel=1e-3)
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("checkpointing", ["off", "on"])
def test_compiled_steps_with_evaluation_and_samples_between(checkpointing: str,
                                                            tmp_path: Path) -> None:
    """What a job does around compiled steps, against eager: with CUDA graphs, or with
    gradient checkpointing on (what the memory plan turns on when a step does not fit;
    regional compilation then runs compiled blocks inside torch.utils.checkpoint, so
    CUDA graphs stay off, see compilation.want_cuda_graphs and
    pytorch/pytorch#154306), the evaluation loss before training and identity samples
    (no_grad, eval mode) rendered between two steps. Regional only (what the memory
    plan combines with checkpointing), to keep tools/gpu_measure.sh within its time."""
    base = synthetic.save_synthetic_model(tmp_path / "sd", "sd")
    pixels = torch.rand(3, 3, 64, 64) * 2 - 1
    device = torch.device("cuda")
    mode = "regional"
    runs = {}
    for compile_mode in ("off", mode):
        config = _cuda_config(base, compile_mode=compile_mode, mixed_precision="no",
                              gradient_checkpointing=checkpointing, identity_samples=1,
                              identity_sample_steps=2)
        prepared = training.build_trainer(models.load_base_model(config, device), config, pixels)
        trainer = prepared.trainer
        assert prepared.gradient_checkpointing is (checkpointing == "on")
        assert trainer.unet.is_gradient_checkpointing is (checkpointing == "on")
        # CUDA graphs when compiled, except under checkpointing (want_cuda_graphs).
        assert trainer.cuda_graphs is (compile_mode != "off" and checkpointing == "off")
        start = trainer.fixed_noise_loss(seed=config.seed)

        def render(step: int, trainer: training.LoraTrainer = trainer,
                   config: TrainConfig = config) -> None:
            if step == 3:
                identity.render_identity_samples(trainer.model, config, 64)

        result = trainer.run(6, report_every_seconds=1e9, progress_bar=False, on_step=render)
        runs[compile_mode] = (start, result.final_loss, trainer.fixed_noise_loss(seed=config.seed),
                              trainer.trainable_state())
        torch._dynamo.reset()
    (*eager_losses, eager), (*compiled_losses, compiled) = runs["off"], runs[mode]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-3)
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-3, atol=1e-5)
