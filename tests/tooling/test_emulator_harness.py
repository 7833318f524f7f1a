"""tools/emulators.py: the offline pieces, the fixtures, and a Functions emulator run.

The Functions emulator test runs a throwaway main.py in a temporary copy of the
project, so it checks the harness without depending on functions/main.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from tools import emulators as harness
from tools.emulators import REPO_ROOT, EmulatorSuite, start_emulators


# ------------------------------------------------------------------ pure
def test_manifest_lines_are_folded_at_72_bytes():
    line = harness._manifest_line("Class-Path", "file:///" + "x" * 300 + "/emulator.jar")
    rows = line.split("\r\n")[:-1]
    assert all(len(row.encode()) <= 72 for row in rows)
    assert all(row.startswith(" ") for row in rows[1:])
    assert "".join(row[1:] if i else row for i, row in enumerate(rows)).endswith("emulator.jar")


def test_launcher_jar_names_main_class_and_class_path(tmp_path, monkeypatch):
    gcloud_jar = tmp_path / "cloud-firestore-emulator.jar"
    gcloud_jar.write_bytes(b"not really a jar")
    monkeypatch.setattr(harness, "CACHE_DIR", tmp_path / "cache")
    launcher = harness.firestore_launcher_jar(gcloud_jar)
    assert harness.firestore_launcher_jar(gcloud_jar) == launcher  # cached
    manifest = zipfile.ZipFile(launcher).read("META-INF/MANIFEST.MF").decode()
    unfolded = manifest.replace("\r\n ", "")
    assert f"Main-Class: {harness.FIRESTORE_MAIN_CLASS}\r\n" in unfolded
    assert f"Class-Path: {gcloud_jar.as_uri()}\r\n" in unfolded


def test_storage_standin_speaks_the_rules_runtime_protocol():
    requests_in = [
        {"id": 0, "action": "load_ruleset", "context": {"rulesetName": "0", "source": {}}},
        {"id": 1, "action": "verify", "context": {"path": "/b/x/o/y", "method": "create"}},
    ]
    out = subprocess.run(
        [sys.executable, str(harness.STANDIN_SCRIPT)],
        input="\n".join(json.dumps(r) for r in requests_in) + "\nnot json\n",
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.splitlines()
    assert [json.loads(line) for line in out] == [
        {"id": -1, "status": "ok"},
        {"id": 0, "status": "ok", "errors": [], "warnings": [], "result": {"rulesVersion": 2}},
        {"id": 1, "status": "ok", "errors": [], "warnings": [], "result": {"permit": True}},
    ]


def test_extra_env_goes_to_a_per_run_dotenv(tmp_path):
    project = tmp_path / "project"
    (project / "functions").mkdir(parents=True)
    (project / "functions" / ".env").write_text("A=from-env\n")
    (project / "functions" / ".env.local").write_text("B=from-local")
    config = {"functions": [{"source": "functions", "codebase": "default"}]}
    harness._write_functions_env(
        project, config, project / "run", "demo-x",
        {"B": "override", "C": 'quote " and \n newline', "GCLOUD_PROJECT": "not-in-dotenv"},
    )
    env_dir = project / config["functions"][0]["configDir"]
    assert env_dir == project / "run" / "functions-env-0"
    assert (env_dir / ".env").read_text() == "A=from-env\n"
    local = (env_dir / ".env.local").read_text()
    assert local.startswith("B=from-local\nB=\"override\"\n")
    assert 'C="quote \\" and \\n newline"' in local
    assert "GCLOUD_PROJECT" not in local  # reserved: firebase-tools refuses it in dotenv
    assert not (project / "functions" / ".env.demo-x").exists()


def test_java_found_is_21_or_newer():
    java = harness.find_java()
    assert (harness._java_major(str(java)) or 0) >= 21


# ------------------------------------------------------------------ the emulators fixture
def test_emulators_fixture_exports_env_and_clients_reach_it(emulators, db, bucket):
    assert os.environ["FIRESTORE_EMULATOR_HOST"] == emulators.hosts["firestore"]
    assert os.environ["STORAGE_EMULATOR_HOST"] == f"http://{emulators.hosts['storage']}"
    assert os.environ["CLOUD_TASKS_EMULATOR_HOST"] == emulators.hosts["tasks"]
    assert json.loads(os.environ["FIREBASE_CONFIG"])["storageBucket"] == emulators.bucket
    db.collection("harness").document("x").set({"n": 1})
    assert db.collection("harness").document("x").get().to_dict() == {"n": 1}
    bucket.blob("harness/x.txt").upload_from_string(b"hello")
    assert bucket.blob("harness/x.txt").download_as_bytes() == b"hello"


def test_data_is_wiped_between_tests(db, bucket):
    assert not db.collection("harness").document("x").get().exists
    assert list(bucket.list_blobs(prefix="harness/")) == []


class _Capture(BaseHTTPRequestHandler):
    bodies: list[Any] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("Content-Length", 0))
        _Capture.bodies.append(json.loads(self.rfile.read(length) or b"null"))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"result": null}')

    def log_message(self, *args: Any) -> None:
        pass


def test_standalone_tasks_emulator_dispatches_enqueued_tasks(emulators):
    from firebase_admin import functions

    from actorgen import clients

    server = HTTPServer(("127.0.0.1", 0), _Capture)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_port}/dispatchnow"
        emulators.create_task_queue("dispatchnow", uri)
        functions.task_queue("dispatchnow", app=clients.get_app()).enqueue({"data": {"x": 1}})
        deadline = time.monotonic() + 20
        while not _Capture.bodies and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _Capture.bodies == [{"data": {"x": 1}}]
    finally:
        server.shutdown()


# ------------------------------------------------------------------ a Functions emulator run
THROWAWAY_MAIN = '''
"""Throwaway functions for the harness test (never committed as functions/main.py)."""
import os

import firebase_admin
from firebase_admin import credentials, firestore
from firebase_functions import firestore_fn, https_fn, params, scheduler_fn
from google.auth.credentials import AnonymousCredentials

GREETING = params.StringParam("GREETING", default="hello")


class _Anonymous(credentials.Base):
    def get_credential(self):
        return AnonymousCredentials()


def _db():
    # A named app: firebase_functions itself makes the default app (with default
    # credentials, which do not exist offline) when a Firestore trigger runs.
    try:
        app = firebase_admin.get_app("harness")
    except ValueError:
        app = firebase_admin.initialize_app(_Anonymous(), name="harness")
    return firestore.client(app)


@https_fn.on_request()
def echo(req: https_fn.Request) -> https_fn.Response:
    return https_fn.Response(f"{GREETING.value}|{os.environ.get('PLAIN_VAR')}")


@scheduler_fn.on_schedule(schedule="every 5 minutes")
def tick(event: scheduler_fn.ScheduledEvent) -> None:
    _db().collection("harness").document("tick").set({"ran": True})


@firestore_fn.on_document_created(document="harness/{doc_id}")
def copy_doc(event: firestore_fn.Event[firestore_fn.DocumentSnapshot]) -> None:
    if event.params["doc_id"] != "tick":
        _db().collection("harness_copies").document(event.params["doc_id"]).set({"ok": True})
'''


@pytest.fixture(scope="module")
def throwaway_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project whose functions/main.py is :data:`THROWAWAY_MAIN`."""
    project = tmp_path_factory.mktemp("project")
    for name in ("firebase.json", "firestore.rules", "storage.rules", "firestore.indexes.json"):
        shutil.copy(REPO_ROOT / name, project / name)
    functions = project / "functions"
    functions.mkdir()
    shutil.copy(REPO_ROOT / "functions" / "requirements.txt", functions / "requirements.txt")
    (functions / "main.py").write_text(textwrap.dedent(THROWAWAY_MAIN))
    venv = REPO_ROOT / "functions" / "venv"
    if not venv.is_dir():
        pytest.fail("functions/venv is missing: run bin/setup")
    (functions / "venv").symlink_to(venv)
    return project


def _wait_for(check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.2)
    return check()


@pytest.mark.slow
def test_functions_emulator_runs_params_schedules_and_triggers(throwaway_project):
    extra_env = {"GREETING": "hi from extra_env", "PLAIN_VAR": "plain"}
    with start_emulators(
        only=("firestore", "storage", "functions", "tasks"),
        extra_env=extra_env,
        project_dir=throwaway_project,
    ) as suite:
        pids = {p.pid for p in suite.processes}
        assert set(suite.function_names()) == {"echo", "tick", "copy_doc"}
        # params come from the per-run dotenv, plain variables from the process env
        response = requests.get(suite.functions_url("echo"), timeout=30)
        assert response.text == "hi from extra_env|plain"
        # a scheduled function runs when POSTed to (its emulator key carries a generation)
        assert suite.functions_url("tick").endswith("/us-central1/tick-0")
        assert requests.post(suite.functions_url("tick"), json={}, timeout=60).ok
        db = suite.firestore_client()
        assert _wait_for(lambda: db.collection("harness").document("tick").get().exists)
        # a Firestore write fires the trigger
        db.collection("harness").document("d1").set({"n": 1})
        assert _wait_for(lambda: db.collection("harness_copies").document("d1").get().exists)
        log_path = suite.log_path
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert "Loaded environment variables" in log_path.read_text()
    assert not list(throwaway_project.glob(".firebase.emulators.*.json"))
    assert not (throwaway_project / "functions" / ".env.local").exists()


def test_two_suites_run_side_by_side(emulators: EmulatorSuite):
    with start_emulators(only=("firestore",)) as other:
        assert other.hosts["firestore"] != emulators.hosts["firestore"]
        other.firestore_client().collection("c").document("d").set({"where": "other"})
        mine = requests.get(
            f"{emulators.url('firestore')}/v1/projects/{emulators.project}"
            "/databases/(default)/documents/c/d",
            headers={"Authorization": "Bearer owner"},
            timeout=30,
        )
        assert mine.status_code == 404


@pytest.mark.slow
def test_functions_emulators_fixture_loads_functions_main(functions_emulators: EmulatorSuite):
    """functions/main.py loads in the Functions emulator; nothing leaks into os.environ."""
    assert functions_emulators.function_names()
    assert os.environ.get("FIRESTORE_EMULATOR_HOST") != functions_emulators.hosts["firestore"]
    for name in functions_emulators.function_names():
        assert f"/us-central1/{name}" in functions_emulators.functions_url(name)
