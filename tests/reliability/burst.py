"""Overlapping dispatch passes against the Firestore emulator: the burst figures.

``overlapping_passes`` seeds queued jobs from many users, starts N dispatch passes
in N separate processes at the same moment (a barrier), each with the real
``dispatch.run_dispatch_pass`` and one :class:`FolderExecutor` shared through a
folder, and reports what each pass did and how long it took.

Command line (starts its own Firestore emulator; figures as JSON on stdout)::

    .venv/bin/python -m tests.reliability.burst --jobs 90 --passes 1 2 6
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT / "functions") not in sys.path:  # run as a module, outside pytest
    sys.path.insert(0, str(REPO_ROOT / "functions"))

from actorgen import schema  # noqa: E402
from actorgen.config import Settings  # noqa: E402
from actorgen.schema import Field, JobStatus  # noqa: E402

from tests.reliability.folder_executor import FolderExecutor  # noqa: E402

#: Longest one proof waits for its passes (a stalled pass is a finding, not a hang).
PASS_WAIT_SECONDS = 240.0


def seed_queued_jobs(db: Any, count: int, users: int, *, prefix: str = "burst") -> list[str]:
    """``count`` queued, due jobs of ``users`` users (one actor each), oldest first."""
    now = datetime.now(UTC)
    ids: list[str] = []
    batch = db.batch()
    for i in range(count):
        job_id = f"{prefix}-{i:04d}"
        user = f"{prefix}-user-{i % users:03d}"
        when = now - timedelta(seconds=count - i)
        batch.set(db.collection(schema.TRAINING_JOBS).document(job_id), {
            Field.USER_ID: user,
            Field.ACTOR_ID: f"{prefix}-actor-{i:04d}",
            Field.INSTANCE_NAME: "sks_person",
            Field.BASE_MODEL_ID: "stable-diffusion-v1-5/stable-diffusion-v1-5",
            Field.STATUS: JobStatus.QUEUED,
            Field.QUEUED_AT: when,
            Field.NEXT_ATTEMPT_AT: when,
            Field.ATTEMPT: 0,
            Field.MAX_ATTEMPTS: 3,
            Field.ATTEMPT_HISTORY: [],
            Field.PRIORITY: 0,
        })
        ids.append(job_id)
        if len(ids) % 400 == 0:
            batch.commit()
            batch = db.batch()
    batch.commit()
    return ids


def _one_pass(root: str, settings: Settings, barrier: Any, results: Any, index: int) -> None:
    """A dispatch pass in its own process (spawned: its own Firestore client)."""
    from actorgen import clients, dispatch

    db = clients.firestore_client()
    executor = FolderExecutor(root)
    barrier.wait()
    started = time.monotonic()
    report = dispatch.run_dispatch_pass(settings, db=db, executor=executor)
    results.put({
        "pass": index,
        "seconds": round(time.monotonic() - started, 2),
        "submitted": len(report.submitted),
        "redriven": len(report.redriven),
        "lost_claims": len(report.lost_claims),
        "errors": len(report.errors),
        "skipped": bool(getattr(report, "skipped", False)),
    })


def overlapping_passes(
    db: Any, root: Path, *, jobs: int, passes: int, users: int | None = None,
    settings: Settings | None = None, prefix: str = "burst",
) -> dict[str, Any]:
    """Seed ``jobs`` queued jobs, run ``passes`` dispatch passes at once; the figures."""
    users = users or max(1, jobs // 3)
    settings = settings or Settings(
        executor_kind="local", max_running_jobs=jobs, max_running_jobs_per_user=jobs
    )
    ids = seed_queued_jobs(db, jobs, users, prefix=prefix)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(passes)
    results = context.Queue()
    procs = [
        context.Process(target=_one_pass, args=(str(root), settings, barrier, results, i))
        for i in range(passes)
    ]
    for proc in procs:
        proc.start()
    reports: list[dict[str, Any]] = []
    deadline = time.monotonic() + PASS_WAIT_SECONDS
    while len(reports) < passes and time.monotonic() < deadline:
        try:
            reports.append(results.get(timeout=1.0))
        except Exception:  # queue.Empty: keep waiting until the deadline
            continue
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
        proc.join(5)
    statuses = Counter()
    expired = 0
    now = datetime.now(UTC)
    for job_id in ids:
        job = db.collection(schema.TRAINING_JOBS).document(job_id).get().to_dict() or {}
        statuses[job.get(Field.STATUS)] += 1
        lease = job.get(Field.LEASE_EXPIRES_AT)
        if job.get(Field.STATUS) == JobStatus.DISPATCHING and (lease is None or lease <= now):
            expired += 1
    books = FolderExecutor(root).books()
    dispatched = statuses.get(JobStatus.DISPATCHED, 0)
    working = [r["seconds"] for r in reports if not r["skipped"]] or [0.0]
    longest = max(r["seconds"] for r in reports) if reports else PASS_WAIT_SECONDS
    return {
        "jobs": jobs,
        "passes": passes,
        "finished_passes": len(reports),
        "pass_seconds": sorted(r["seconds"] for r in reports),
        "longest_pass_seconds": longest,
        "dispatched": dispatched,
        "jobs_per_second": round(dispatched / longest, 2) if longest else None,
        "lost_claims": sum(r["lost_claims"] for r in reports),
        "skipped_passes": sum(1 for r in reports if r["skipped"]),
        "errors": sum(r["errors"] for r in reports),
        "left_dispatching": statuses.get(JobStatus.DISPATCHING, 0),
        "leases_left_expired": expired,
        "executor_creates": books["creates"],
        "peak_active_per_job": books["peak_active_per_job"],
        "median_working_pass_seconds": sorted(working)[len(working) // 2],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=90)
    parser.add_argument("--passes", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    import os

    from tools.emulators import start_emulators

    figures = []
    with start_emulators(only=("firestore",)) as suite:
        os.environ.update(suite.env)
        from actorgen import clients

        db = clients.firestore_client()
        for passes in args.passes:
            suite.clear_firestore()
            with tempfile.TemporaryDirectory() as root:
                result = overlapping_passes(db, Path(root), jobs=args.jobs, passes=passes)
            print(json.dumps(result), flush=True)
            figures.append(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
