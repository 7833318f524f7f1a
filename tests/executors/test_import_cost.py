"""Importing the executors (and building one) must not load the heavy Google clients."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FUNCTIONS_DIR = Path(__file__).resolve().parents[2] / "functions"

PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
import actorgen.executors as ex
ex.build_executor(ex.ExecutorSettings(kind="vertex", project="p", bucket="b",
                                      trainer_image_uri="r/i:t"))
ex.build_executor(ex.ExecutorSettings(kind="local"))
heavy = sorted(m for m in sys.modules
               if m.startswith(("google.cloud.aiplatform", "google.api_core", "grpc"))
               or m == "firebase_functions" or m.startswith("firebase_functions."))
print(",".join(heavy))
"""


def test_importing_executors_does_not_import_aiplatform() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(FUNCTIONS_DIR)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "", f"heavy modules imported: {out.stdout}"
