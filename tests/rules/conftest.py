"""Act as a signed-in app user against the emulators' REST APIs, so security rules apply.

The emulators accept unsigned ID tokens (``alg: none``); the Admin SDK (``db``,
``bucket``) sends the "owner" token and bypasses the rules, so it seeds data.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import requests

from tools.emulators import REPO_ROOT, EmulatorSuite

FIRESTORE_RULES = REPO_ROOT / "firestore.rules"
STORAGE_RULES = REPO_ROOT / "storage.rules"


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def unsigned_token(project: str, uid: str, **claims: Any) -> str:
    """A Firebase ID token the emulators accept without a signature."""
    now = int(time.time())
    payload = {
        "iss": f"https://securetoken.google.com/{project}",
        "aud": project,
        "iat": now,
        "exp": now + 3600,
        "auth_time": now,
        "sub": uid,
        "user_id": uid,
        "firebase": {"sign_in_provider": "custom", "identities": {}},
        **claims,
    }
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(payload)}."


# ------------------------------------------------------------------ Firestore REST values
def to_value(value: Any) -> dict[str, Any]:
    """A Python value as a Firestore REST ``Value``."""
    if value is None:
        return {"nullValue": None}
    if isinstance(value, bool):
        return {"booleanValue": value}
    if isinstance(value, int):
        return {"integerValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, datetime):
        return {"timestampValue": value.astimezone(UTC).isoformat().replace("+00:00", "Z")}
    if isinstance(value, (list, tuple)):
        return {"arrayValue": {"values": [to_value(v) for v in value]}}
    if isinstance(value, dict):
        return {"mapValue": {"fields": {k: to_value(v) for k, v in value.items()}}}
    raise TypeError(f"no Firestore value for {value!r}")


class FirestoreAs:
    """Firestore REST calls as one caller; ``uid=None`` is a signed-out client."""

    def __init__(self, suite: EmulatorSuite, uid: str | None, **claims: Any) -> None:
        self.base = (
            f"{suite.url('firestore')}/v1/projects/{suite.project}/databases/(default)/documents"
        )
        self.headers = {}
        if uid is not None:
            token = unsigned_token(suite.project, uid, **claims)
            self.headers["Authorization"] = f"Bearer {token}"

    def get(self, path: str) -> requests.Response:
        return requests.get(f"{self.base}/{path}", headers=self.headers, timeout=30)

    def create(self, collection: str, doc_id: str, data: dict[str, Any]) -> requests.Response:
        return requests.post(
            f"{self.base}/{collection}",
            params={"documentId": doc_id},
            json={"fields": {k: to_value(v) for k, v in data.items()}},
            headers=self.headers,
            timeout=30,
        )

    def update(self, path: str, data: dict[str, Any]) -> requests.Response:
        """Set the given fields of an existing document (others are kept)."""
        params = [("updateMask.fieldPaths", key) for key in data]
        params.append(("currentDocument.exists", "true"))
        return requests.patch(
            f"{self.base}/{path}",
            params=params,
            json={"fields": {k: to_value(v) for k, v in data.items()}},
            headers=self.headers,
            timeout=30,
        )

    def delete(self, path: str) -> requests.Response:
        return requests.delete(f"{self.base}/{path}", headers=self.headers, timeout=30)

    def query(self, collection: str, **equals: Any) -> requests.Response:
        """``collection`` where each given field equals its value."""
        filters = [
            {"fieldFilter": {"field": {"fieldPath": k}, "op": "EQUAL", "value": to_value(v)}}
            for k, v in equals.items()
        ]
        structured: dict[str, Any] = {"from": [{"collectionId": collection}]}
        if len(filters) == 1:
            structured["where"] = filters[0]
        elif filters:
            structured["where"] = {"compositeFilter": {"op": "AND", "filters": filters}}
        return requests.post(
            f"{self.base}:runQuery",
            json={"structuredQuery": structured},
            headers=self.headers,
            timeout=30,
        )


class StorageAs:
    """Firebase Storage REST calls (the client SDKs' API) as one caller."""

    def __init__(self, suite: EmulatorSuite, uid: str | None, **claims: Any) -> None:
        self.base = f"{suite.url('storage')}/v0/b/{suite.bucket}/o"
        self.headers = {}
        if uid is not None:
            token = unsigned_token(suite.project, uid, **claims)
            self.headers["Authorization"] = f"Firebase {token}"

    def _object_url(self, name: str) -> str:
        return f"{self.base}/{urllib.parse.quote(name, safe='')}"

    def upload(self, name: str, data: bytes, content_type: str) -> requests.Response:
        """A one-request multipart upload, as the Web SDK's uploadBytes() does."""
        boundary = "actorgen-rules-test-boundary"
        metadata = json.dumps({"name": name, "contentType": content_type}).encode()
        body = b"".join(
            [
                f"--{boundary}\r\nContent-Type: application/json; charset=utf-8\r\n\r\n".encode(),
                metadata,
                f"\r\n--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode(),
                data,
                f"\r\n--{boundary}--\r\n".encode(),
            ]
        )
        headers = {
            **self.headers,
            "Content-Type": f"multipart/related; boundary={boundary}",
            "X-Goog-Upload-Protocol": "multipart",
        }
        return requests.post(
            self.base,
            params={"name": name, "uploadType": "multipart"},
            data=body,
            headers=headers,
            timeout=60,
        )

    def download(self, name: str) -> requests.Response:
        return requests.get(
            self._object_url(name), params={"alt": "media"}, headers=self.headers, timeout=30
        )

    def delete(self, name: str) -> requests.Response:
        return requests.delete(self._object_url(name), headers=self.headers, timeout=30)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def firestore_rules(emulators: EmulatorSuite) -> Iterator[str]:
    """firestore.rules as in the working tree, loaded into the ``emulators`` instance."""
    source = FIRESTORE_RULES.read_text()
    emulators.put_firestore_rules(source)
    yield source


@pytest.fixture
def as_user(
    emulators: EmulatorSuite, firestore_rules: str
) -> Callable[..., FirestoreAs]:
    """``as_user(uid, **claims)``: a Firestore REST client acting as that user (None: signed out)."""
    return lambda uid=None, **claims: FirestoreAs(emulators, uid, **claims)


@pytest.fixture
def storage_as(emulators: EmulatorSuite) -> Callable[..., StorageAs]:
    """``storage_as(uid, **claims)``: a Firebase Storage REST client acting as that user."""
    return lambda uid=None, **claims: StorageAs(emulators, uid, **claims)

