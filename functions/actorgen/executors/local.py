"""Run training attempts as local processes (emulators, the local demo, tests).

Each attempt gets a folder under ``local_workdir`` (default ``<repo>/.local/executor``)
named ``<schema.job_label_value(job_id)>-a<attempt>``; the folder's name is the
executor job name. It holds:

- ``spec.json``: job id, attempt, user, command, pid, start time;
- ``stdout.log``: the trainer's stdout and stderr;
- ``exit_code``: written by a tiny ``sh`` wrapper when the trainer ends, so the
  result survives the Functions emulator restarting (the process is detached);
- ``cancelled``: a marker written by :meth:`LocalExecutor.cancel`.

The folder is created under an exclusive file lock: of two concurrent submits of
one attempt exactly one starts a process. A submit never adopts an attempt's run
that already ended: that folder is moved aside (``<name>.ended-<ns>``) and the
attempt starts afresh.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import logs, schema
from .base import ExecutorError, ExecutorJob, ExecutorNotFound, ExecutorState, SubmitRequest
from .settings import KIND_LOCAL, ExecutorSettings

log = logging.getLogger(__name__)

#: functions/ (holds the actorgen package) and the repository root, from this file.
FUNCTIONS_DIR = Path(__file__).resolve().parents[2]
REPO_ROOT = FUNCTIONS_DIR.parent
TRAINER_DIR = REPO_ROOT / "trainer_image"
DEFAULT_WORKDIR = REPO_ROOT / ".local" / "executor"

SPEC_FILE = "spec.json"
LOG_FILE = "stdout.log"
EXIT_FILE = "exit_code"
CANCEL_FILE = "cancelled"

#: Parent environment passed through to the trainer; everything else is dropped so
#: the functions' own settings (and secrets) do not leak into it.
PASS_ENV = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LANG",
        "LC_ALL",
        "LC_CTYPE",
        "TZ",
        "TMPDIR",
        "FIRESTORE_EMULATOR_HOST",
        "STORAGE_EMULATOR_HOST",
        "FIREBASE_STORAGE_EMULATOR_HOST",
        "FIREBASE_AUTH_EMULATOR_HOST",
        "CLOUD_TASKS_EMULATOR_HOST",
        "FIREBASE_CONFIG",
        "GOOGLE_CLOUD_PROJECT",
        "GCLOUD_PROJECT",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "TRANSFORMERS_OFFLINE",
        "DIFFUSERS_OFFLINE",
        "CUDA_VISIBLE_DEVICES",
    }
)
PASS_ENV_PREFIXES = ("HF_", "ACTORGEN_", "TORCH_", "PYTORCH_", "OMP_", "MKL_")

#: A trainer that has not got a pid this long after its folder appeared never started.
START_GRACE_SECONDS = 60.0
_ERROR_TAIL_LINES = 20
_ERROR_TAIL_CHARS = 2000

_NAME = re.compile(r"^j[0-9a-f]{40}-a[0-9]+$")

# $1 is the attempt folder (also makes the folder visible in the process's command
# line, so a reused pid is not mistaken for our trainer); the rest is the command.
_WRAPPER = (
    'cd "$1" || exit 125; shift; "$@"; code=$?; '
    f'printf "%s\\n" "$code" > {EXIT_FILE}.tmp && mv -f {EXIT_FILE}.tmp {EXIT_FILE}'
)


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (between threads and processes)."""
    import fcntl

    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def job_dir_name(job_id: str, attempt: int) -> str:
    """The executor job name of an attempt: label-safe, one per (job, attempt)."""
    return f"{schema.job_label_value(job_id)}-a{attempt}"


class LocalExecutor:
    """Starts ``python -m lora_trainer --job-id ID --attempt N`` as a detached process."""

    kind = KIND_LOCAL

    def __init__(self, settings: ExecutorSettings) -> None:
        self.settings = settings
        self.workdir = Path(settings.local_workdir or DEFAULT_WORKDIR).resolve()
        self.python = settings.local_python or sys.executable
        self.module = settings.local_module or schema.TRAINER_MODULE

    # ------------------------------------------------------------------ API
    def find(self, job_id: str, attempt: int) -> ExecutorJob | None:
        name = job_dir_name(job_id, attempt)
        if not (self.workdir / name).is_dir():
            return None
        return self.get(name)

    def submit(self, request: SubmitRequest) -> ExecutorJob:
        name = job_dir_name(request.job_id, request.attempt)
        folder = self.workdir / name
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            with _exclusive(self.workdir / f".{name}.lock"):
                if folder.is_dir():
                    existing = self.get(name)
                    if existing.state.is_active:
                        log.info("job %s attempt %d already started locally as %s",
                                 request.job_id, request.attempt, name)
                        return existing
                    # An ended run of this attempt number (its trainer stopped, e.g. the
                    # job was re-queued after a failed submit) is not this submission's:
                    # adopting it would waste the attempt. Keep it aside, start afresh.
                    aside = self.workdir / f"{name}.ended-{time.time_ns()}"
                    log.info("job %s attempt %d: local run %s already ended (%s); starting "
                             "a new one", request.job_id, request.attempt, name,
                             existing.raw_state)
                    folder.rename(aside)
                os.mkdir(folder)  # the one submit that creates it starts the process
        except OSError as exc:
            raise ExecutorError(
                f"cannot create the local executor folder {folder}: {exc}; check local_workdir",
                retryable=False,
            ) from exc
        try:
            self._start(request, folder)
        except BaseException:
            # Leave nothing behind so a fixed configuration can submit the attempt again.
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return self.get(name)

    def get(self, name: str) -> ExecutorJob:
        folder = self._folder(name)
        if folder is None:
            raise ExecutorNotFound(f"local executor job {name!r} does not exist in {self.workdir}")
        cancelled = (folder / CANCEL_FILE).exists()
        code = _read_exit_code(folder)
        if code is not None:
            return self._exited(name, folder, code, cancelled)
        if cancelled:
            return ExecutorJob(name, ExecutorState.CANCELLED, "cancelled", "cancelled")
        spec = _read_spec(folder)
        pid = spec.get("pid") if spec else None
        if not pid:
            # Between mkdir and the process start, or the submitter died in between.
            age = time.time() - folder.stat().st_mtime
            if age < START_GRACE_SECONDS:
                return ExecutorJob(name, ExecutorState.QUEUED, None, "starting")
            return ExecutorJob(
                name, ExecutorState.FAILED, "the trainer process was never started", "not-started"
            )
        if _alive(int(pid), folder):
            return ExecutorJob(name, ExecutorState.RUNNING, None, "running")
        code = _read_exit_code(folder)  # it may have ended between the two checks
        if code is not None:
            return self._exited(name, folder, code, cancelled)
        tail = self._log_tail(folder)
        return ExecutorJob(
            name,
            ExecutorState.FAILED,
            "trainer process vanished without an exit code" + (f": {tail}" if tail else ""),
            "vanished",
        )

    def cancel(self, name: str) -> None:
        folder = self._folder(name)
        if folder is None:
            log.info("cancel: local executor job %r does not exist", name)
            return
        if _read_exit_code(folder) is not None:
            return  # already finished: nothing to stop, and keep its real outcome
        (folder / CANCEL_FILE).touch()
        spec = _read_spec(folder)
        pid = int(spec["pid"]) if spec and spec.get("pid") else None
        if pid is None or not _alive(pid, folder):
            return
        _signal_group(pid, signal.SIGTERM)
        # The wrapper dies at once; wait for the whole group (the trainer may need a
        # moment to stop, or may ignore SIGTERM), but never for long.
        deadline = time.monotonic() + self.settings.local_cancel_grace_seconds
        while time.monotonic() < deadline and _group_alive(pid):
            time.sleep(0.05)
        if _group_alive(pid):
            log.warning("trainer %s did not stop on SIGTERM; killing it", name)
            _signal_group(pid, signal.SIGKILL)
            # SIGKILL cannot be ignored, but dying takes a moment; return once it is gone.
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and _group_alive(pid):
                time.sleep(0.02)

    # ------------------------------------------------------------------ helpers
    def command(self, request: SubmitRequest) -> list[str]:
        """The trainer's command line (same arguments as on Vertex)."""
        return [
            self.python,
            "-m",
            self.module,
            *schema.trainer_args(request.job_id, request.attempt),
        ]

    def environment(self, request: SubmitRequest) -> dict[str, str]:
        """The trainer's environment: a filtered parent env plus the schema's variables."""
        env = {
            k: v for k, v in os.environ.items() if k in PASS_ENV or k.startswith(PASS_ENV_PREFIXES)
        }
        env.update(self.settings.extra_env)
        env.update(request.env)
        paths = [*self.settings.local_pythonpath, str(TRAINER_DIR), str(FUNCTIONS_DIR)]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"  # so stdout.log is current while it runs
        env[schema.ENV_JOB_ID] = request.job_id
        env[schema.ENV_ATTEMPT] = str(request.attempt)
        if self.settings.bucket:
            env[schema.ENV_BUCKET] = self.settings.bucket
        if self.settings.project:
            env[schema.ENV_PROJECT] = self.settings.project
        return env

    def _start(self, request: SubmitRequest, folder: Path) -> None:
        command = self.command(request)
        spec: dict[str, Any] = {
            "jobId": request.job_id,
            "attempt": request.attempt,
            "userId": request.user_id,
            "command": command,
            "pid": None,
            "startedAt": dt.datetime.now(dt.UTC).isoformat(),
        }
        _write_json(folder / SPEC_FILE, spec)
        try:
            with open(folder / LOG_FILE, "ab") as logf:
                proc = subprocess.Popen(
                    ["sh", "-c", _WRAPPER, "actorgen-local-trainer", str(folder), *command],
                    cwd=folder,
                    env=self.environment(request),
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # own process group: survives us, cancellable
                    close_fds=True,
                )
        except OSError as exc:
            raise ExecutorError(
                f"cannot start the local trainer ({' '.join(command)}): {exc}; check local_python",
                retryable=False,
            ) from exc
        spec["pid"] = proc.pid
        _write_json(folder / SPEC_FILE, spec)
        # Reap the child when it ends so it does not linger as a zombie (which would
        # still look alive to kill(pid, 0)).
        threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()
        log.info(
            "started local trainer for job %s attempt %d: pid %d in %s",
            request.job_id,
            request.attempt,
            proc.pid,
            folder,
        )

    def _folder(self, name: str) -> Path | None:
        if not _NAME.match(name):  # also keeps names from escaping the workdir
            return None
        folder = self.workdir / name
        return folder if folder.is_dir() else None

    def _exited(self, name: str, folder: Path, code: int, cancelled: bool) -> ExecutorJob:
        raw = f"exited:{code}"
        if code == 0:  # a trainer that finished wins over a late cancel
            return ExecutorJob(name, ExecutorState.SUCCEEDED, None, raw)
        if cancelled:
            return ExecutorJob(name, ExecutorState.CANCELLED, "cancelled", raw)
        tail = self._log_tail(folder)
        error = f"trainer exited with code {code}" + (f": {tail}" if tail else "")
        return ExecutorJob(name, ExecutorState.FAILED, error, raw)

    @staticmethod
    def _log_tail(folder: Path) -> str:
        try:
            with open(folder / LOG_FILE, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        # The trainer logs JSON lines (actorgen.logs): keep their severity and message.
        lines = [logs.as_text(line) for line in text.splitlines()
                 if line.strip()][-_ERROR_TAIL_LINES:]
        return "\n".join(lines)[-_ERROR_TAIL_CHARS:]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)  # readers never see half a file


def _read_spec(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return None


def _read_exit_code(folder: Path) -> int | None:
    try:
        return int((folder / EXIT_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int, folder: Path) -> bool:
    """Whether ``pid`` is still our wrapper (not a zombie, not a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():  # no procfs (macOS): kill(0) is the best we have
        return True
    try:
        stat = (proc / "stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
        cmdline = (proc / "cmdline").read_bytes()
    except (OSError, IndexError):
        return False
    # An empty command line means the wrapper is still inside exec(): alive, not yet
    # verifiable. A different one means the pid now belongs to someone else.
    return not cmdline or str(folder).encode() in cmdline


def _group_alive(pgid: int) -> bool:
    """Whether any process of the trainer's group is left (zombies excepted where visible)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return True
    for stat_file in proc.glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields: state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # pid is the group leader (start_new_session)
    except ProcessLookupError:
        pass
