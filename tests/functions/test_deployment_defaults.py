"""Safe deployment defaults: base models that exist, and no push of faces by default."""

from __future__ import annotations

from actorgen import config
from actorgen.config import Settings


def test_the_default_base_models_exist_on_the_hub() -> None:
    # Checked 2026-12-03: Runway deleted runwayml/stable-diffusion-v1-5 (August 2024);
    # diffusers 0.42.1's docs load SD 1.5 from the community mirror below.
    assert Settings().allowed_base_models == (
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "stabilityai/stable-diffusion-xl-base-1.0",
    )
    assert not any(m.startswith("runwayml/") for m in config.ALLOWED_BASE_MODELS.default)


def test_pushing_models_to_the_hub_is_off_by_default() -> None:
    assert config.HF_PUSH_MODELS.default is False
    assert "HF_PUSH_MODELS" in config.HF_TOKEN_SECRET.description


def test_vertex_needs_the_trainers_own_service_account() -> None:
    from actorgen.executors.settings import TRAINER_IDENTITY_MISSING

    ready = Settings(project="p", bucket="b", trainer_image_uri="r/actorgen/lora-trainer:t")
    # Without it Vertex would run the trainer as its service agent: no Firestore, no
    # Storage, every attempt failing. Dispatch refuses with what to set instead.
    assert ready.executor_settings().problems() == [TRAINER_IDENTITY_MISSING]
    assert "TRAINER_SERVICE_ACCOUNT" in TRAINER_IDENTITY_MISSING
    named = Settings(project="p", bucket="b", trainer_image_uri="r/actorgen/lora-trainer:t",
                     trainer_service_account="actorgen-trainer@p.iam.gserviceaccount.com")
    assert named.executor_settings().problems() == []
    # The local executor (emulators, demo) runs as whoever runs it.
    assert Settings(executor_kind="local").executor_settings().problems() == []


def test_service_account_short_form_is_expanded_in_the_project() -> None:
    short = Settings(project="p1", bucket="b", trainer_image_uri="r/actorgen/lora-trainer:t",
                     trainer_service_account="actorgen-trainer@")
    assert short.executor_settings().service_account == (
        "actorgen-trainer@p1.iam.gserviceaccount.com")
    full = "trainer@other.iam.gserviceaccount.com"
    assert config.service_account_email(f" {full} ", "p1") == full
