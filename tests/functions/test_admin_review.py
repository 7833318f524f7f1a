"""review_update(): only failed -> queued by hand is a re-dispatch; other edits are not."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from actorgen import admin, jobs
from actorgen.admin import AdminAction
from actorgen.config import Settings
from actorgen.dispatch import Candidate, is_due
from actorgen.schema import AttemptField, AttemptOutcome, Field, JobStatus

NOW = datetime(2025, 1, 1, tzinfo=UTC)


def doc(status: str | None, **kw: object) -> dict[str, object]:
    return {Field.STATUS: status, **kw}


def test_failed_to_queued_by_hand_is_a_redispatch() -> None:
    before = doc(JobStatus.FAILED, **{Field.ERROR: "boom", Field.ATTEMPT: 3})
    after = doc(JobStatus.QUEUED, **{Field.ERROR: "boom", Field.ATTEMPT: 3})
    assert admin.review_update(before, after) == AdminAction.REDISPATCH


def test_failed_to_queued_is_a_redispatch_even_with_a_leftover_next_attempt_at() -> None:
    leftover = {Field.NEXT_ATTEMPT_AT: NOW, Field.ATTEMPT: 3, Field.MAX_ATTEMPTS: 3}
    before = doc(JobStatus.FAILED, **leftover)
    after = doc(JobStatus.QUEUED, **leftover)
    assert admin.review_update(before, after) == AdminAction.REDISPATCH
    # The fresh budget is what makes it due again (3 of 3 attempts were used).
    assert not is_due(Candidate.from_doc("j", {**after, Field.USER_ID: "u"}), NOW)
    update = admin.redispatch_update(after, Settings(max_attempts=3), NOW)
    assert is_due(Candidate.from_doc("j", {**after, **update, Field.USER_ID: "u"}), NOW)


@pytest.mark.parametrize(
    "previous", [JobStatus.COMPLETED, JobStatus.REJECTED, JobStatus.CANCELLED, JobStatus.TRAINING]
)
def test_other_hand_made_changes_to_queued_are_reverted(previous: str) -> None:
    assert admin.review_update(doc(previous), doc(JobStatus.QUEUED)) == AdminAction.REVERT


@pytest.mark.parametrize(
    ("before", "after"),
    [
        # The pipeline's own moves into queued always release the job (nextAttemptAt).
        (doc(JobStatus.PENDING), doc(JobStatus.QUEUED, **{Field.NEXT_ATTEMPT_AT: NOW})),
        (doc(JobStatus.TRAINING), doc(JobStatus.QUEUED, **{Field.NEXT_ATTEMPT_AT: NOW})),
        (doc(JobStatus.DISPATCHING), doc(JobStatus.QUEUED, **{Field.NEXT_ATTEMPT_AT: NOW})),
        # Progress and heartbeats.
        (doc(JobStatus.TRAINING, progress=1), doc(JobStatus.TRAINING, progress=2)),
        # The re-dispatch's own write, and the revert's own write: no loop.
        (doc(JobStatus.QUEUED), doc(JobStatus.QUEUED, **{Field.NEXT_ATTEMPT_AT: NOW})),
        (doc(JobStatus.QUEUED), doc(JobStatus.COMPLETED)),
        # Other hand edits are simply ignored.
        (doc(JobStatus.FAILED), doc(JobStatus.COMPLETED)),
        (doc(JobStatus.FAILED), doc(JobStatus.FAILED, **{Field.ERROR: None})),
        (None, doc(JobStatus.QUEUED)),
    ],
)
def test_everything_else_is_ignored(before: dict | None, after: dict) -> None:
    assert admin.review_update(before, after) == AdminAction.IGNORE


def test_cancel_request_on_a_live_job() -> None:
    before = doc(JobStatus.TRAINING)
    after = doc(JobStatus.TRAINING, **{Field.CANCEL_REQUESTED: True})
    assert admin.review_update(before, after) == AdminAction.CANCEL
    # Already final: nothing to cancel.
    assert admin.review_update(doc(JobStatus.COMPLETED),
                               doc(JobStatus.COMPLETED, **{Field.CANCEL_REQUESTED: True})) == (
        AdminAction.IGNORE
    )
    # Requested earlier: this update is about something else.
    assert admin.review_update(after, {**after, "progress": 5}) == AdminAction.IGNORE


def test_redispatch_gives_a_fresh_attempt_budget_and_keeps_history() -> None:
    failed = doc(
        JobStatus.QUEUED,
        **{Field.ATTEMPT: 3, Field.MAX_ATTEMPTS: 3, Field.ERROR: "boom", Field.USER_ID: "u",
           Field.ATTEMPT_HISTORY: [{AttemptField.ATTEMPT: 3, AttemptField.OUTCOME: "x"}]},
    )
    update = admin.redispatch_update(failed, Settings(max_attempts=3), NOW)
    assert update[Field.MAX_ATTEMPTS] == 6
    assert update[Field.ERROR] is None
    assert update[Field.NEXT_ATTEMPT_AT] == NOW
    assert Field.ATTEMPT not in update  # attempt numbers (executor labels) never repeat
    history = update[Field.ATTEMPT_HISTORY]
    assert len(history) == 2 and history[-1][AttemptField.OUTCOME] == (
        AttemptOutcome.ADMIN_REDISPATCH
    )
    # ...and that makes it due for the dispatcher.
    assert is_due(Candidate.from_doc("j", {**failed, **update}), NOW)
    assert not is_due(Candidate.from_doc("j", failed), NOW)


def test_actor_follows_only_its_latest_job() -> None:
    actor = {Field.USER_ID: "u", Field.LATEST_JOB_ID: "new-job"}
    assert jobs.actor_update_for(actor, {Field.USER_ID: "u"}, "old-job", JobStatus.FAILED,
                                 "x") is None
    assert jobs.actor_update_for({**actor, Field.USER_ID: "other"}, {Field.USER_ID: "u"},
                                 "new-job", JobStatus.FAILED, "x") is None
    update = jobs.actor_update_for(actor, {Field.USER_ID: "u"}, "new-job", JobStatus.FAILED, "x")
    assert update == {Field.MODEL_STATUS: "failed", Field.MODEL_ERROR: "x"}
