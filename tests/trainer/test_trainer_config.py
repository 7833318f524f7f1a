"""TrainConfig from job documents, prompts, estimates and error messages."""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path

import pytest
from actorgen import schema
from lora_trainer import config as cfg
from lora_trainer.errors import DiskFullError, TrainerError, describe
from lora_trainer.run import check_disk_space

F = schema.Field


def _job(**extra: object) -> dict[str, object]:
    job: dict[str, object] = {F.USER_ID: "u1", F.ACTOR_ID: "a1", F.INSTANCE_NAME: "ohwx",
                              F.BASE_MODEL_ID: "stable-diffusion-v1-5/stable-diffusion-v1-5"}
    job.update(extra)
    return job


def test_defaults_come_from_the_schema() -> None:
    config = cfg.TrainConfig.from_job("j1", 2, _job())
    defaults = {spec.field: spec.default for spec in schema.HYPERPARAMETERS}
    assert config.max_train_steps == defaults[F.TRAINING_STEPS]
    assert config.learning_rate == defaults[F.LEARNING_RATE] == 1e-4
    assert config.lora_rank == defaults[F.LORA_RANK]
    assert config.resolution == 0
    assert (config.job_id, config.attempt, config.user_id) == ("j1", 2, "u1")
    assert config.instance_prompt == "a photo of ohwx person"
    assert config.class_prompt == "a photo of person"
    assert config.trigger == "ohwx person"


def test_job_values_and_trainer_settings() -> None:
    config = cfg.TrainConfig.from_job(
        "j", 1, _job(**{F.LORA_RANK: 32, F.LORA_ALPHA: 16, F.CLASS_WORD: "woman",
                        F.TRAINING_STEPS: 400}),
        checkpoint_every=50, caption_template="{instance} {class_word}, portrait",
    )
    assert (config.lora_rank, config.lora_alpha, config.checkpoint_every) == (32, 16, 50)
    assert config.instance_prompt == "ohwx woman, portrait"
    assert config.resolved_warmup_steps == 20
    assert len(config.sample_prompts()) == config.num_samples
    assert all("ohwx woman" in p for p in config.sample_prompts())


@pytest.mark.parametrize("bad", [
    {F.LEARNING_RATE: 1.0},
    {F.LORA_RANK: 0},
    {F.RESOLUTION: 100},
    {F.INSTANCE_NAME: "x"},
    {F.BASE_MODEL_ID: ""},
])
def test_invalid_jobs_are_refused_with_the_field_named(bad: dict[str, object]) -> None:
    with pytest.raises(TrainerError) as info:
        cfg.TrainConfig.from_job("j", 1, _job(**bad))
    assert any(name in str(info.value) or "instance name" in str(info.value)
               for name in bad)


def test_unknown_setting_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        cfg.TrainConfig.from_job("j", 1, _job(), no_such_setting=1)


def test_time_estimate_scales_with_steps_batch_resolution_and_prior() -> None:
    base = cfg.TrainConfig.from_job("j", 1, _job(**{F.TRAINING_STEPS: 800,
                                                    F.TRAINING_BATCH_SIZE: 2}))
    h200 = 989e12
    seconds = cfg.estimate_training_seconds("sd", 512, base, h200)
    # 800 steps x 2 samples x 1.725 TFLOP at 10% of 989 TFLOP/s: about 28 s.
    assert seconds == pytest.approx(800 * 2 * 1.725e12 / (0.1 * h200))
    prior = cfg.TrainConfig.from_job("j", 1, _job(**{F.TRAINING_STEPS: 800,
                                                     F.TRAINING_BATCH_SIZE: 2,
                                                     F.PRIOR_PRESERVATION: True}))
    assert cfg.estimate_training_seconds("sd", 512, prior, h200) == pytest.approx(2 * seconds)
    assert cfg.estimate_training_seconds("sd", 512, base, h200, remaining_steps=400) == (
        pytest.approx(seconds / 2))
    assert cfg.estimate_training_seconds("sdxl", 1024, base, h200) > 8 * seconds
    assert cfg.estimate_training_seconds("sd", 512, base, h200, gradient_checkpointing=True) > (
        seconds)


def test_error_messages_are_readable() -> None:
    full = OSError(errno.ENOSPC, "No space left on device", "/work/x.safetensors")
    assert describe(full).startswith("the trainer ran out of disk space while writing")
    wrapped = RuntimeError("write failed")
    wrapped.__cause__ = full
    assert "ran out of disk space" in describe(wrapped)
    assert describe(TrainerError("the photo 'a.jpg' cannot be used")) == (
        "the photo 'a.jpg' cannot be used")
    oom = type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory")
    assert F.TRAINING_BATCH_SIZE in describe(oom)
    assert describe(KeyError("x")) == "internal trainer error: KeyError: 'x'"


def test_disk_space_precondition(tmp_path: Path) -> None:
    check_disk_space(tmp_path / "ok", 1)
    with pytest.raises(DiskFullError, match="not enough disk space"):
        check_disk_space(tmp_path / "big", 1 << 60)


def test_env_trainer_args_are_defaults_the_command_line_overrides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lora_trainer.__main__ import parse_args, with_env_defaults

    monkeypatch.setenv(schema.ENV_TRAINER_ARGS, "--sample-steps 8 --num-samples 2")
    args = parse_args(with_env_defaults(["--job-id", "j1", "--num-samples", "3"]))
    assert (args.job_id, args.sample_steps, args.num_samples) == ("j1", 8, 3)


@pytest.mark.parametrize(("device_name", "model"), [
    ("NVIDIA L4", "L4"),
    ("NVIDIA L40", "L40"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA H100 80GB HBM3", "H100"),
    ("NVIDIA A100-SXM4-40GB", "A100"),
    ("NVIDIA A10", "A10"),
    ("Tesla T4", "T4"),
    ("Tesla V100-SXM2-16GB", "V100"),
])
def test_peak_flops_match_the_whole_model_name(device_name: str, model: str) -> None:
    # L40 and L40S are not an L4 (nor an A100 an A10): a wrong figure makes a wrong first ETA.
    assert cfg.peak_flops(device_name) == cfg.PEAK_FLOPS[model]


def test_an_unknown_gpu_gets_the_default_peak() -> None:
    assert cfg.peak_flops("NVIDIA GeForce RTX 4090") == cfg.DEFAULT_PEAK_FLOPS
    assert cfg.peak_flops("NVIDIA L4X") == cfg.DEFAULT_PEAK_FLOPS


@pytest.mark.parametrize("priority", [50, -3, "urgent", None])
def test_the_scheduling_priority_is_not_a_training_setting(priority: object) -> None:
    # An admin sets priority in the console; whatever it holds, the training is the same.
    config = cfg.TrainConfig.from_job("j1", 1, _job(**{F.PRIORITY: priority}))
    assert config == cfg.TrainConfig.from_job("j1", 1, _job())


def _other_value(value: object) -> object:
    """A different valid value of the same kind."""
    if value in cfg.MIXED_PRECISION_CHOICES:
        return "bf16"
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if value is None:
        return 7
    return f"{value} {{instance}}"  # strings (a caption template must keep {instance})


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(cfg.TrainConfig)
                                  if f.name not in cfg.NOT_TRAINING_FIELDS])
def test_every_setting_that_changes_training_is_in_the_checkpoint_fingerprint(
        name: str) -> None:
    # Built from the fields themselves, so an option added later is covered without a
    # change here; only the explicit list of fields that do not change training is left out.
    config = cfg.TrainConfig.from_job("j1", 1, _job())
    changed = dataclasses.replace(config, **{name: _other_value(getattr(config, name))})
    assert changed.training_fingerprint() != config.training_fingerprint()


@pytest.mark.parametrize("name", ["num_class_images", "prior_loss_weight", "mixed_precision",
                                  "warmup_steps"])
def test_settings_once_left_out_of_the_fingerprint_are_in_it(name: str) -> None:
    config = cfg.TrainConfig.from_job("j1", 1, _job())
    changed = dataclasses.replace(config, **{name: _other_value(getattr(config, name))})
    assert changed.training_fingerprint() != config.training_fingerprint()


def test_settings_that_do_not_change_training_leave_the_fingerprint_alone() -> None:
    config = cfg.TrainConfig.from_job("j1", 1, _job())
    other = cfg.TrainConfig.from_job("j2", 3, _job(), checkpoint_every=7, keep_checkpoints=3,
                                     report_every_seconds=1.0, num_samples=1,
                                     compile_mode="regional", cuda_graphs=False,
                                     fused_lora=False, gpu_memory_gib=24.0,
                                     gradient_checkpointing="on")
    assert other.training_fingerprint() == config.training_fingerprint()
