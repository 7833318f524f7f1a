"""A process-free executor shared by several processes through one folder.

The burst and interleaving proofs need hundreds of executor jobs and several
dispatch and reconcile processes looking at the same ones; starting a trainer
process per attempt (LocalExecutor) would measure the machine, not the pipeline.
Each executor job is a folder ``<root>/<job id>-a<attempt>`` with a ``state`` file;
creation is an atomic ``mkdir`` under an ``flock``, so exactly one create happens
per attempt whichever process submits, and the executor keeps books the proofs read
afterwards: every create, every submit call, and the most jobs (all, and per user)
ever active at once, counted at each create.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from actorgen.executors import ExecutorJob, ExecutorNotFound, ExecutorState, SubmitRequest

STATE = "state"
SPEC = "spec.json"
#: Marker of an attempt whose trainer is writing ``completed`` and exiting: no longer
#: counted against the caps (the dispatcher stops counting it once completed lands).
COMPLETING = "completing"
BOOKS = "books.json"


class FolderExecutor:
    kind = "local"

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ API
    @staticmethod
    def name_of(job_id: str, attempt: int) -> str:
        return f"{job_id}-a{attempt}"

    def find(self, job_id: str, attempt: int) -> ExecutorJob | None:
        name = self.name_of(job_id, attempt)
        return self.get(name) if (self.root / name).is_dir() else None

    def submit(self, request: SubmitRequest) -> ExecutorJob:
        name = self.name_of(request.job_id, request.attempt)
        with self._locked() as books:
            books["submits"] += 1
            folder = self.root / name
            try:
                folder.mkdir()
            except FileExistsError:
                return self.get(name)
            spec = {"job_id": request.job_id, "attempt": request.attempt,
                    "user_id": request.user_id, "created": time.time()}
            (folder / SPEC).write_text(json.dumps(spec))
            (folder / STATE).write_text(ExecutorState.RUNNING.value)
            books["creates"] += 1
            users = Counter(s["user_id"] for s in self._active_specs())
            books["peak_active"] = max(books["peak_active"], sum(users.values()))
            books["peak_active_per_user"] = max(
                books["peak_active_per_user"], max(users.values(), default=0)
            )
            jobs = Counter(s["job_id"] for s in self._active_specs())
            books["peak_active_per_job"] = max(
                books["peak_active_per_job"], max(jobs.values(), default=0)
            )
        return self.get(name)

    def get(self, name: str) -> ExecutorJob:
        try:
            raw = (self.root / name / STATE).read_text().strip()
        except FileNotFoundError:
            raise ExecutorNotFound(f"no executor job {name}") from None
        state = ExecutorState(raw or ExecutorState.QUEUED.value)
        error = "the worker exited with status 1" if state == ExecutorState.FAILED else None
        return ExecutorJob(name, state, error, raw)

    def cancel(self, name: str) -> None:
        with self._locked():
            path = self.root / name / STATE
            if path.exists() and ExecutorState(path.read_text().strip()).is_active:
                path.write_text(ExecutorState.CANCELLED.value)

    # ------------------------------------------------------------ for proofs
    def set_state(self, name: str, state: ExecutorState) -> None:
        """What the training service does by itself (a crash, a finished worker)."""
        with self._locked():
            (self.root / name / STATE).write_text(state.value)

    def jobs(self) -> list[dict[str, Any]]:
        """Every executor job: its spec plus ``name`` and ``state``."""
        out = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            try:
                spec = json.loads((folder / SPEC).read_text())
                state = (folder / STATE).read_text().strip()
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            out.append({**spec, "name": folder.name, "state": state})
        return out

    def active(self) -> list[dict[str, Any]]:
        return [j for j in self.jobs() if ExecutorState(j["state"]).is_active]

    def mark_completing(self, name: str) -> None:
        with self._locked():
            (self.root / name / COMPLETING).touch()

    def books(self) -> dict[str, int]:
        with self._locked() as books:
            return dict(books)

    # -------------------------------------------------------------- internal
    def _active_specs(self) -> Iterator[dict[str, Any]]:
        return iter([j for j in self.active()
                     if not (self.root / j["name"] / COMPLETING).exists()])

    @contextmanager
    def _locked(self) -> Iterator[dict[str, int]]:
        """An exclusive lock over the folder, with the books loaded (and saved after)."""
        with open(self.root / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                path = self.root / BOOKS
                books = {"submits": 0, "creates": 0, "peak_active": 0,
                         "peak_active_per_user": 0, "peak_active_per_job": 0}
                if path.exists():
                    books.update(json.loads(path.read_text()))
                before = dict(books)
                yield books
                if books != before:
                    tmp = path.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_text(json.dumps(books))
                    tmp.replace(path)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
