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
import hashlib
import json
import multiprocessing
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT / "functions") not in sys.path:  # run as a module, outside pytest
    sys.path.insert(0, str(REPO_ROOT / "functions"))

from actorgen import schema  # noqa: E402
from actorgen.config import Settings  # noqa: E402
from actorgen.executors import ExecutorState  # noqa: E402
from actorgen.schema import Field, JobStatus  # noqa: E402

from tests.functions.jobdocs import queued_job_data  # noqa: E402
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
        batch.set(db.collection(schema.TRAINING_JOBS).document(job_id),
                  queued_job_data(user, f"{prefix}-actor-{i:04d}", when))
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


# ------------------------------------------------------------------ the whole burst
@dataclass(frozen=True)
class BurstProfile:
    """How big a burst is: ``ci`` fits .ci/run; ``heavy`` (ACTORGEN_PROOF_PROFILE=heavy)."""

    name: str
    jobs: int
    users: int
    dispatchers: int
    reconcilers: int
    max_running_jobs: int
    max_running_jobs_per_user: int
    #: Share of attempts whose executor job fails (the rest complete).
    failure_share: float
    time_limit: float
    #: SIGKILL one dispatcher process once a third of the jobs ended, and start another:
    #: its leases (job and pass) must expire and be re-driven. A pass lease left by the
    #: killed pass holds the others off for up to dispatch.PASS_LEASE_SECONDS.
    kill_a_dispatcher: bool = False


PROFILES = {
    "ci": BurstProfile("ci", jobs=60, users=20, dispatchers=3, reconcilers=2,
                       max_running_jobs=12, max_running_jobs_per_user=1, failure_share=0.3,
                       time_limit=150.0),
    "heavy": BurstProfile("heavy", jobs=300, users=60, dispatchers=6, reconcilers=3,
                          max_running_jobs=40, max_running_jobs_per_user=2,
                          failure_share=0.3, time_limit=540.0, kill_a_dispatcher=True),
}


def burst_settings(profile: BurstProfile) -> Settings:
    return Settings(
        executor_kind="local",
        max_running_jobs=profile.max_running_jobs,
        max_running_jobs_per_user=profile.max_running_jobs_per_user,
        max_attempts=3,
        backoff_base_seconds=1,
        backoff_max_seconds=2,
        dispatch_lease_seconds=5,  # a killed pass's job lease is re-driven within the run
    )


def _loop(kind: str, root: str, settings: Settings, stop: Any, results: Any) -> None:
    """A dispatcher or a reconciler process: passes back to back until told to stop."""
    from actorgen import clients, dispatch, reconcile

    db = clients.firestore_client()
    executor = FolderExecutor(root)
    passes: list[dict[str, Any]] = []
    while not stop.is_set():
        started = time.monotonic()
        if kind == "dispatch":
            report = dispatch.run_dispatch_pass(settings, db=db, executor=executor)
            passes.append({"seconds": time.monotonic() - started,
                           "submitted": len(report.submitted), "skipped": report.skipped,
                           "lost_claims": len(report.lost_claims),
                           "errors": len(report.errors), "cut_off": report.cut_off})
        else:
            report = reconcile.run_reconcile_pass(settings, db=db, executor=executor,
                                                  now=datetime.now(UTC))
            passes.append({"seconds": time.monotonic() - started,
                           "reconciled": len(report.reconciled), "errors": len(report.errors)})
        stop.wait(0.05)
    results.put({"kind": kind, "passes": passes})


def _outcome(job_id: str, attempt: int, share: float) -> str:
    """Whether this attempt fails (stable: the same burst fails the same attempts)."""
    digest = hashlib.sha256(f"{job_id}/{attempt}".encode()).digest()
    return "fail" if digest[0] / 256 < share else "complete"


def _complete(db: Any, job_id: str, name: str) -> bool:
    """What the trainer does at the end: ``completed`` in a transaction, if still its job."""
    from actorgen.txn import run_in_transaction

    ref = db.collection(schema.TRAINING_JOBS).document(job_id)

    def write(transaction: Any) -> bool:
        job = ref.get(transaction=transaction).to_dict() or {}
        if job.get(Field.EXECUTOR_JOB_NAME) != name or not schema.can_transition(
            job.get(Field.STATUS), JobStatus.COMPLETED
        ):
            return False
        now = datetime.now(UTC)
        transaction.update(ref, {**schema.status_fields(job, JobStatus.COMPLETED, now),
                                 Field.FINISHED_AT: now, Field.PROGRESS: 100,
                                 Field.TRAINED_MODEL_ID: job_id})
        return True

    return run_in_transaction(db, write)


def run_burst(db: Any, root: Path, profile: BurstProfile) -> dict[str, Any]:
    """Seed the burst, run dispatchers and reconcilers in processes and the trainers'
    endings here, until every job has ended (or the time limit); check and measure."""
    settings = burst_settings(profile)
    ids = seed_queued_jobs(db, profile.jobs, profile.users, prefix=f"b{profile.name}")
    executor = FolderExecutor(root)
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    results = context.Queue()
    procs = [context.Process(target=_loop, args=("dispatch", str(root), settings, stop, results))
             for _ in range(profile.dispatchers)]
    procs += [context.Process(target=_loop, args=("reconcile", str(root), settings, stop,
                                                  results))
              for _ in range(profile.reconcilers)]
    started = time.monotonic()
    for proc in procs:
        proc.start()
    endings = Counter()
    final = set(schema.FINAL_JOB_STATUSES) | {JobStatus.FAILED}
    finished_at = None
    killed = 0
    try:
        while time.monotonic() - started < profile.time_limit:
            for ex in executor.active():
                job = db.collection(schema.TRAINING_JOBS).document(ex["job_id"]).get()
                data = job.to_dict() or {}
                if data.get(Field.EXECUTOR_JOB_NAME) != ex["name"]:
                    continue  # not recorded yet: the trainer starts once it is
                if _outcome(ex["job_id"], ex["attempt"], profile.failure_share) == "fail":
                    executor.set_state(ex["name"], ExecutorState.FAILED)
                    endings["failed attempts"] += 1
                else:
                    executor.mark_completing(ex["name"])
                    if _complete(db, ex["job_id"], ex["name"]):
                        endings["completed"] += 1
                    executor.set_state(ex["name"], ExecutorState.SUCCEEDED)
            statuses = Counter(
                (s.to_dict() or {}).get(Field.STATUS)
                for s in db.collection(schema.TRAINING_JOBS).select([Field.STATUS]).stream()
            )
            ended = sum(statuses[s] for s in final)
            if ended >= len(ids) and not executor.active():
                finished_at = time.monotonic()
                break
            if profile.kill_a_dispatcher and not killed and ended >= len(ids) // 3:
                procs[0].kill()  # wherever it is: mid-claim, mid-submit, holding the lease
                procs[0].join(10)
                killed = 1
                replacement = context.Process(
                    target=_loop, args=("dispatch", str(root), settings, stop, results))
                replacement.start()
                procs[0] = replacement
            time.sleep(0.2)
    finally:
        stop.set()
        reports: list[dict[str, Any]] = []
        deadline = time.monotonic() + 120
        while len(reports) < len(procs) and time.monotonic() < deadline:
            try:
                reports.append(results.get(timeout=1.0))
            except Exception:  # queue.Empty
                continue
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
    figures = _burst_figures(db, executor, ids, settings, profile, reports, started,
                             finished_at)
    figures["dispatchers_killed"] = killed
    return figures


def _burst_figures(
    db: Any, executor: FolderExecutor, ids: list[str], settings: Settings,
    profile: BurstProfile, reports: list[dict[str, Any]], started: float,
    finished_at: float | None,
) -> dict[str, Any]:
    docs = {i: db.collection(schema.TRAINING_JOBS).document(i).get().to_dict() or {}
            for i in ids}
    statuses = Counter(d.get(Field.STATUS) for d in docs.values())
    attempts_by_job: dict[str, list[int]] = {}
    for ex in executor.jobs():
        attempts_by_job.setdefault(ex["job_id"], []).append(ex["attempt"])
    # Exactly once: the executor jobs of each job are its attempts 1..attempt, one each.
    not_exactly_once = [
        i for i, d in docs.items()
        if sorted(attempts_by_job.get(i, [])) != list(range(1, int(d.get(Field.ATTEMPT) or 0) + 1))
    ]
    now = datetime.now(UTC)
    expired = [i for i, d in docs.items() if d.get(Field.STATUS) == JobStatus.DISPATCHING
               and (d.get(Field.LEASE_EXPIRES_AT) is None or d[Field.LEASE_EXPIRES_AT] <= now)]
    dispatch_passes = [p for r in reports if r["kind"] == "dispatch" for p in r["passes"]]
    working = sorted(p["seconds"] for p in dispatch_passes if not p["skipped"])
    books = executor.books()
    elapsed = (finished_at or time.monotonic()) - started
    return {
        "profile": profile.name,
        "jobs": len(ids),
        "users": profile.users,
        "dispatch_processes": profile.dispatchers,
        "reconcile_processes": profile.reconcilers,
        "caps": [settings.max_running_jobs, settings.max_running_jobs_per_user],
        "all_ended": finished_at is not None,
        "seconds": round(elapsed, 1),
        "statuses": dict(statuses),
        "attempts": books["creates"],
        "submit_calls": books["submits"],
        "jobs_per_second": round(len(ids) / elapsed, 2),
        "not_exactly_once": not_exactly_once,
        "failed_with_attempts_left": [
            i for i, d in docs.items() if d.get(Field.STATUS) == JobStatus.FAILED
            and int(d.get(Field.ATTEMPT) or 0) < settings.max_attempts],
        "peak_active": books["peak_active"],
        "peak_active_per_user": books["peak_active_per_user"],
        "peak_active_per_job": books["peak_active_per_job"],
        "executor_jobs_left_active": len(executor.active()),
        "leases_left_expired": len(expired),
        "left_dispatching": statuses.get(JobStatus.DISPATCHING, 0),
        "dispatch_passes": len(dispatch_passes),
        "dispatch_passes_skipped": sum(1 for p in dispatch_passes if p["skipped"]),
        "dispatch_passes_cut_off": sum(1 for p in dispatch_passes if p["cut_off"]),
        "lost_claims": sum(p["lost_claims"] for p in dispatch_passes),
        "dispatch_errors": sum(p["errors"] for p in dispatch_passes),
        "reconcile_passes": sum(len(r["passes"]) for r in reports if r["kind"] == "reconcile"),
        "reconcile_errors": sum(p["errors"] for r in reports if r["kind"] == "reconcile"
                                for p in r["passes"]),
        "median_working_pass_seconds": round(working[len(working) // 2], 2) if working else None,
        "longest_working_pass_seconds": round(working[-1], 2) if working else None,
    }


def compare_passes(jobs: int, passes: list[int]) -> list[dict[str, Any]]:
    """:func:`overlapping_passes` for each count of passes, on its own Firestore emulator,
    each on a fresh queue of ``jobs`` jobs."""
    import os

    from tools.emulators import start_emulators

    figures = []
    with start_emulators(only=("firestore",)) as suite:
        os.environ.update(suite.env)
        from actorgen import clients

        db = clients.firestore_client()
        for count in passes:
            suite.clear_firestore()
            with tempfile.TemporaryDirectory() as root:
                figures.append(overlapping_passes(db, Path(root), jobs=jobs, passes=count))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=90)
    parser.add_argument("--passes", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    for result in compare_passes(args.jobs, args.passes):
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
