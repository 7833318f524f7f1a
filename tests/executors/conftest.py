"""Make ``actorgen`` (functions/) and ``tests.fakes`` (repo root) importable."""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
for path in (REPO_ROOT / "functions", REPO_ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
