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
