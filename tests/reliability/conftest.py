"""Fixtures of the reliability proofs: a shared folder executor with one-shot hooks,
and ``proof``, which collects what each proof tried and saw for docs/reliability.md.

Figures are written (JSON) to ``$ACTORGEN_PROOF_OUT`` (default
``.cache/proof/results.json``) when the session ends; ``python -m tools.proof``
runs these tests and renders docs/reliability.md from that file.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.folder_executor import FolderExecutor

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / ".cache" / "proof" / "results.json"
_RESULTS: list[dict[str, Any]] = []


class Hooked:
    """An executor whose next ``get``/``submit``/``cancel`` first runs a hook, once.

    A hook is how a proof forces an interleaving: whatever it does happens after the
    code under test read the job document and before it writes (its transaction).
    """

    def __init__(self, inner: FolderExecutor) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.hooks: dict[str, Callable[..., Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def on(self, method: str, hook: Callable[..., Any]) -> None:
        self.hooks[method] = hook

    def _fire(self, method: str, *args: Any) -> None:
        with self._lock:
            hook = self.hooks.pop(method, None)
        if hook is not None:
            hook(*args)

    def find(self, job_id: str, attempt: int) -> Any:
        self._fire("find", job_id, attempt)
        return self.inner.find(job_id, attempt)

    def submit(self, request: Any) -> Any:
        self.calls.append(("submit", f"{request.job_id}-a{request.attempt}"))
        self._fire("submit", request)
        return self.inner.submit(request)

    def get(self, name: str) -> Any:
        self._fire("get", name)
        return self.inner.get(name)

    def cancel(self, name: str) -> None:
        self.calls.append(("cancel", name))
        self._fire("cancel", name)
        self.inner.cancel(name)


@pytest.fixture
def folder_executor(tmp_path: Path) -> FolderExecutor:
    return FolderExecutor(tmp_path / "executor")


@pytest.fixture
def hooked(folder_executor: FolderExecutor) -> Hooked:
    return Hooked(folder_executor)


class Proof:
    """What one proof tried (``cases``), what held, and its figures."""

    def __init__(self, name: str, doc: str) -> None:
        self.entry: dict[str, Any] = {"name": name, "doc": doc, "cases": 0, "held": [],
                                      "figures": {}}

    def case(self, count: int = 1) -> None:
        self.entry["cases"] += count

    def held(self, claim: str) -> None:
        self.entry["held"].append(claim)

    def figures(self, **values: Any) -> None:
        self.entry["figures"].update(values)


@pytest.fixture
def proof(request: pytest.FixtureRequest) -> Iterator[Proof]:
    doc = (request.function.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    record = Proof(request.node.name, " ".join(doc.split()))
    yield record
    record.entry["outcome"] = "passed"
    _RESULTS.append(record.entry)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not _RESULTS:
        return
    failed = {item.nodeid.split("::")[-1] for item in getattr(session, "_proof_failed", [])}
    for entry in _RESULTS:
        if entry["name"] in failed:
            entry["outcome"] = "failed"
    out = Path(os.environ.get("ACTORGEN_PROOF_OUT") or DEFAULT_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    profile = os.environ.get("ACTORGEN_PROOF_PROFILE", "ci")
    out.write_text(json.dumps({"profile": profile, "proofs": _RESULTS}, indent=2, default=str))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        failed = getattr(item.session, "_proof_failed", [])
        failed.append(item)
        item.session._proof_failed = failed  # type: ignore[attr-defined]
