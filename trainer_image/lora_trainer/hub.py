"""The Hugging Face token (gated base models, optional push) and the push itself.

The token is a secret of the deployment, never part of a job document and
never logged. It comes from, in this order:

* ``HF_TOKEN`` in the environment (local runs);
* the Secret Manager secret named by ``schema.ENV_HF_TOKEN_SECRET``
  (``ACTORGEN_HF_TOKEN_SECRET``, set by the functions from their
  ``HF_TOKEN_SECRET`` param): a short secret name (``hf-token``, in the project
  of ``schema.ENV_PROJECT``), ``projects/P/secrets/S`` (latest version) or
  ``projects/P/secrets/S/versions/V``. It is read with the VM's service account
  over the REST API (google-auth comes with firebase-admin, so no extra client
  library is needed).

The same token is passed to every ``from_pretrained``/``load_config`` of the
base model and, only when the deployment opted in (``schema.ENV_HF_PUSH``,
``--push-to-hub``), to the push of the trained LoRA to a private repo.
"""

from __future__ import annotations

import base64
import logging
import os
import re
from pathlib import Path
from typing import Final

from actorgen import schema

log = logging.getLogger(__name__)

ENV_TOKEN: Final = "HF_TOKEN"
#: The one spelling the functions use (schema is the single source of truth).
ENV_TOKEN_SECRET: Final = schema.ENV_HF_TOKEN_SECRET
#: User or organisation that owns the repos; default: the token's own user.
ENV_NAMESPACE: Final = "ACTORGEN_HF_NAMESPACE"
SECRET_MANAGER_URL: Final = "https://secretmanager.googleapis.com/v1/{name}:access"

# Secret Manager ids: letters, digits, '-' and '_', at most 255.
_SECRET_ID = r"[A-Za-z0-9_-]{1,255}"
_PROJECT_ID = r"[a-z0-9][a-z0-9.:-]{0,127}"
_SHORT = re.compile(rf"^{_SECRET_ID}$")
_FULL = re.compile(
    rf"^projects/(?P<project>{_PROJECT_ID})/secrets/(?P<secret>{_SECRET_ID})"
    r"(?:/versions/(?P<version>latest|[0-9]+))?$"
)


class TokenUnavailable(Exception):  # noqa: N818 - reads better at the call sites
    """The configured token could not be read. The message never holds the token.

    ``transient`` is True when trying again later may succeed (network, HTTP
    5xx/429), False for a configuration problem (bad name, no permission, no
    such secret).
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def secret_version_name(secret: str, project: str | None = None) -> str:
    """The full ``projects/P/secrets/S/versions/V`` name of a configured secret.

    ``secret`` is a short name (expanded in ``project``, default the
    ``schema.ENV_PROJECT`` environment variable), or a full resource name with or
    without ``/versions/V`` (``latest`` when absent).
    """
    value = secret.strip().strip("/")
    if _SHORT.match(value):
        project = (project or os.environ.get(schema.ENV_PROJECT, "")).strip()
        if not project:
            raise TokenUnavailable(
                f"{ENV_TOKEN_SECRET} is the short secret name {value!r}, but "
                f"{schema.ENV_PROJECT} is not set to say which project holds it"
            )
        return f"projects/{project}/secrets/{value}/versions/latest"
    match = _FULL.match(value)
    if match is None:
        raise TokenUnavailable(
            f"{ENV_TOKEN_SECRET} must be a secret name or projects/P/secrets/S[/versions/V], "
            f"not {value!r}"
        )
    version = match.group("version") or "latest"
    return f"projects/{match.group('project')}/secrets/{match.group('secret')}/versions/{version}"


def _access_secret(version_name: str) -> str:
    """The payload of one secret version (the only code that talks to Secret Manager)."""
    import google.auth
    from google.auth.transport.requests import AuthorizedSession

    try:
        credentials, _ = google.auth.default(
            scopes=["https://www.googleapis.com/auth/cloud-platform"]
        )
        response = AuthorizedSession(credentials).get(
            SECRET_MANAGER_URL.format(name=version_name), timeout=30
        )
    except Exception as err:  # noqa: BLE001 - credentials or network
        raise TokenUnavailable(
            f"Secret Manager could not be reached for {version_name} ({type(err).__name__})",
            transient=True,
        ) from None
    if response.status_code != 200:
        # The body can echo the request; only the status code is safe to show.
        raise TokenUnavailable(
            f"Secret Manager answered HTTP {response.status_code} for {version_name}"
            + ("" if response.status_code >= 500 or response.status_code == 429 else
               " (check the secret's name and the trainer service account's "
               "roles/secretmanager.secretAccessor on it)"),
            transient=response.status_code >= 500 or response.status_code == 429,
        )
    data = response.json()["payload"]["data"]
    return base64.b64decode(data).decode().strip()


def hub_token() -> str | None:
    """The configured token, or None when none is configured.

    Raises :class:`TokenUnavailable` when a secret is configured but cannot be read.
    """
    from actorgen import logs

    token = os.environ.get(ENV_TOKEN, "").strip()
    if token:
        logs.register_secret(token)  # whatever prints it later, the logs never show it
        return token
    secret = os.environ.get(ENV_TOKEN_SECRET, "").strip()
    if not secret:
        return None
    token = _access_secret(secret_version_name(secret))
    if not token:
        raise TokenUnavailable(f"the secret {secret_version_name(secret)} is empty")
    logs.register_secret(token)
    return token


def repo_name(job_id: str) -> str:
    return f"actorgen-lora-{job_id}".lower()


class PublicRepoRefused(Exception):  # noqa: N818 - reads better at the call sites
    """The target repo already exists and is public: a face LoRA is never pushed there."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def target_repo(job_id: str, token: str) -> str:
    """``<namespace>/actorgen-lora-<job>``; the namespace defaults to the token's user."""
    from huggingface_hub import HfApi

    namespace = os.environ.get(ENV_NAMESPACE) or HfApi(token=token).whoami(token=token)["name"]
    return f"{namespace}/{repo_name(job_id)}"


def planned_repo(job_id: str, token: str | None) -> str | None:
    """The repo a push will go to, for the model card; None when no push can happen.

    Never raises: a failure here shows up again, recorded, in :func:`maybe_push`.
    """
    if not token or _offline():
        return None
    try:
        return target_repo(job_id, token)
    except Exception as err:  # noqa: BLE001 - the hub client's texts may carry headers
        log.warning("the Hugging Face namespace could not be read (%s)", type(err).__name__)
        return None


def push_folder(folder: Path, job_id: str, token: str, repo_id: str | None = None) -> str:
    """Create (private) and upload to ``<namespace>/actorgen-lora-<job>``; returns the repo id.

    ``create_repo(exist_ok=True)`` leaves an existing repo as it is, so its visibility
    is checked before anything is uploaded: a public one is refused.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = repo_id or target_repo(job_id, token)
    api.create_repo(repo_id, private=True, exist_ok=True, repo_type="model", token=token)
    if not api.repo_info(repo_id, repo_type="model", token=token).private:
        raise PublicRepoRefused(f"not pushed: the Hub repo {repo_id} exists and is public")
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message=f"LoRA of training job {job_id}", token=token)
    return repo_id


def maybe_push(folder: Path, job_id: str, token: str | None = None, *,
               token_problem: str | None = None,
               repo_id: str | None = None) -> tuple[str | None, str | None]:
    """Push when a token is configured. Returns ``(repo_id, error)``; never raises.

    Only called when the deployment opted in to pushing (``RunOptions.push_to_hub``).

    ``token`` is the one the run already resolved (:func:`hub_token`); when
    ``token`` and ``token_problem`` are both None, the environment is read here.
    The model is already in Cloud Storage, so a failed push is recorded but
    does not fail the job.
    """
    if token is None and token_problem is None:
        try:
            token = hub_token()
        except Exception as err:  # noqa: BLE001
            token_problem = str(err) if isinstance(err, TokenUnavailable) else type(err).__name__
    if token_problem is not None:
        log.warning("Hugging Face token unavailable: %s", token_problem)
        return None, "the Hugging Face token could not be read"
    if not token:
        return None, None
    if _offline():
        return None, "not pushed: HF_HUB_OFFLINE is set"
    try:
        repo_id = push_folder(folder, job_id, token, repo_id)
    except PublicRepoRefused as err:
        log.warning("%s", err)
        return None, str(err)
    except Exception as err:  # noqa: BLE001
        # Exception texts of the hub client can contain request headers; log the type only.
        log.warning("push to the Hugging Face Hub failed: %s", type(err).__name__)
        return None, f"push to the Hugging Face Hub failed ({type(err).__name__})"
    log.info("pushed to the Hugging Face Hub as %s", repo_id)
    return repo_id, None
