"""Params are read at run time only, into a plain Settings value."""

from __future__ import annotations

import dataclasses

import pytest
from actorgen import config, schema
from actorgen.config import Settings


def test_settings_defaults_are_the_params_defaults() -> None:
    s = Settings()
    assert s.min_images == config.MIN_IMAGES.default == 5
    assert s.max_images == 30
    assert s.executor_kind == "vertex"
    assert "stabilityai/stable-diffusion-xl-base-1.0" in s.allowed_base_models
    # The upload sweep is bounded by default.
    assert (s.upload_sweep_max_seconds, s.upload_sweep_max_objects) == (60, 20000)


def test_load_settings_reads_the_environment_when_called(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIN_IMAGES", "7")
    monkeypatch.setenv("EXECUTOR", " Local ")
    monkeypatch.setenv("ALLOWED_BASE_MODELS", "a/b, c/d,")
    monkeypatch.setenv("SCHEDULING_STRATEGY", "spot")
    monkeypatch.setenv("UPLOAD_SWEEP_MAX_SECONDS", "30")
    monkeypatch.setenv("GCLOUD_PROJECT", "p1")
    monkeypatch.setenv("FIREBASE_CONFIG", '{"projectId": "p1", "storageBucket": "b1"}')
    monkeypatch.delenv("STORAGE_BUCKET", raising=False)
    s = config.load_settings()
    assert (s.min_images, s.executor_kind, s.scheduling_strategy) == (7, "local", "SPOT")
    assert s.allowed_base_models == ("a/b", "c/d")
    assert (s.project, s.bucket) == ("p1", "b1")
    assert s.upload_sweep_max_seconds == 30


def test_executor_settings_carry_the_values(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(
        executor_kind="local", project="p", bucket="b", local_trainer_python="/x/python",
        hf_token_secret="hf-token", accelerator_count=2, gpu_prices="",
    )
    e = s.executor_settings()
    assert (e.kind, e.project, e.bucket, e.local_python, e.accelerator_count) == (
        "local", "p", "b", "/x/python", 2
    )
    assert e.extra_env == {schema.ENV_HF_TOKEN_SECRET: "hf-token"}
    assert Settings(gpu_prices="").executor_settings().extra_env == {}


def test_trainer_options_and_token_secret_name_reach_the_executor_env() -> None:
    from actorgen import schema
    from actorgen.config import Settings

    env = Settings(
        trainer_args="--compile", hf_token_secret="hf-token", gpu_prices=""
    ).executor_settings()
    assert env.extra_env == {
        schema.ENV_TRAINER_ARGS: "--compile",
        schema.ENV_HF_TOKEN_SECRET: "hf-token",
    }
    assert Settings(gpu_prices="").executor_settings().extra_env == {}


def test_the_persistent_resource_param_is_off_by_default_and_reaches_the_executor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Empty by default: a warm pool is billed while idle, so it is never implied.
    assert config.VERTEX_PERSISTENT_RESOURCE_ID.default == ""
    assert Settings().executor_settings().persistent_resource_id == ""
    description = config.VERTEX_PERSISTENT_RESOURCE_ID.description
    assert "idle" in description and "SCHEDULING_STRATEGY=STANDARD" in description

    monkeypatch.setenv("VERTEX_PERSISTENT_RESOURCE_ID", " actorgen-l4-pool ")
    monkeypatch.setenv("SCHEDULING_STRATEGY", "standard")
    s = config.load_settings()
    assert s.vertex_persistent_resource_id == "actorgen-l4-pool"
    e = s.executor_settings()
    assert (e.persistent_resource_id, e.scheduling_strategy) == ("actorgen-l4-pool", "STANDARD")


def test_a_persistent_resource_with_spot_is_a_configuration_problem() -> None:
    ready = Settings(project="p", bucket="b", trainer_image_uri="r/actorgen/lora-trainer:t",
                     trainer_service_account="actorgen-trainer@",
                     vertex_persistent_resource_id="actorgen-l4-pool")
    assert ready.executor_settings().problems() == []  # STANDARD is the default
    spot = dataclasses.replace(ready, scheduling_strategy="SPOT")
    [problem] = spot.executor_settings().problems()
    assert "SCHEDULING_STRATEGY to STANDARD" in problem
    assert "VERTEX_PERSISTENT_RESOURCE_ID" in problem
