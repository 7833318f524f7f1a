"""plan_dispatch(): order, caps and backoff, without I/O."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from actorgen import dispatch, jobs, reconcile, schema
from actorgen.config import Settings
from actorgen.dispatch import Candidate, is_due, plan_dispatch

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
SETTINGS = Settings(max_running_jobs=3, max_running_jobs_per_user=1)


def cand(job_id: str, user: str, minutes_ago: int, priority: int = 0, **kw: object) -> Candidate:
    queued = NOW - timedelta(minutes=minutes_ago)
    fields: dict[str, object] = {
        "queued_at": queued, "next_attempt_at": queued, "max_attempts": 3, "priority": priority,
    }
    fields.update(kw)
    return Candidate(job_id, user, **fields)  # type: ignore[arg-type]


def ids(chosen: list[Candidate]) -> list[str]:
    return [c.job_id for c in chosen]


def test_fifo_within_a_priority_and_priority_first() -> None:
    queued = [
        cand("old", "u1", 30),
        cand("new", "u2", 5),
        cand("urgent", "u3", 1, priority=5),
    ]
    assert ids(plan_dispatch(queued, {}, SETTINGS, NOW)) == ["urgent", "old", "new"]


def test_global_cap_counts_running_jobs() -> None:
    queued = [cand(f"j{i}", f"u{i}", 10 - i) for i in range(5)]
    assert ids(plan_dispatch(queued, {"x": 1, "y": 1}, SETTINGS, NOW)) == ["j0"]
    assert plan_dispatch(queued, {"x": 1, "y": 1, "z": 1}, SETTINGS, NOW) == []


def test_per_user_cap_skips_to_other_users() -> None:
    queued = [cand("a1", "alice", 10), cand("a2", "alice", 9), cand("b1", "bob", 8)]
    assert ids(plan_dispatch(queued, {}, SETTINGS, NOW)) == ["a1", "b1"]
    assert ids(plan_dispatch(queued, {"alice": 1}, SETTINGS, NOW)) == ["b1"]
    two_each = Settings(max_running_jobs=10, max_running_jobs_per_user=2)
    assert ids(plan_dispatch(queued, {}, two_each, NOW)) == ["a1", "a2", "b1"]


def test_backoff_holds_a_job_until_next_attempt_at() -> None:
    later = NOW + timedelta(seconds=30)
    queued = [cand("waiting", "u1", 60, next_attempt_at=later), cand("ready", "u2", 1)]
    assert ids(plan_dispatch(queued, {}, SETTINGS, NOW)) == ["ready"]
    assert ids(plan_dispatch(queued, {}, SETTINGS, later)) == ["waiting", "ready"]


def test_unreleased_exhausted_or_cancelled_jobs_are_not_due() -> None:
    assert not is_due(cand("hand-edited", "u", 1, next_attempt_at=None), NOW)
    assert not is_due(cand("spent", "u", 1, attempt=3, max_attempts=3), NOW)
    assert not is_due(cand("cancel", "u", 1, cancel_requested=True), NOW)
    assert not is_due(cand("ownerless", "", 1), NOW)
    assert is_due(cand("fine", "u", 1, attempt=2, max_attempts=3), NOW)


def test_candidate_from_document() -> None:
    c = Candidate.from_doc(
        "j", {"userId": "u", "priority": 2, "queuedAt": NOW, "nextAttemptAt": NOW,
              "attempt": 1, "maxAttempts": 3}
    )
    assert (c.user_id, c.priority, c.attempt, c.max_attempts) == ("u", 2, 1, 3)
    assert is_due(c, NOW)


def test_backoff_doubles_and_is_capped() -> None:
    s = Settings(backoff_base_seconds=60, backoff_max_seconds=600)
    assert [jobs.backoff_seconds(n, s) for n in (1, 2, 3, 4, 5, 100)] == [
        60, 120, 240, 480, 600, 600
    ]


# --------------------------------------------------------------------------- indexes
def required_index(query: Any) -> list[tuple[str, str]]:
    """The composite index a query needs: its equality fields, then its effective order
    (the explicit order, then any inequality field not in it, in the last direction)."""
    from google.cloud.firestore_v1.types import StructuredQuery

    pb = query._to_protobuf()
    op = StructuredQuery.FieldFilter.Operator
    filters = [f.field_filter for f in pb.where.composite_filter.filters] or [
        pb.where.field_filter
    ]
    equal = sorted(f.field.field_path for f in filters if f.op in (op.EQUAL, op.IN))
    ranged = sorted({f.field.field_path for f in filters} - set(equal))
    names = {StructuredQuery.Direction.ASCENDING: "ASCENDING",
             StructuredQuery.Direction.DESCENDING: "DESCENDING"}
    order = [(o.field.field_path, names[o.direction]) for o in pb.order_by]
    last = order[-1][1] if order else "ASCENDING"
    order += [(f, last) for f in ranged if f not in dict(order)]
    return [(f, "ASCENDING") for f in equal] + order


def declared_indexes() -> list[list[tuple[str, str]]]:
    data = json.loads((Path(__file__).resolve().parents[2] / "firestore.indexes.json").read_text())
    return [[(f["fieldPath"], f["order"]) for f in index["fields"]]
            for index in data["indexes"] if index["collectionGroup"] == schema.TRAINING_JOBS]


def offline_jobs() -> Any:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import firestore

    client = firestore.Client(project="demo-actorgen", credentials=AnonymousCredentials())
    return client.collection(schema.TRAINING_JOBS)


def test_the_queued_scan_reads_due_jobs_in_order_and_has_its_index() -> None:
    query = dispatch.queued_scan(offline_jobs(), NOW)
    assert required_index(query) == [
        ("status", "ASCENDING"),
        ("priority", "DESCENDING"),
        ("queuedAt", "ASCENDING"),
        ("nextAttemptAt", "ASCENDING"),
    ]
    assert required_index(query) in declared_indexes()


def test_the_completed_job_check_has_its_index() -> None:
    query = reconcile.completed_since(offline_jobs(), NOW - timedelta(hours=1), NOW, 50)
    assert required_index(query) in declared_indexes()
