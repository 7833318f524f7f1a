"""Optional push of the exported LoRA to a private Hugging Face Hub repository.

The token is a secret of the deployment, never part of a job document and
never logged: ``HF_TOKEN`` in the environment, or the Secret Manager secret
version named by ``HF_TOKEN_SECRET`` (``projects/P/secrets/S/versions/V``),
read with the VM's service account over the REST API (google-auth comes with
firebase-admin, so no extra client library is needed).
"""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

ENV_TOKEN: Final = "HF_TOKEN"
ENV_TOKEN_SECRET: Final = "HF_TOKEN_SECRET"
#: User or organisation that owns the repos; default: the token's own user.
ENV_NAMESPACE: Final = "ACTORGEN_HF_NAMESPACE"
SECRET_MANAGER_URL: Final = "https://secretmanager.googleapis.com/v1/{name}:access"


def _secret_manager_token(name: str) -> str:
    import google.auth
    from google.auth.transport.requests import AuthorizedSession

    credentials, _ = google.auth.default(
        scopes=["https://www.googleapis.com/auth/cloud-platform"]
    )
    response = AuthorizedSession(credentials).get(SECRET_MANAGER_URL.format(name=name),
                                                  timeout=30)
    if response.status_code != 200:
        # The body can echo the request; only the status code is safe to show.
        raise RuntimeError(f"Secret Manager answered HTTP {response.status_code} for {name}")
    data = response.json()["payload"]["data"]
    return base64.b64decode(data).decode().strip()


def hub_token() -> str | None:
    """The configured token, or None when pushing is not configured."""
    token = os.environ.get(ENV_TOKEN, "").strip()
    if token:
        return token
    secret = os.environ.get(ENV_TOKEN_SECRET, "").strip()
    if secret:
        return _secret_manager_token(secret) or None
    return None


def repo_name(job_id: str) -> str:
    return f"actorgen-lora-{job_id}".lower()


def push_folder(folder: Path, job_id: str, token: str) -> str:
    """Create (private) and upload to ``<namespace>/actorgen-lora-<job>``; returns the repo id."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    namespace = os.environ.get(ENV_NAMESPACE) or api.whoami()["name"]
    repo_id = f"{namespace}/{repo_name(job_id)}"
    api.create_repo(repo_id, private=True, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message=f"LoRA of training job {job_id}")
    return repo_id


def maybe_push(folder: Path, job_id: str) -> tuple[str | None, str | None]:
    """Push when configured. Returns ``(repo_id, error)``; never raises.

    The model is already in Cloud Storage, so a failed push is recorded but
    does not fail the job.
    """
    try:
        token = hub_token()
    except Exception as err:  # noqa: BLE001
        log.warning("Hugging Face token unavailable: %s", type(err).__name__)
        return None, "the Hugging Face token could not be read"
    if not token:
        return None, None
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return None, "not pushed: HF_HUB_OFFLINE is set"
    try:
        repo_id = push_folder(folder, job_id, token)
    except Exception as err:  # noqa: BLE001
        # Exception texts of the hub client can contain request headers; log the type only.
        log.warning("push to the Hugging Face Hub failed: %s", type(err).__name__)
        return None, f"push to the Hugging Face Hub failed ({type(err).__name__})"
    log.info("pushed to the Hugging Face Hub as %s", repo_id)
    return repo_id, None
