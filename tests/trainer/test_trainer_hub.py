"""The Hugging Face token: where it comes from, where it goes, and that it is never shown.

Secret Manager itself cannot be reached offline: ``hub._access_secret`` (the only
code that talks to it) is replaced; everything around it is the product's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from actorgen import schema
from lora_trainer import hub, models
from lora_trainer.config import TrainConfig
from lora_trainer.errors import ModelLoadError, is_permanent
from lora_trainer.run import RunOptions, run_job

from tests.trainer.seed import TOY_SETTINGS, seed_job

F = schema.Field
S = schema.JobStatus
TOKEN = "hf_NotARealToken_4242"


@pytest.fixture
def no_token_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (hub.ENV_TOKEN, hub.ENV_TOKEN_SECRET, "HF_TOKEN_SECRET"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def secret_reads(no_token_env: pytest.MonkeyPatch) -> list[str]:
    """Secret Manager stand-in: records the version names read, answers TOKEN."""
    reads: list[str] = []

    def access(name: str) -> str:
        reads.append(name)
        return TOKEN

    no_token_env.setattr(hub, "_access_secret", access)
    return reads


def test_the_trainer_reads_the_variable_the_functions_set() -> None:
    # One spelling, from schema: the functions put the secret name there.
    assert hub.ENV_TOKEN_SECRET == schema.ENV_HF_TOKEN_SECRET == "ACTORGEN_HF_TOKEN_SECRET"


@pytest.mark.parametrize(("configured", "expected"), [
    ("hf-token", "projects/proj-1/secrets/hf-token/versions/latest"),
    (" hf_token ", "projects/proj-1/secrets/hf_token/versions/latest"),
    ("projects/other/secrets/hf-token", "projects/other/secrets/hf-token/versions/latest"),
    ("projects/other/secrets/hf-token/", "projects/other/secrets/hf-token/versions/latest"),
    ("projects/other/secrets/hf-token/versions/3", "projects/other/secrets/hf-token/versions/3"),
    ("projects/123456/secrets/t/versions/latest", "projects/123456/secrets/t/versions/latest"),
])
def test_secret_names_are_expanded_to_a_version(configured: str, expected: str,
                                                no_token_env: pytest.MonkeyPatch) -> None:
    no_token_env.setenv(schema.ENV_PROJECT, "proj-1")
    assert hub.secret_version_name(configured) == expected


def test_short_name_uses_the_given_project_and_needs_one(
        no_token_env: pytest.MonkeyPatch) -> None:
    assert hub.secret_version_name("hf-token", "p2") == "projects/p2/secrets/hf-token/versions/latest"
    no_token_env.delenv(schema.ENV_PROJECT, raising=False)
    with pytest.raises(hub.TokenUnavailable, match=schema.ENV_PROJECT) as caught:
        hub.secret_version_name("hf-token")
    assert not caught.value.transient


@pytest.mark.parametrize("bad", [
    "secrets/hf-token", "projects/p/secrets", "projects/p/secrets/s/versions/",
    "projects/p/secrets/s/versions/v1", "hf token", "projects/p/secrets/s/extra",
])
def test_malformed_secret_names_are_refused(bad: str, no_token_env: pytest.MonkeyPatch) -> None:
    no_token_env.setenv(schema.ENV_PROJECT, "p")
    with pytest.raises(hub.TokenUnavailable, match=hub.ENV_TOKEN_SECRET):
        hub.secret_version_name(bad)


def test_token_from_the_secret_env_or_none(secret_reads: list[str],
                                           no_token_env: pytest.MonkeyPatch) -> None:
    assert hub.hub_token() is None and secret_reads == []
    # The old, wrong spelling is not read.
    no_token_env.setenv("HF_TOKEN_SECRET", "hf-token")
    assert hub.hub_token() is None and secret_reads == []
    no_token_env.setenv(schema.ENV_PROJECT, "proj-1")
    no_token_env.setenv(schema.ENV_HF_TOKEN_SECRET, "hf-token")
    assert hub.hub_token() == TOKEN
    assert secret_reads == ["projects/proj-1/secrets/hf-token/versions/latest"]
    # A plain HF_TOKEN (local runs) wins and needs no Secret Manager.
    no_token_env.setenv(hub.ENV_TOKEN, " hf_local ")
    assert hub.hub_token() == "hf_local"
    assert len(secret_reads) == 1


def test_unreadable_secret_is_reported_without_the_token(
        no_token_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def refuse(name: str) -> str:
        raise hub.TokenUnavailable(f"Secret Manager answered HTTP 403 for {name}")

    no_token_env.setattr(hub, "_access_secret", refuse)
    no_token_env.setenv(schema.ENV_HF_TOKEN_SECRET, "projects/p/secrets/s")
    with pytest.raises(hub.TokenUnavailable, match="403"):
        hub.hub_token()
    assert hub.maybe_push(tmp_path, "job") == (None, "the Hugging Face token could not be read")


def test_push_gets_the_resolved_token(no_token_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pushed: list[str] = []
    no_token_env.setattr(hub, "push_folder",
                         lambda folder, job, token, repo=None: pushed.append(token) or "ns/repo")
    no_token_env.delenv("HF_HUB_OFFLINE", raising=False)
    assert hub.maybe_push(tmp_path, "job", TOKEN) == ("ns/repo", None)
    assert pushed == [TOKEN]
    assert hub.maybe_push(tmp_path, "job", None, token_problem="HTTP 404") == (
        None, "the Hugging Face token could not be read")
    assert pushed == [TOKEN]


def test_every_base_model_read_gets_the_token(tiny_sd: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """inspect + load: every load_config/from_pretrained call carries ``token=``."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        DiffusionPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    calls: list[tuple[str, Any]] = []

    def spy(cls: type, method: str) -> None:
        original = getattr(cls, method).__func__

        def wrapper(klass: type, *args: Any, **kwargs: Any) -> Any:
            calls.append((f"{klass.__name__}.{method}", kwargs.get("token", "<missing>")))
            return original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, method, classmethod(wrapper))

    for cls in (DiffusionPipeline, UNet2DConditionModel, DDPMScheduler, AutoencoderKL):
        spy(cls, "load_config")
    spy(AutoencoderKL, "from_pretrained")
    spy(StableDiffusionPipeline, "from_pretrained")
    config = TrainConfig.from_job("job", 1, {F.BASE_MODEL_ID: str(tiny_sd), F.USER_ID: "u",
                                             F.ACTOR_ID: "a", F.INSTANCE_NAME: "ohwx"})
    import torch

    model = models.load_base_model(config, torch.device("cpu"), token=TOKEN)
    assert model.kind == models.SD
    names = {name for name, _ in calls}
    assert {"DiffusionPipeline.load_config", "UNet2DConditionModel.load_config",
            "DDPMScheduler.load_config", "AutoencoderKL.load_config",
            "AutoencoderKL.from_pretrained", "StableDiffusionPipeline.from_pretrained"} <= names
    # The trainer's own calls all carry it (diffusers' inner calls may pass it on too).
    outer = [c for c in calls if c[0] in (
        "AutoencoderKL.from_pretrained", "StableDiffusionPipeline.from_pretrained")]
    assert outer and all(token == TOKEN for _, token in outer), calls
    assert all(token in (TOKEN, None, "<missing>") for _, token in calls)
    assert [t for n, t in calls if n.endswith("load_config")][:4] == [TOKEN] * 4


def test_load_error_never_shows_the_token(tmp_path: Path) -> None:
    config = TrainConfig.from_job("job", 1, {F.BASE_MODEL_ID: str(tmp_path / "none"),
                                             F.USER_ID: "u", F.ACTOR_ID: "a",
                                             F.INSTANCE_NAME: "ohwx"})

    class Leaky(Exception):
        pass

    assert models._first_line(Leaky(f"401 for Bearer {TOKEN}"), TOKEN) == "401 for Bearer ***"
    with pytest.raises(ModelLoadError) as caught:
        models.load_base_model(config, token=TOKEN)
    assert TOKEN not in str(caught.value)


def _run(emulators: Any, job_id: str, work: Path, **options: Any) -> int:
    return run_job(RunOptions(job_id=job_id, attempt=1, project=emulators.project,
                              bucket=emulators.bucket, work_dir=work, max_steps_override=2,
                              device="cpu", progress_bar=False, settings=dict(TOY_SETTINGS),
                              **options))


def test_whole_run_uses_the_secret_and_never_shows_the_token(
        emulators: Any, db: Any, bucket: Any, tiny_sd: Path, tmp_path: Path,
        secret_reads: list[str], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    job = seed_job(db, bucket, tiny_sd, images=2)
    monkeypatch.setenv(schema.ENV_HF_TOKEN_SECRET, "hf-token")  # a short name, as in README
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the push is attempted, then declined
    loaded_with: list[str | None] = []
    real_load = models.load_base_model

    def load(*args: Any, **kwargs: Any) -> Any:
        loaded_with.append(kwargs.get("token"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(models, "load_base_model", load)
    caplog.set_level(logging.DEBUG)
    assert _run(emulators, job.job_id, tmp_path / "work", push_to_hub=True) == 0  # opted in
    doc = job.job(db)
    assert doc[F.STATUS] == S.COMPLETED, doc.get(F.ERROR)
    assert secret_reads == [f"projects/{emulators.project}/secrets/hf-token/versions/latest"]
    assert loaded_with == [TOKEN]
    assert doc[F.METRICS]["hubError"] == "not pushed: HF_HUB_OFFLINE is set"
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(doc) and TOKEN not in repr(job.actor(db))


@pytest.mark.parametrize("transient", [False, True])
def test_unreadable_token_is_named_when_the_base_model_fails(
        emulators: Any, db: Any, bucket: Any, tmp_path: Path, transient: bool,
        no_token_env: pytest.MonkeyPatch) -> None:
    def fail(name: str) -> str:
        raise hub.TokenUnavailable(f"Secret Manager answered HTTP 503 for {name}"
                                   if transient else f"HTTP 403 for {name}", transient=transient)

    no_token_env.setattr(hub, "_access_secret", fail)
    no_token_env.setenv(schema.ENV_HF_TOKEN_SECRET, "hf-token")
    job = seed_job(db, bucket, tmp_path / "gated-or-missing", images=1)
    assert _run(emulators, job.job_id, tmp_path / "work", push_to_hub=False) == 1
    doc = job.job(db)
    assert "could not read the base model" in doc[F.ERROR]
    assert "the Hugging Face token could not be read" in doc[F.ERROR]
    # Secret Manager being down is worth another attempt; a wrong name or role is not.
    assert doc[F.STATUS] == (S.PREPARING if transient else S.FAILED)
    assert is_permanent(hub.TokenUnavailable("x")) is False  # not a TrainerError by itself
