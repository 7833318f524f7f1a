"""Every pipeline write of a job's status goes through schema.status_fields, so the
job's statusHistory (the operator's timeline) misses no change."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RAW_STATUS_WRITE = re.compile(r"\b(?:Field|F)\.STATUS\s*:")

#: Raw writes that are not status changes of the pipeline, each with why.
ALLOWED = {
    # The admin trigger puts back what a hand edit changed: the edit was never recorded.
    ("functions/actorgen/admin.py", "{Field.STATUS: previous_status, Field.UPDATED_AT: now}"),
    ("functions/actorgen/admin.py", "{Field.STATUS: JobStatus.FAILED, Field.UPDATED_AT: now}"),
    # The command line makes the console's edit; the trigger records the re-dispatch.
    ("functions/actorgen/cli/store.py", "{Field.STATUS: JobStatus.QUEUED}"),
}


def raw_status_writes() -> list[tuple[str, str]]:
    found = []
    for root in ("functions/actorgen", "trainer_image/lora_trainer"):
        for path in sorted((REPO_ROOT / root).rglob("*.py")):
            rel = path.relative_to(REPO_ROOT).as_posix()
            if rel == "functions/actorgen/schema.py":
                continue  # status_fields itself
            for line in path.read_text(encoding="utf-8").splitlines():
                if RAW_STATUS_WRITE.search(line):
                    found.append((rel, line.strip()))
    return found


def test_status_is_written_through_status_fields_only() -> None:
    unexpected = [
        (rel, line) for rel, line in raw_status_writes()
        if not any(rel == a_rel and snippet in line for a_rel, snippet in ALLOWED)
    ]
    assert unexpected == [], (
        "write status with **schema.status_fields(job, new_status, at) so statusHistory "
        f"records the change: {unexpected}"
    )
