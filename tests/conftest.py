"""Session fixtures: the real Firebase emulators on free ports, and clients bound to them.

Fixtures (all lazy: a test that requests none of them never starts an emulator):

``emulators``            session. Firestore + Storage + Cloud Tasks, NO Functions emulator, so
                         tests call handlers directly and no trigger races them. Its variables
                         (FIRESTORE_EMULATOR_HOST, STORAGE_EMULATOR_HOST, GCLOUD_PROJECT,
                         FIREBASE_CONFIG...) are exported to os.environ for the whole session,
                         so ``actorgen.clients`` and any client library reach it.
                         Firestore and Storage are WIPED before each test that uses it.
``db``                   session. google.cloud.firestore Client (actorgen.clients, Admin SDK with
                         anonymous credentials) bound to ``emulators``; bypasses rules.
``bucket``               session. The default bucket (demo-actorgen.appspot.com) of ``emulators``.
``functions_env``        session. Params/env for the Functions emulator ({"EXECUTOR": "local"}).
                         Override it (session scope) in a conftest.py next to e2e tests.
``functions_emulators``  session. Firestore + Storage + Functions + Tasks running functions/main.py,
                         a SEPARATE instance on other ports. Nothing is exported to os.environ:
                         use its ``firestore_client()`` / ``storage_bucket()`` / ``functions_url()``.
                         Not wiped between tests (triggers of an earlier test may still run):
                         use ``unique_id``.
``unique_id``            function. A short random id for documents and objects.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tools.emulators import EmulatorSuite, start_emulators

_started: list[EmulatorSuite] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by the emulators they need, so ``-m "not emulator"`` runs pure tests only."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if "emulators" in names or "functions_emulators" in names:
            item.add_marker(pytest.mark.emulator)
        if "functions_emulators" in names:
            item.add_marker(pytest.mark.e2e)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say which emulators ran, how fast they started, and what the stand-ins did not check."""
    for suite in _started:
        terminalreporter.write_line(
            f"emulators [{','.join(suite.only)}] started in {suite.start_seconds}s "
            f"(firestore: {suite.firestore_runtime}); log: {suite.log_path}"
        )
    if any("storage" in s.only and not s.storage_rules_evaluated for s in _started):
        terminalreporter.write_line(
            "WARNING: storage.rules were NOT evaluated in this run (stand-in rules "
            "runtime, see docs/local-emulators.md); storage rules tests were skipped.",
            red=True,
            bold=True,
        )


@pytest.fixture(scope="session")
def emulators() -> Iterator[EmulatorSuite]:
    """Firestore, Storage and Cloud Tasks emulators for this test session (no Functions)."""
    with start_emulators(only=("firestore", "storage", "tasks")) as suite:
        _started.append(suite)
        with pytest.MonkeyPatch.context() as patch:
            for key, value in suite.env.items():
                patch.setenv(key, value)
            yield suite


@pytest.fixture(autouse=True)
def _wipe_emulators(request: pytest.FixtureRequest) -> None:
    """Start each test that uses ``emulators`` from empty Firestore and Storage."""
    if "emulators" in request.fixturenames:
        suite: EmulatorSuite = request.getfixturevalue("emulators")
        suite.clear_firestore()
        suite.clear_storage()


@pytest.fixture(scope="session")
def db(emulators: EmulatorSuite) -> Any:
    """Firestore client of the ``emulators`` instance (Admin SDK: rules do not apply)."""
    from actorgen import clients

    client = clients.firestore_client()
    # A client made before the emulator variables were set would talk to Google.
    assert client._emulator_host == emulators.hosts["firestore"], (
        "the firebase_admin app was initialised before the emulators fixture; "
        "request `db`/`emulators` before anything calls actorgen.clients"
    )
    return client


@pytest.fixture(scope="session")
def bucket(emulators: EmulatorSuite) -> Any:
    """The default Storage bucket of the ``emulators`` instance (Admin SDK)."""
    from actorgen import clients

    return clients.storage_bucket(emulators.bucket)


@pytest.fixture(scope="session")
def functions_env() -> dict[str, str]:
    """Params of the functions under the Functions emulator (dotenv values; see tools/emulators)."""
    return {"EXECUTOR": "local"}


@pytest.fixture(scope="session")
def functions_emulators(functions_env: dict[str, str]) -> Iterator[EmulatorSuite]:
    """A second suite running functions/main.py in the Functions emulator, for e2e tests."""
    with start_emulators(
        only=("firestore", "storage", "functions", "tasks"), extra_env=functions_env
    ) as suite:
        _started.append(suite)
        yield suite


@pytest.fixture
def unique_id() -> str:
    """A short random id: keeps tests apart where data is not wiped between them."""
    return uuid.uuid4().hex[:12]
