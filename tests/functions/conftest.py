"""Shared pieces of the functions tests: import paths, a clean database, a local executor.

The emulator fixtures (``emulators``, ``db``, ``bucket``) come from tests/conftest.py.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
for path in (REPO_ROOT / "functions", REPO_ROOT):  # actorgen, and tests.photos
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

STAND_IN_DIR = Path(__file__).parent / "stand_in_trainer"


@pytest.fixture
def executor_factory(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Builds LocalExecutors running the stand-in trainer; stops every trainer afterwards."""
    from actorgen.executors import ExecutorSettings, build_executor

    made: list[Any] = []

    def make(mode: str = "hang", **overrides: Any) -> Any:
        settings = ExecutorSettings(
            kind="local",
            project="demo-actorgen",
            local_workdir=str(tmp_path / "executor"),
            local_module="stand_in_trainer",
            local_pythonpath=(str(STAND_IN_DIR),),
            local_cancel_grace_seconds=2.0,
            extra_env={"ACTORGEN_STAND_IN_MODE": mode},
        ).replace(**overrides)
        executor = build_executor(settings)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        for folder in sorted(executor.workdir.glob("j*-a*")):
            executor.cancel(folder.name)


@pytest.fixture(autouse=True)
def _fresh_upload_sweep_cursor() -> Iterator[None]:
    """The upload sweep's resume point lives in memory; no test sees another's."""
    from actorgen import reconcile

    reconcile._UPLOAD_CURSOR.resume_from = None
    yield
    reconcile._UPLOAD_CURSOR.resume_from = None


@pytest.fixture
def owner() -> str:
    """A fresh user id."""
    return f"user-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def actor_id(db: Any, owner: str) -> str:
    """An actor document of ``owner`` with no photos yet."""
    from actorgen import schema

    actor_id = f"actor-{uuid.uuid4().hex[:8]}"
    db.collection(schema.ACTORS).document(actor_id).set({schema.Field.USER_ID: owner})
    return actor_id
