"""The burst: hundreds of jobs (``ACTORGEN_PROOF_PROFILE=heavy``; fewer in .ci/run)
from many users, several dispatch and reconcile processes at once, real code, the
real Firestore emulator, one folder executor shared by all processes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from actorgen.schema import JobStatus

from tests.reliability.burst import PROFILES, overlapping_passes, run_burst

PROFILE = PROFILES[os.environ.get("ACTORGEN_PROOF_PROFILE", "ci")]


@pytest.mark.slow
def test_a_burst_keeps_every_guarantee(db: Any, tmp_path: Path, proof: Any) -> None:
    """Burst: every attempt submitted exactly once, caps never exceeded, never two live
    executor jobs for one training job, every job ended, no lease left behind."""
    figures = run_burst(db, tmp_path / "executor", PROFILE)
    proof.case(figures["jobs"])
    proof.figures(**figures)
    assert figures["all_ended"], figures
    assert figures["not_exactly_once"] == []
    proof.held(f"{figures['attempts']} attempts of {figures['jobs']} jobs: each submitted "
               "to the executor exactly once (attempts 1..n, one executor job each)")
    assert figures["peak_active"] <= PROFILE.max_running_jobs
    assert figures["peak_active_per_user"] <= PROFILE.max_running_jobs_per_user
    proof.held("caps never exceeded (counted at every executor create)")
    assert figures["peak_active_per_job"] <= 1
    proof.held("never two live executor jobs for one training job")
    assert figures["executor_jobs_left_active"] == 0
    assert figures["leases_left_expired"] == 0 and figures["left_dispatching"] == 0
    proof.held("no executor job left running, no job left dispatching, no lease left expired")
    assert figures["dispatch_errors"] == 0 and figures["reconcile_errors"] == 0
    assert set(figures["statuses"]) <= {JobStatus.COMPLETED, JobStatus.FAILED}
    assert figures["failed_with_attempts_left"] == []
    proof.held("every job ended completed, or failed after its 3 attempts")


@pytest.mark.slow
def test_overlapping_dispatch_passes_cooperate(
    db: Any, emulators: Any, tmp_path: Path, proof: Any
) -> None:
    """One pass alone, then several at once on the same queue: no lost claims, every
    job dispatched, no lease left; the pass times are reported."""
    jobs = 90 if PROFILE.name == "heavy" else 45
    runs = []
    for passes in (1, 3):
        emulators.clear_firestore()  # the same queue each time, and free slots
        figures = overlapping_passes(db, tmp_path / f"executor-{passes}", jobs=jobs,
                                     passes=passes, prefix=f"p{passes}")
        runs.append(figures)
        proof.case()
        assert figures["finished_passes"] == passes, figures
        assert figures["dispatched"] == jobs and figures["executor_creates"] == jobs, figures
        assert figures["lost_claims"] == 0
        assert figures["leases_left_expired"] == 0 and figures["left_dispatching"] == 0
    proof.figures(one_pass=runs[0], three_passes=runs[1])
    proof.held(f"{jobs} jobs by 1 pass and by 3 overlapping passes: all dispatched once, "
               "0 lost claims, no lease left")
