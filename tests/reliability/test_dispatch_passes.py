"""Dispatch passes that overlap, run out of time or lose their lease, forced step by step."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from actorgen import dispatch, schema
from actorgen.config import Settings
from actorgen.schema import DispatchPassField, Field, JobStatus

from tests.functions.jobdocs import put_queued_job, read

JOBS = schema.TRAINING_JOBS
SETTINGS = Settings(executor_kind="local", max_running_jobs=10, max_running_jobs_per_user=10)


def pass_lease(db: Any) -> dict[str, Any]:
    snap = db.collection(schema.SYSTEM).document(schema.DISPATCH_PASS_DOC).get()
    return snap.to_dict() or {}


def statuses(db: Any, job_ids: list[str]) -> list[str]:
    return [read(db, JOBS, j)[Field.STATUS] for j in job_ids]


def test_an_overlapping_pass_hands_its_work_to_the_running_one(
    db: Any, hooked: Any, proof: Any
) -> None:
    """Overlapping passes: the second pass finds the first holding the pass lease, asks
    it for another round and ends; the first dispatches the job queued meanwhile."""
    now = datetime.now(UTC)
    first = put_queued_job(db, "alice", queued_at=now - timedelta(minutes=1))
    rivals: list[dispatch.DispatchReport] = []
    late: list[str] = []

    def meanwhile(_: Any) -> None:
        # Intake queues another job and nudges a pass, while the first pass submits.
        late.append(put_queued_job(db, "bob", queued_at=now))
        rivals.append(dispatch.run_dispatch_pass(SETTINGS, db=db, executor=hooked, now=now))

    hooked.on("submit", meanwhile)
    report = dispatch.run_dispatch_pass(SETTINGS, db=db, executor=hooked, now=now)
    proof.case()
    assert rivals[0].skipped and rivals[0].submitted == [] and rivals[0].lost_claims == []
    assert report.submitted == [first, late[0]] and report.rounds == 2
    assert statuses(db, [first, late[0]]) == [JobStatus.DISPATCHED] * 2
    assert pass_lease(db)[DispatchPassField.OWNER] is None  # let go at the end
    proof.held("the overlapping pass ends at once with no lost claim; the running pass "
               "serves its request in a second round; the lease is let go")


def test_a_pass_stops_at_its_deadline_between_jobs(db: Any, hooked: Any, proof: Any) -> None:
    """Deadline: a pass stops claiming when its time is up, leaving no job lease; the
    next pass goes on."""
    now = datetime.now(UTC)
    job_ids = [put_queued_job(db, f"user{i}", queued_at=now - timedelta(minutes=5 - i))
               for i in range(3)]
    ticks = iter(range(1000))
    # The deadline falls after the first claim: timer() reads 0, 1, 2... and the
    # deadline is 0.5, so the check before the first claim passes and the next does not.
    report = dispatch.run_dispatch_pass(SETTINGS, db=db, executor=hooked, now=now,
                                        deadline=0.5, timer=lambda: next(ticks))
    proof.case()
    assert report.cut_off and report.submitted == [job_ids[0]]
    assert statuses(db, job_ids) == [JobStatus.DISPATCHED, JobStatus.QUEUED, JobStatus.QUEUED]
    assert pass_lease(db)[DispatchPassField.OWNER] is None
    nxt = dispatch.run_dispatch_pass(SETTINGS, db=db, executor=hooked, now=now)
    assert nxt.submitted == job_ids[1:] and not nxt.cut_off
    proof.held("a pass cut off by its deadline leaves no job in dispatching and the "
               "lease free; the next pass dispatches the rest")


def test_a_pass_that_lost_its_lease_claims_nothing_more(
    db: Any, hooked: Any, proof: Any
) -> None:
    """Lost lease: a pass stalled past its lease (another pass took over) has every
    further claim refused, so two passes never claim side by side."""
    now = datetime.now(UTC)
    job_ids = [put_queued_job(db, f"user{i}", queued_at=now - timedelta(minutes=5 - i))
               for i in range(3)]
    pass_ref = db.collection(schema.SYSTEM).document(schema.DISPATCH_PASS_DOC)

    def taken_over(_: Any) -> None:
        pass_ref.update({DispatchPassField.OWNER: "newer-pass",
                         DispatchPassField.EXPIRES_AT: now + timedelta(minutes=5)})

    hooked.on("submit", taken_over)
    report = dispatch.run_dispatch_pass(SETTINGS, db=db, executor=hooked, now=now)
    proof.case()
    assert report.cut_off and report.submitted == [job_ids[0]]
    assert statuses(db, job_ids) == [JobStatus.DISPATCHED, JobStatus.QUEUED, JobStatus.QUEUED]
    assert pass_lease(db)[DispatchPassField.OWNER] == "newer-pass"  # not released by us
    proof.held("after losing the pass lease a pass claims nothing and leaves the lease alone")


def test_a_dead_pass_lease_expires(db: Any, hooked: Any, proof: Any) -> None:
    """A pass that died holding the lease blocks the others only until it expires."""
    now = datetime.now(UTC)
    job_id = put_queued_job(db, "alice", queued_at=now - timedelta(minutes=1))
    pass_ref = db.collection(schema.SYSTEM).document(schema.DISPATCH_PASS_DOC)
    pass_ref.set({DispatchPassField.OWNER: "dead",
                  DispatchPassField.EXPIRES_AT: now + timedelta(seconds=30)})
    blocked = dispatch.run_dispatch_pass(SETTINGS, db=db, executor=hooked, now=now)
    later = now + timedelta(seconds=31)
    freed = dispatch.run_dispatch_pass(SETTINGS, db=db, executor=hooked, now=later,
                                       clock=lambda: later)
    proof.case(2)
    assert blocked.skipped and blocked.submitted == []
    assert freed.submitted == [job_id]
    proof.held("a dead pass's lease blocks dispatch for at most "
               f"{dispatch.PASS_LEASE_SECONDS} s")


def test_a_lease_left_by_a_pass_cut_off_mid_submission_is_redriven_promptly(
    db: Any, hooked: Any, proof: Any
) -> None:
    """A pass killed by the function's timeout in the middle of a submission: the next
    pass re-drives its job once the lease is ORPHAN_LEASE_SECONDS old, not only after
    the whole DISPATCH_LEASE_SECONDS; a younger lease of another pass is left alone."""
    from actorgen.executors import SubmitRequest

    settings = Settings(executor_kind="local", dispatch_lease_seconds=300)
    now = datetime.now(UTC)
    ages = {"old": dispatch.ORPHAN_LEASE_SECONDS + 10, "young": 30}
    job_ids = {}
    for name, age in ages.items():
        job_id = put_queued_job(db, f"user-{name}")
        granted = now - timedelta(seconds=age)
        db.collection(JOBS).document(job_id).update({
            Field.STATUS: JobStatus.DISPATCHING, Field.ATTEMPT: 1, Field.NEXT_ATTEMPT_AT: None,
            Field.LEASE_OWNER: "cut-off-pass",
            Field.LEASE_EXPIRES_AT: granted + timedelta(seconds=300),
        })
        hooked.inner.submit(SubmitRequest(job_id, 1, f"user-{name}"))  # created, not recorded
        job_ids[name] = job_id
    report = dispatch.run_dispatch_pass(settings, db=db, executor=hooked, now=now)
    proof.case(2)
    assert report.redriven == [job_ids["old"]]
    old, young = (read(db, JOBS, job_ids[k]) for k in ("old", "young"))
    assert (old[Field.STATUS], old[Field.ATTEMPT]) == (JobStatus.DISPATCHED, 1)
    assert young[Field.STATUS] == JobStatus.DISPATCHING
    assert hooked.inner.books()["creates"] == 2  # the re-drive found the executor job
    proof.held(f"a cut-off pass's job lease re-driven after {dispatch.ORPHAN_LEASE_SECONDS} s "
               "(not 300), same attempt, no second executor job; a younger one left alone")
