"""Oversized and wrong-typed fields in every document the app may write: the rules
deny them, and what gets past the rules (the console, the Admin SDK, an old client)
is rejected by intake with a short error that quotes only a short prefix."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from actorgen import intake, reconcile, schema
from actorgen.config import Settings
from actorgen.schema import Field, JobStatus

from tests.functions.jobdocs import put_actor, read
from tests.rules.conftest import FIRESTORE_RULES, FirestoreAs

ALICE, ADMIN = "alice", "admin-carol"
ALLOWED, DENIED = 200, 403
HUGE = 300_000
SETTINGS = Settings(executor_kind="local", sweep_after_seconds=0)


@pytest.fixture
def rules(emulators: Any) -> Iterator[Any]:
    emulators.put_firestore_rules(FIRESTORE_RULES.read_text())
    yield lambda uid, **claims: FirestoreAs(emulators, uid, **claims)


def valid_job(actor_id: str, **extra: Any) -> dict[str, Any]:
    return {Field.USER_ID: ALICE, Field.ACTOR_ID: actor_id, Field.INSTANCE_NAME: "sks",
            Field.BASE_MODEL_ID: "stable-diffusion-v1-5/stable-diffusion-v1-5",
            Field.STATUS: JobStatus.PENDING, **extra}


# Every app-written job field with values the rules must refuse.
BAD_JOB_FIELDS = [
    (Field.INSTANCE_NAME, "x" * HUGE),
    (Field.INSTANCE_NAME, "x" * 65),
    (Field.INSTANCE_NAME, 12),
    (Field.BASE_MODEL_ID, "m" * 201),
    (Field.CLASS_WORD, "p" * 65),
    (Field.CLASS_WORD, ["person"]),
    (Field.TRAINING_STEPS, "9" * 600_000),
    (Field.TRAINING_STEPS, "800"),
    (Field.TRAINING_BATCH_SIZE, {"n": 2}),
    (Field.LEARNING_RATE, True),
    (Field.LORA_RANK, "16"),
    (Field.LORA_ALPHA, [16]),
    (Field.RESOLUTION, "512"),
    (Field.MIN_SNR_GAMMA, "5"),
    (Field.SEED, "1234"),
    (Field.TRAIN_TEXT_ENCODER, "yes"),
    (Field.PRIOR_PRESERVATION, 1),
    (Field.CREATED_AT, "yesterday"),
    (Field.ACTOR_ID, "a" * 129),
]


def test_the_rules_refuse_oversized_and_wrong_typed_job_fields(
    db: Any, rules: Any, proof: Any
) -> None:
    """Job create: every input field, too long or of the wrong type, is denied."""
    actor_id = put_actor(db, ALICE)
    alice = rules(ALICE)
    at_limit = valid_job(actor_id, **{
        Field.INSTANCE_NAME: "x" * 64, Field.BASE_MODEL_ID: "m" * 200,
        Field.CLASS_WORD: "p" * 64, Field.TRAINING_STEPS: 800, Field.LEARNING_RATE: 1e-4,
        Field.TRAIN_TEXT_ENCODER: False, Field.SEED: None, Field.CREATED_AT: datetime.now(UTC),
    })
    response = alice.create(schema.TRAINING_JOBS, "at-limit", at_limit)
    assert response.status_code == ALLOWED, response.text[:300]
    for i, (key, value) in enumerate(BAD_JOB_FIELDS):
        response = alice.create(schema.TRAINING_JOBS, f"bad-{i}", valid_job(actor_id, **{
            key: value}))
        assert response.status_code == DENIED, (key, response.status_code)
        proof.case()
    proof.held(f"{len(BAD_JOB_FIELDS)} oversized or wrong-typed job fields denied; a job at "
               "every limit allowed")


def test_the_rules_bound_the_actor_and_the_admin_note(db: Any, rules: Any, proof: Any) -> None:
    """Actor create/update (imageUrls, name, description, timestamps) and an admin's
    note on a re-dispatch are bounded."""
    alice = rules(ALICE)
    actor = {Field.USER_ID: ALICE, Field.IMAGE_URLS: ["https://x/1.jpg"], "name": "Al"}
    assert alice.create(schema.ACTORS, "ok", actor).status_code == ALLOWED
    bad = [
        {Field.IMAGE_URLS: ["u"] * (schema.MAX_IMAGE_URLS + 1)},
        {Field.IMAGE_URLS: ["u" * (schema.MAX_IMAGE_URLS_CHARS + 1)]},
        {Field.IMAGE_URLS: "https://x/1.jpg"},
        {"name": "n" * (schema.APP_STRING_LIMITS["name"] + 1)},
        {"description": "d" * (schema.APP_STRING_LIMITS["description"] + 1)},
        {"createdAt": "today"},
    ]
    for i, fields in enumerate(bad):
        assert alice.create(schema.ACTORS, f"bad-{i}", {**actor, **fields}).status_code == DENIED
        assert alice.update(f"{schema.ACTORS}/ok", fields).status_code == DENIED
        proof.case(2)
    assert alice.update(f"{schema.ACTORS}/ok", {Field.IMAGE_URLS: ["u"] * 100}).status_code == (
        ALLOWED)

    admin = rules(ADMIN, admin=True)
    limit = schema.APP_STRING_LIMITS["adminNote"]
    for i, (note, status) in enumerate([("n" * (limit + 1), DENIED), (7, DENIED),
                                        ("n" * limit, ALLOWED)]):
        db.collection(schema.TRAINING_JOBS).document(f"failed-{i}").set(
            {Field.USER_ID: ALICE, Field.STATUS: JobStatus.FAILED})
        response = admin.update(f"{schema.TRAINING_JOBS}/failed-{i}",
                                {Field.STATUS: JobStatus.QUEUED, "adminNote": note})
        assert response.status_code == status, (note if isinstance(note, int) else len(note))
        proof.case()
    proof.held("actor fields and the admin note are bounded by the rules")


def test_the_rules_and_the_schema_agree_on_the_limits() -> None:
    source = FIRESTORE_RULES.read_text()
    found = {key: int(n) for key, n in
             re.findall(r"optionalString\([\w.]+, '(\w+)', (\d+)\)", source)}
    assert found == schema.APP_STRING_LIMITS
    assert f"imageUrls.size() <= {schema.MAX_IMAGE_URLS}" in source
    assert f"join('').size() <= {schema.MAX_IMAGE_URLS_CHARS}" in source
    assert f"actorId.size() <= {schema.MAX_ACTOR_ID_CHARS}" in source


OVERSIZED_INPUTS = [
    {Field.INSTANCE_NAME: "x" * HUGE},
    {Field.CLASS_WORD: "c" * HUGE},
    {Field.BASE_MODEL_ID: "b" * HUGE},
    {Field.TRAINING_STEPS: "9" * 600_000},
    {Field.LEARNING_RATE: ["0.1"] * 20_000},
    {Field.ACTOR_ID: "a" * HUGE},
]


def test_intake_rejects_what_gets_past_the_rules_with_a_short_error(
    db: Any, proof: Any
) -> None:
    """Written around the rules (Admin SDK): each oversized input makes the job
    rejected with an error that quotes at most a short prefix; the actor's modelError
    is as short."""
    for i, fields in enumerate(OVERSIZED_INPUTS):
        actor_id = put_actor(db, ALICE)
        job_id = f"huge-{i}"
        db.collection(schema.TRAINING_JOBS).document(job_id).set(
            {**valid_job(actor_id), **fields})
        assert intake.process_job(job_id, SETTINGS, db=db, nudge=False) == JobStatus.REJECTED
        job = read(db, schema.TRAINING_JOBS, job_id)
        error = job[Field.ERROR]
        key = next(iter(fields))
        assert len(error) <= 400, (key, len(error))
        assert key in error or (key == Field.ACTOR_ID and "actor 'aaa" in error), error
        assert not re.search(r"(.)\1{" + str(schema.QUOTE_CHARS + 5) + ",}", error)
        model_error = read(db, schema.ACTORS, actor_id).get(Field.MODEL_ERROR)
        assert model_error is None or len(model_error) <= 400
        proof.case()
    proof.held(f"{len(OVERSIZED_INPUTS)} oversized inputs rejected with errors of at most "
               f"400 characters quoting at most {schema.QUOTE_CHARS} characters of the value")


def test_the_pending_sweep_rejects_an_oversized_job_instead_of_failing_on_it(
    db: Any, proof: Any
) -> None:
    """A lost trigger plus an oversized job: the sweep takes it in (rejected, short
    error) rather than failing on it every minute."""
    actor_id = put_actor(db, ALICE)
    db.collection(schema.TRAINING_JOBS).document("huge").set(
        valid_job(actor_id, **{Field.TRAINING_STEPS: "9" * 600_000}))
    taken = reconcile.sweep_pending_jobs(SETTINGS, db=db, now=datetime.now(UTC))
    proof.case()
    assert taken == ["huge"]
    job = read(db, schema.TRAINING_JOBS, "huge")
    assert job[Field.STATUS] == JobStatus.REJECTED and len(job[Field.ERROR]) <= 400
    proof.held("the sweep rejects it once, with a short error")
