"""Firebase Admin SDK clients, initialised once per process.

Shared by the functions and the trainer. In Cloud Functions and on Vertex AI
the default service-account credentials are used. Under the Local Emulator
Suite (``FIRESTORE_EMULATOR_HOST`` or ``STORAGE_EMULATOR_HOST`` set) there are
no credentials offline, so an anonymous one is used instead: the emulators
do not check tokens, and a client that tried to fetch real ones would hang on
the metadata server.
"""

from __future__ import annotations

import json
import os
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import firebase_admin
    from google.cloud.firestore import Client as FirestoreClient
    from google.cloud.storage import Bucket

_lock = threading.Lock()
EMULATOR_HOST_VARS = (
    "FIRESTORE_EMULATOR_HOST",
    "STORAGE_EMULATOR_HOST",
    "FIREBASE_STORAGE_EMULATOR_HOST",
)


def using_emulators() -> bool:
    """True when the process talks to the Local Emulator Suite."""
    return any(os.environ.get(name) for name in EMULATOR_HOST_VARS)


def project_id() -> str | None:
    """The Google Cloud project from the environment (Cloud Functions, Vertex, emulators)."""
    for name in ("GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT", "GCP_PROJECT"):
        if os.environ.get(name):
            return os.environ[name]
    return _firebase_config().get("projectId")


def default_bucket_name() -> str | None:
    """The Storage bucket: ACTORGEN_BUCKET, else FIREBASE_CONFIG's, else <project>.appspot.com."""
    from actorgen.schema import ENV_BUCKET

    if os.environ.get(ENV_BUCKET):
        return os.environ[ENV_BUCKET]
    if _firebase_config().get("storageBucket"):
        return _firebase_config()["storageBucket"]
    project = project_id()
    return f"{project}.appspot.com" if project else None


def _firebase_config() -> dict[str, Any]:
    raw = os.environ.get("FIREBASE_CONFIG", "")
    if not raw:
        return {}
    try:
        if raw.lstrip().startswith("{"):
            return json.loads(raw)
        with open(raw, encoding="utf-8") as fh:  # the variable may name a file
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def get_app() -> "firebase_admin.App":
    """The default firebase_admin app, created on first use."""
    import firebase_admin

    with _lock:
        try:
            return firebase_admin.get_app()
        except ValueError:
            pass
        options = {k: v for k, v in (
            ("projectId", project_id()),
            ("storageBucket", default_bucket_name()),
        ) if v}
        credential = _anonymous_credential() if using_emulators() else None
        return firebase_admin.initialize_app(credential, options)


def firestore_client() -> "FirestoreClient":
    from firebase_admin import firestore

    return firestore.client(get_app())


def storage_bucket(name: str | None = None) -> "Bucket":
    from firebase_admin import storage

    return storage.bucket(name, get_app())


def _anonymous_credential() -> Any:
    """A firebase_admin credential that sends no token (the emulators accept that)."""
    from firebase_admin import credentials
    from google.auth.credentials import AnonymousCredentials

    class AnonymousCredential(credentials.Base):
        def get_credential(self) -> AnonymousCredentials:
            return AnonymousCredentials()

    return AnonymousCredential()
