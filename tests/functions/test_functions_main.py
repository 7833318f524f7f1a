"""main.py as ``firebase deploy`` sees it: the manifest, read in a fresh interpreter.

The CLI imports main.py once to read the manifest; a second import in one process
would re-declare the params. So this runs the SDK's own discovery in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from actorgen import tasks

FUNCTIONS_DIR = Path(__file__).resolve().parents[2] / "functions"
HEAVY = ("PIL", "cv2", "dlib", "numpy", "imagehash", "pillow_heif", "google.cloud.aiplatform")

_DISCOVER = f"""
import json, sys
from firebase_functions.private import manifest, serving
fns = serving.get_functions()
stack = manifest.ManifestStack(
    endpoints={{n: f.__firebase_endpoint__ for n, f in fns.items()}},
    params=list(serving._params._params.values()),
)
spec = serving.to_spec(manifest.manifest_to_spec_dict(stack))
heavy = sorted(m for m in sys.modules if m in {HEAVY!r})
print(json.dumps({{"spec": spec, "heavy": heavy}}, default=str))
"""


@pytest.fixture(scope="module")
def discovered() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FIREBASE_CONFIG",)}
    env.pop("PYTHONPATH", None)
    out = subprocess.run(
        [sys.executable, "-c", _DISCOVER], cwd=FUNCTIONS_DIR, env=env,
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_declares_the_six_functions(discovered: dict) -> None:
    assert sorted(discovered["spec"]["endpoints"]) == [
        "dispatch_jobs", "dispatchnow", "forget_deleted_upload", "intake_job", "on_job_updated",
        "validate_upload",
    ]


def test_task_queue_function_is_the_one_intake_enqueues_to(discovered: dict) -> None:
    endpoint = discovered["spec"]["endpoints"][tasks.DISPATCH_TASK_FUNCTION]
    assert "taskQueueTrigger" in endpoint
    assert tasks.DISPATCH_TASK_FUNCTION.replace("-", "").isalnum()  # a valid queue id
    assert tasks.task_payload("j1") == {"data": {"jobId": "j1"}}


def test_triggers_and_options(discovered: dict) -> None:
    eps = discovered["spec"]["endpoints"]
    upload = eps["validate_upload"]
    # Discovery works without FIREBASE_CONFIG: the bucket is the built-in param.
    assert upload["eventTrigger"]["eventFilters"]["bucket"] == "{{ params.STORAGE_BUCKET }}"
    assert upload["availableMemoryMb"] == 1024
    assert eps["intake_job"]["eventTrigger"]["eventFilterPathPatterns"]["document"] == (
        "training_jobs/{jobId}"
    )
    assert eps["on_job_updated"]["eventTrigger"]["eventType"].endswith("document.v1.updated")
    assert eps["dispatch_jobs"]["scheduleTrigger"]["schedule"] == "every 1 minutes"
    for ep in eps.values():
        assert ep["region"] == ["us-central1"] and ep["timeoutSeconds"]


def test_every_param_has_a_default_and_a_description(discovered: dict) -> None:
    params = discovered["spec"]["params"]
    assert len(params) >= 20
    for param in params:
        assert "default" in param and param.get("description"), param["name"]


def test_import_stays_light(discovered: dict) -> None:
    assert discovered["heavy"] == []


def test_every_function_runs_as_the_service_account_param(discovered: dict) -> None:
    # Never the default compute account: firebase deploy resolves the param (and expands
    # the "name@" short form to name@PROJECT.iam.gserviceaccount.com).
    for name, endpoint in discovered["spec"]["endpoints"].items():
        assert endpoint["serviceAccountEmail"] == "{{ params.FUNCTIONS_SERVICE_ACCOUNT }}", name
    [param] = [p for p in discovered["spec"]["params"] if p["name"] == "FUNCTIONS_SERVICE_ACCOUNT"]
    assert param["default"].endswith("@")
