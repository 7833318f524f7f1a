"""firestore.rules, evaluated for real by the Firestore emulator: every rule allows and denies.

Data is seeded with the Admin SDK (``db``, bypasses rules); every check goes through the
REST API as a signed-in user (``as_user``), as the app's client SDK would.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from actorgen import schema
from actorgen.schema import Field, JobStatus
from tools.emulators import REPO_ROOT

ALICE, BOB, ADMIN = "alice", "bob", "admin-carol"
ALLOWED, DENIED = 200, 403

# Fields only the pipeline writes on an actor (schema.Field, "actors (pipeline)" + model fields).
ACTOR_PIPELINE_FIELDS = (
    Field.IMAGES,
    Field.ACCEPTED_IMAGE_COUNT,
    Field.MODEL_STATUS,
    Field.MODEL_ID,
    Field.MODEL_ERROR,
    Field.MODEL_VERSIONS,
    Field.LATEST_JOB_ID,
)
# A few of the pipeline's job fields a client must never write.
JOB_PIPELINE_FIELDS = (
    Field.PROGRESS,
    Field.ERROR,
    Field.PRIORITY,
    Field.ATTEMPT,
    Field.MAX_ATTEMPTS,
    Field.NEXT_ATTEMPT_AT,
    Field.EXECUTOR,
    Field.EXECUTOR_JOB_NAME,
    Field.TRAINED_MODEL_ID,
    Field.ARTIFACTS,
    Field.CANCEL_REQUESTED,
)


def expect(response: requests.Response, status: int) -> None:
    """Assert the HTTP status, showing the emulator's reason (it names the rule's line)."""
    assert response.status_code == status, f"{response.status_code}: {response.text[:600]}"


def job_input(actor_id: str = "actor-a", user_id: str = ALICE, **extra: Any) -> dict[str, Any]:
    """What the app writes to create a job."""
    return {
        Field.USER_ID: user_id,
        Field.ACTOR_ID: actor_id,
        Field.INSTANCE_NAME: "sks",
        Field.BASE_MODEL_ID: "stable-diffusion-v1-5/stable-diffusion-v1-5",
        Field.TRAINING_STEPS: 800,
        Field.TRAINING_BATCH_SIZE: 2,
        Field.LEARNING_RATE: 1e-4,
        Field.STATUS: JobStatus.PENDING,
        Field.CREATED_AT: datetime.now(UTC),
        **extra,
    }


@pytest.fixture
def seeded(db: Any) -> None:
    """Alice owns actor-a and job-a; Bob owns actor-b and job-b (written as Admin)."""
    now = datetime.now(UTC)
    for uid, suffix in ((ALICE, "a"), (BOB, "b")):
        db.collection(schema.ACTORS).document(f"actor-{suffix}").set(
            {
                Field.USER_ID: uid,
                Field.IMAGE_URLS: [f"users/{uid}/actors/actor-{suffix}/images/1.jpg"],
                Field.MODEL_STATUS: schema.ModelStatus.NONE,
                "name": f"{uid}'s actor",
            }
        )
        db.collection(schema.TRAINING_JOBS).document(f"job-{suffix}").set(
            {**job_input(f"actor-{suffix}", uid), Field.STATUS: JobStatus.QUEUED, Field.QUEUED_AT: now}
        )


def set_job_status(db: Any, job_id: str, status: str) -> None:
    db.collection(schema.TRAINING_JOBS).document(job_id).update({Field.STATUS: status})


# ===================================================================== actors: read
@pytest.mark.usefixtures("seeded")
class TestActorRead:
    def test_owner_reads_own_actor(self, as_user):
        expect(as_user(ALICE).get("actors/actor-a"), ALLOWED)

    def test_other_user_cannot_read(self, as_user):
        expect(as_user(BOB).get("actors/actor-a"), DENIED)

    def test_signed_out_cannot_read(self, as_user):
        expect(as_user(None).get("actors/actor-a"), DENIED)

    def test_admin_claim_does_not_open_actors(self, as_user):
        expect(as_user(ADMIN, admin=True).get("actors/actor-a"), DENIED)

    def test_owner_lists_own_actors(self, as_user):
        response = as_user(ALICE).query("actors", userId=ALICE)
        expect(response, ALLOWED)
        names = [row["document"]["name"] for row in response.json() if "document" in row]
        assert [n.rsplit("/", 1)[1] for n in names] == ["actor-a"]

    def test_listing_all_actors_is_denied(self, as_user):
        expect(as_user(ALICE).query("actors"), DENIED)

    def test_listing_someone_elses_actors_is_denied(self, as_user):
        expect(as_user(ALICE).query("actors", userId=BOB), DENIED)


# ===================================================================== actors: write
class TestActorWrite:
    def test_user_creates_own_actor_with_app_fields(self, as_user):
        data = {
            Field.USER_ID: ALICE,
            Field.IMAGE_URLS: ["users/alice/actors/new/images/1.jpg"],
            "name": "Alice",
            "createdAt": datetime.now(UTC),
        }
        expect(as_user(ALICE).create("actors", "new", data), ALLOWED)

    def test_user_cannot_create_actor_for_someone_else(self, as_user):
        expect(as_user(ALICE).create("actors", "new", {Field.USER_ID: BOB}), DENIED)

    def test_signed_out_cannot_create_actor(self, as_user):
        expect(as_user(None).create("actors", "new", {Field.USER_ID: ALICE}), DENIED)

    @pytest.mark.parametrize("field", ACTOR_PIPELINE_FIELDS)
    def test_user_cannot_create_actor_with_pipeline_field(self, as_user, field):
        value: Any = {"images": {}, "modelVersions": []}.get(field, "x")
        data = {Field.USER_ID: ALICE, Field.IMAGE_URLS: [], field: value}
        expect(as_user(ALICE).create("actors", "new", data), DENIED)

    def test_user_cannot_create_actor_with_unknown_field(self, as_user):
        data = {Field.USER_ID: ALICE, "isPremium": True}
        expect(as_user(ALICE).create("actors", "new", data), DENIED)

    def test_image_urls_must_be_a_list(self, as_user):
        data = {Field.USER_ID: ALICE, Field.IMAGE_URLS: "users/alice/x.jpg"}
        expect(as_user(ALICE).create("actors", "new", data), DENIED)

    @pytest.mark.usefixtures("seeded")
    def test_owner_updates_image_urls_and_name(self, as_user):
        data = {Field.IMAGE_URLS: ["a.jpg", "b.jpg"], "name": "renamed"}
        expect(as_user(ALICE).update("actors/actor-a", data), ALLOWED)

    @pytest.mark.usefixtures("seeded")
    @pytest.mark.parametrize("field", ACTOR_PIPELINE_FIELDS)
    def test_owner_cannot_update_pipeline_field(self, as_user, field):
        value: Any = {"images": {}, "modelVersions": []}.get(field, "ready")
        expect(as_user(ALICE).update("actors/actor-a", {field: value}), DENIED)

    @pytest.mark.usefixtures("seeded")
    def test_owner_cannot_give_actor_away(self, as_user):
        expect(as_user(ALICE).update("actors/actor-a", {Field.USER_ID: BOB}), DENIED)

    @pytest.mark.usefixtures("seeded")
    def test_other_user_cannot_update(self, as_user):
        expect(as_user(BOB).update("actors/actor-a", {Field.IMAGE_URLS: []}), DENIED)

    @pytest.mark.usefixtures("seeded")
    def test_owner_cannot_delete_actor(self, as_user):
        expect(as_user(ALICE).delete("actors/actor-a"), DENIED)


# ===================================================================== jobs: read
@pytest.mark.usefixtures("seeded")
class TestJobRead:
    def test_owner_reads_own_job(self, as_user):
        expect(as_user(ALICE).get("training_jobs/job-a"), ALLOWED)

    def test_other_user_cannot_read_job(self, as_user):
        expect(as_user(BOB).get("training_jobs/job-a"), DENIED)

    def test_signed_out_cannot_read_job(self, as_user):
        expect(as_user(None).get("training_jobs/job-a"), DENIED)

    def test_admin_reads_any_job(self, as_user):
        expect(as_user(ADMIN, admin=True).get("training_jobs/job-a"), ALLOWED)

    def test_admin_claim_false_is_not_admin(self, as_user):
        expect(as_user(ADMIN, admin=False).get("training_jobs/job-a"), DENIED)

    def test_owner_lists_own_jobs(self, as_user):
        expect(as_user(ALICE).query("training_jobs", userId=ALICE), ALLOWED)

    def test_user_cannot_list_all_jobs(self, as_user):
        expect(as_user(ALICE).query("training_jobs"), DENIED)

    def test_admin_lists_all_jobs(self, as_user):
        response = as_user(ADMIN, admin=True).query("training_jobs")
        expect(response, ALLOWED)
        assert len([row for row in response.json() if "document" in row]) == 2


# ===================================================================== jobs: create
@pytest.mark.usefixtures("seeded")
class TestJobCreate:
    def test_user_creates_job_for_own_actor(self, as_user):
        expect(as_user(ALICE).create("training_jobs", "new", job_input()), ALLOWED)

    def test_job_without_status_is_denied(self, as_user):
        # The sweep finds lost intakes by status == "pending"; a missing field can't be queried.
        data = job_input()
        del data[Field.STATUS]
        expect(as_user(ALICE).create("training_jobs", "new", data), DENIED)

    def test_all_optional_inputs_are_accepted(self, as_user):
        # Each optional input with a value of its type (rules bound types and sizes).
        data = {spec.field: spec.default for spec in schema.HYPERPARAMETERS
                if spec.field in schema.JOB_INPUT_FIELDS}
        data[Field.CLASS_WORD] = "person"
        data.update(job_input())
        assert set(data) == set(schema.JOB_INPUT_FIELDS)
        expect(as_user(ALICE).create("training_jobs", "new", data), ALLOWED)

    def test_job_for_someone_elses_actor_is_denied(self, as_user):
        expect(as_user(ALICE).create("training_jobs", "new", job_input("actor-b")), DENIED)

    def test_job_in_someone_elses_name_is_denied(self, as_user):
        data = job_input("actor-b", user_id=BOB)
        expect(as_user(ALICE).create("training_jobs", "new", data), DENIED)

    def test_job_for_missing_actor_is_denied(self, as_user):
        expect(as_user(ALICE).create("training_jobs", "new", job_input("nope")), DENIED)

    def test_signed_out_cannot_create_job(self, as_user):
        expect(as_user(None).create("training_jobs", "new", job_input()), DENIED)

    @pytest.mark.parametrize(
        "status", [JobStatus.COMPLETED, JobStatus.QUEUED, JobStatus.TRAINING, JobStatus.FAILED]
    )
    def test_job_with_pipeline_status_is_denied(self, as_user, status):
        data = job_input(**{Field.STATUS: status})
        expect(as_user(ALICE).create("training_jobs", "new", data), DENIED)

    @pytest.mark.parametrize("field", JOB_PIPELINE_FIELDS)
    def test_job_with_pipeline_field_is_denied(self, as_user, field):
        data = job_input(**{field: 50})
        expect(as_user(ALICE).create("training_jobs", "new", data), DENIED)


# ===================================================================== jobs: user updates
@pytest.mark.usefixtures("seeded")
class TestJobUserUpdate:
    @pytest.mark.parametrize(
        "status", [JobStatus.PENDING, JobStatus.QUEUED, JobStatus.DISPATCHED, JobStatus.TRAINING]
    )
    def test_owner_requests_cancel_of_running_job(self, as_user, db, status):
        set_job_status(db, "job-a", status)
        expect(as_user(ALICE).update("training_jobs/job-a", {"cancelRequested": True}), ALLOWED)

    def test_cancel_request_may_carry_updated_at(self, as_user):
        data = {"cancelRequested": True, "updatedAt": datetime.now(UTC)}
        expect(as_user(ALICE).update("training_jobs/job-a", data), ALLOWED)

    @pytest.mark.parametrize(
        "status", [*sorted(schema.FINAL_JOB_STATUSES), JobStatus.FAILED]
    )
    def test_cancel_of_finished_job_is_denied(self, as_user, db, status):
        set_job_status(db, "job-a", status)
        expect(as_user(ALICE).update("training_jobs/job-a", {"cancelRequested": True}), DENIED)

    def test_cancel_false_is_denied(self, as_user):
        expect(as_user(ALICE).update("training_jobs/job-a", {"cancelRequested": False}), DENIED)

    def test_other_user_cannot_cancel(self, as_user):
        expect(as_user(BOB).update("training_jobs/job-a", {"cancelRequested": True}), DENIED)

    def test_cancel_with_status_change_is_denied(self, as_user):
        data = {"cancelRequested": True, Field.STATUS: JobStatus.CANCELLED}
        expect(as_user(ALICE).update("training_jobs/job-a", data), DENIED)

    @pytest.mark.parametrize(
        "status", [JobStatus.CANCELLED, JobStatus.COMPLETED, JobStatus.QUEUED, JobStatus.PENDING]
    )
    def test_owner_cannot_set_status(self, as_user, status):
        expect(as_user(ALICE).update("training_jobs/job-a", {Field.STATUS: status}), DENIED)

    @pytest.mark.parametrize(
        "field", [Field.PROGRESS, Field.ERROR, Field.PRIORITY, Field.TRAINING_STEPS]
    )
    def test_owner_cannot_change_other_fields(self, as_user, field):
        expect(as_user(ALICE).update("training_jobs/job-a", {field: 99}), DENIED)

    def test_owner_cannot_delete_job(self, as_user):
        expect(as_user(ALICE).delete("training_jobs/job-a"), DENIED)


# ===================================================================== jobs: admin
@pytest.mark.usefixtures("seeded")
class TestJobAdmin:
    def admin(self, as_user):
        return as_user(ADMIN, admin=True)

    def test_admin_redispatches_failed_job(self, as_user, db):
        set_job_status(db, "job-a", JobStatus.FAILED)
        data = {Field.STATUS: JobStatus.QUEUED}
        expect(self.admin(as_user).update("training_jobs/job-a", data), ALLOWED)

    def test_redispatch_may_carry_note_and_updated_at(self, as_user, db):
        set_job_status(db, "job-a", JobStatus.FAILED)
        data = {
            Field.STATUS: JobStatus.QUEUED,
            "adminNote": "quota fixed",
            "updatedAt": datetime.now(UTC),
        }
        expect(self.admin(as_user).update("training_jobs/job-a", data), ALLOWED)

    @pytest.mark.parametrize(
        "status", [*sorted(schema.FINAL_JOB_STATUSES), JobStatus.TRAINING, JobStatus.PENDING]
    )
    def test_redispatch_of_non_failed_job_is_denied(self, as_user, db, status):
        set_job_status(db, "job-a", status)
        data = {Field.STATUS: JobStatus.QUEUED}
        expect(self.admin(as_user).update("training_jobs/job-a", data), DENIED)

    @pytest.mark.parametrize(
        "field", [Field.ATTEMPT, Field.MAX_ATTEMPTS, Field.NEXT_ATTEMPT_AT, Field.PRIORITY]
    )
    def test_redispatch_with_other_changes_is_denied(self, as_user, db, field):
        set_job_status(db, "job-a", JobStatus.FAILED)
        data = {Field.STATUS: JobStatus.QUEUED, field: 1}
        expect(self.admin(as_user).update("training_jobs/job-a", data), DENIED)

    @pytest.mark.parametrize("status", [JobStatus.COMPLETED, JobStatus.CANCELLED])
    def test_admin_cannot_set_other_statuses(self, as_user, db, status):
        set_job_status(db, "job-a", JobStatus.FAILED)
        expect(self.admin(as_user).update("training_jobs/job-a", {Field.STATUS: status}), DENIED)

    def test_admin_cannot_write_progress(self, as_user):
        expect(self.admin(as_user).update("training_jobs/job-a", {Field.PROGRESS: 5}), DENIED)

    def test_owner_without_claim_cannot_redispatch(self, as_user, db):
        set_job_status(db, "job-a", JobStatus.FAILED)
        data = {Field.STATUS: JobStatus.QUEUED}
        expect(as_user(ALICE).update("training_jobs/job-a", data), DENIED)

    def test_admin_cannot_delete_job(self, as_user):
        expect(self.admin(as_user).delete("training_jobs/job-a"), DENIED)

    def test_admin_cannot_create_job_for_other_user(self, as_user):
        data = job_input("actor-a", user_id=ALICE)
        expect(self.admin(as_user).create("training_jobs", "new", data), DENIED)


# ===================================================================== everything else
class TestDefaultDeny:
    @pytest.mark.parametrize("path", ["users/alice", "config/app", "actors/a/private/x"])
    def test_unmatched_paths_are_denied(self, as_user, path):
        collection, doc_id = path.rsplit("/", 1)
        expect(as_user(ALICE).create(collection, doc_id, {Field.USER_ID: ALICE}), DENIED)
        expect(as_user(ADMIN, admin=True).get(path), DENIED)


# ===================================================================== rules vs schema.py
def _rules_source(path: Path) -> str:
    """The rules without ``//`` comments."""
    return "\n".join(line.split("//", 1)[0] for line in path.read_text().splitlines())


def _rules_list(function: str) -> list[str]:
    """The string list returned by ``function()`` in firestore.rules."""
    match = re.search(
        rf"function {function}\(\)\s*\{{\s*return\s*\[(.*?)\];", _rules_source(REPO_ROOT / "firestore.rules"),
        re.S,
    )
    assert match, f"firestore.rules has no function {function}() returning a list"
    return re.findall(r"'([^']*)'", match[1])


def test_job_input_fields_match_schema():
    assert _rules_list("jobInputFields") == list(schema.JOB_INPUT_FIELDS)


def test_final_statuses_match_schema():
    assert set(_rules_list("finalJobStatuses")) == set(schema.FINAL_JOB_STATUSES)


def test_actor_client_fields_exclude_pipeline_fields():
    client_fields = set(_rules_list("actorCreateFields")) | set(_rules_list("actorUpdateFields"))
    assert client_fields.isdisjoint(ACTOR_PIPELINE_FIELDS)
    assert Field.USER_ID in _rules_list("actorCreateFields")
    assert Field.USER_ID not in _rules_list("actorUpdateFields")


def test_statuses_named_in_rules_exist():
    source = _rules_source(REPO_ROOT / "firestore.rules")
    named = set(re.findall(r"status\s*[!=]=\s*'([a-z]+)'", source))
    named |= set(re.findall(r"get\('status', '([a-z]+)'\)", source))
    assert named and named <= schema.ALL_JOB_STATUSES
