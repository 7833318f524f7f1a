"""Pushing a user's face LoRA to the Hugging Face Hub is opt-in, private, and on the card.

The Hub cannot be reached offline: ``huggingface_hub.HfApi`` is replaced by a
recording stand-in; everything around it is the product's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from actorgen import schema
from actorgen.config import Settings
from lora_trainer import __main__ as cli
from lora_trainer import hub
from lora_trainer.run import RunOptions, run_job

from tests.trainer.seed import TOY_SETTINGS, seed_job

F = schema.Field
S = schema.JobStatus
MV = schema.ModelVersionField
TOKEN = "hf_NotARealToken_4242"


class FakeHub:
    """Records what the trainer asks of the Hub; ``existing_public`` repos are public."""

    existing_public: set[str] = set()
    calls: list[tuple[str, Any]] = []

    def __init__(self, token: str | None = None) -> None:
        self.token = token

    def whoami(self, token: str | None = None) -> dict[str, str]:
        self.calls.append(("whoami", token))
        return {"name": "studio"}

    def create_repo(self, repo_id: str, **kwargs: Any) -> None:
        self.calls.append(("create_repo", (repo_id, kwargs.get("private"))))

    def repo_info(self, repo_id: str, **kwargs: Any) -> Any:
        return type("Info", (), {"private": repo_id not in self.existing_public})()

    def upload_folder(self, **kwargs: Any) -> None:
        self.calls.append(("upload_folder", kwargs["repo_id"]))


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> type[FakeHub]:
    import huggingface_hub

    FakeHub.calls, FakeHub.existing_public = [], set()
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    for name in (hub.ENV_TOKEN, hub.ENV_TOKEN_SECRET, hub.ENV_NAMESPACE, schema.ENV_HF_PUSH):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return FakeHub


def test_only_the_push_setting_turns_the_push_on(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (schema.ENV_HF_PUSH, schema.ENV_TRAINER_ARGS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(schema.ENV_HF_TOKEN_SECRET, "hf-token")  # for gated base models
    assert cli.parse_args(["--job-id", "j"]).push_to_hub is False
    assert RunOptions(job_id="j", attempt=1).push_to_hub is False
    monkeypatch.setenv(schema.ENV_HF_PUSH, "1")
    assert cli.parse_args(["--job-id", "j"]).push_to_hub is True
    assert cli.parse_args(["--job-id", "j", "--no-hub"]).no_hub is True


def test_the_functions_pass_the_push_setting_only_when_set() -> None:
    assert Settings().hf_push_models is False
    quiet = Settings(hf_token_secret="hf-token").executor_settings().extra_env
    assert schema.ENV_HF_PUSH not in quiet and quiet[schema.ENV_HF_TOKEN_SECRET] == "hf-token"
    loud = Settings(hf_token_secret="hf-token", hf_push_models=True).executor_settings()
    assert loud.extra_env[schema.ENV_HF_PUSH] == "1"


def test_an_existing_public_repo_is_never_pushed_to(fake_hub: type[FakeHub],
                                                    tmp_path: Path) -> None:
    fake_hub.existing_public = {"studio/actorgen-lora-job1"}
    assert hub.maybe_push(tmp_path, "job1", TOKEN) == (
        None, "not pushed: the Hub repo studio/actorgen-lora-job1 exists and is public")
    assert ("upload_folder", "studio/actorgen-lora-job1") not in fake_hub.calls
    assert hub.maybe_push(tmp_path, "job2", TOKEN) == ("studio/actorgen-lora-job2", None)
    assert ("create_repo", ("studio/actorgen-lora-job2", True)) in fake_hub.calls
    assert ("upload_folder", "studio/actorgen-lora-job2") in fake_hub.calls


def _run(emulators: Any, job_id: str, work: Path, **options: Any) -> int:
    return run_job(RunOptions(job_id=job_id, attempt=1, project=emulators.project,
                              bucket=emulators.bucket, work_dir=work, max_steps_override=2,
                              device="cpu", progress_bar=False, settings=dict(TOY_SETTINGS),
                              **options))


def _card(bucket: Any, job: Any) -> str:
    prefix = schema.model_prefix(job.uid, job.actor_id, job.job_id)
    return bucket.blob(prefix + schema.ArtifactName.MODEL_CARD).download_as_text()


def test_a_token_alone_never_pushes_a_face(emulators: Any, db: Any, bucket: Any,
                                           tiny_sd: Path, tmp_path: Path,
                                           fake_hub: type[FakeHub],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # The token is configured (gated base models need it); the push is not.
    monkeypatch.setenv(hub.ENV_TOKEN, TOKEN)
    job = seed_job(db, bucket, tiny_sd, images=2)
    assert _run(emulators, job.job_id, tmp_path / "work") == 0
    doc = job.job(db)
    assert doc[F.STATUS] == S.COMPLETED, doc.get(F.ERROR)
    assert fake_hub.calls == []
    assert "hubError" not in doc[F.METRICS]
    assert job.actor(db)[F.MODEL_VERSIONS][-1].get(MV.HUB_REPO) is None
    card = _card(bucket, job)
    assert "Not pushed to the Hugging Face Hub" in card
    assert f"gs://{emulators.bucket}/{schema.model_prefix(job.uid, job.actor_id, job.job_id)}" \
        in card


def test_an_opted_in_push_is_private_and_on_the_card(emulators: Any, db: Any, bucket: Any,
                                                     tiny_sd: Path, tmp_path: Path,
                                                     fake_hub: type[FakeHub],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hub.ENV_TOKEN, TOKEN)
    job = seed_job(db, bucket, tiny_sd, images=2)
    assert _run(emulators, job.job_id, tmp_path / "work", push_to_hub=True) == 0
    doc = job.job(db)
    repo = f"studio/actorgen-lora-{job.job_id}".lower()
    assert doc[F.STATUS] == S.COMPLETED, doc.get(F.ERROR)
    assert ("create_repo", (repo, True)) in fake_hub.calls
    assert ("upload_folder", repo) in fake_hub.calls
    assert "hubError" not in doc[F.METRICS]
    assert job.actor(db)[F.MODEL_VERSIONS][-1][MV.HUB_REPO] == repo
    assert f"the private repository `{repo}`" in _card(bucket, job)
