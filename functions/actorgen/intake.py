"""Job intake: a job document the app created becomes ``queued`` or ``rejected``.

:func:`review_job` is the pure policy: it names every problem in one error the app
can show ("what to fix"), or returns the job's inputs with defaults filled.
:func:`process_job` applies it in a Firestore transaction that also reads the
actor and its other jobs, so two jobs created at once for one actor cannot both
be queued (the actor document is written by the winner, which makes the loser's
transaction retry and see it). Rejections for a missing or foreign actor never
write to the actor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from actorgen import identity, schema
from actorgen.schema import Field, ImageField, ImageStatus, JobStatus
from actorgen.txn import run_in_transaction

if TYPE_CHECKING:
    from google.cloud.firestore import Client as FirestoreClient

    from actorgen.config import Settings

log = logging.getLogger(__name__)

#: Jobs that hold an actor: a new job for the same actor is a duplicate meanwhile.
#: ``pending`` is not here: two pending jobs are decided in creation order by intake.
#: ``failed`` is not here either: it blocks nothing (an admin may still re-dispatch it).
BLOCKING_STATUSES = frozenset({JobStatus.QUEUED}) | schema.ACTIVE_JOB_STATUSES


@dataclass(frozen=True)
class Review:
    """The verdict on a new job."""

    problems: tuple[str, ...] = ()
    values: Mapping[str, Any] = field(default_factory=dict)  # filled inputs when accepted
    #: False when the actor must not be written (missing, foreign, or held by another job).
    may_update_actor: bool = True

    @property
    def accepted(self) -> bool:
        return not self.problems

    @property
    def error(self) -> str | None:
        """One message naming everything to fix; None when accepted."""
        if not self.problems:
            return None
        # Each problem quotes at most a short prefix of the user's value; the clip
        # bounds the sum, so the job's error and the actor's modelError stay small.
        return schema.clip_error("; ".join(self.problems))


def review_job(
    job: Mapping[str, Any],
    actor: Mapping[str, Any] | None,
    settings: Settings,
    *,
    other_active_jobs: Iterable[str] = (),
) -> Review:
    """Check a new job against its actor (None when missing) and the configuration.

    ``other_active_jobs`` are ids of the actor's other jobs in :data:`BLOCKING_STATUSES`.
    """
    problems: list[str] = []
    user_id = job.get(Field.USER_ID)
    actor_id = job.get(Field.ACTOR_ID)
    may_update_actor = True
    owned = False

    if not isinstance(user_id, str) or not user_id:
        problems.append(f"{Field.USER_ID} is missing; create the job as a signed-in user")
        may_update_actor = False
    if not isinstance(actor_id, str) or not actor_id:
        problems.append(f"{Field.ACTOR_ID} is missing; name the actor to train")
        may_update_actor = False
    elif actor is None:
        problems.append(
            f"actor {schema.quote(actor_id)} does not exist; create the actor first"
        )
        may_update_actor = False
    elif user_id and actor.get(Field.USER_ID) != user_id:
        # Do not say whose it is: that would leak another user's data.
        problems.append(
            f"actor {schema.quote(actor_id)} does not belong to you; use one of your actors"
        )
        may_update_actor = False
    else:
        owned = bool(user_id)

    blocking = sorted(other_active_jobs)
    if blocking and owned:
        problems.append(busy_actor_problem(actor_id, blocking))
        may_update_actor = False  # the actor belongs to the job in progress

    problems.extend(_instance_name_problems(job.get(Field.INSTANCE_NAME)))
    class_word = job.get(Field.CLASS_WORD)
    if class_word is None:
        class_word = schema.DEFAULT_CLASS_WORD
    elif not isinstance(class_word, str) or not schema.CLASS_WORD_PATTERN.match(class_word):
        problems.append(
            f"{Field.CLASS_WORD} must be 2-32 lowercase letters or spaces (like 'person', "
            f"'man', 'woman'), got {schema.quote(class_word)}"
        )

    base_model = job.get(Field.BASE_MODEL_ID)
    allowed = settings.allowed_base_models
    if not isinstance(base_model, str) or not base_model:
        problems.append(f"{Field.BASE_MODEL_ID} is missing; use one of: {', '.join(allowed)}")
    elif base_model not in allowed:
        problems.append(
            f"{Field.BASE_MODEL_ID} {schema.quote(base_model)} is not available; use one of: "
            f"{', '.join(allowed)}"
        )

    if owned and actor is not None:
        problems.extend(_image_problems(actor, settings))

    values, hyper_problems = schema.normalize_hyperparameters(job)
    problems.extend(hyper_problems)
    if problems:
        return Review(tuple(problems), {}, may_update_actor)
    values = {
        **values,
        Field.INSTANCE_NAME: job[Field.INSTANCE_NAME],
        Field.CLASS_WORD: class_word,
        Field.BASE_MODEL_ID: base_model,
        Field.PRIORITY: schema.job_priority(job),
    }
    return Review((), values, True)


def busy_actor_problem(actor_id: str, blocking: Iterable[str]) -> str:
    """Why a job cannot go ahead while ``blocking`` jobs hold its actor (one per actor)."""
    first = sorted(blocking)[0]
    return (
        f"actor {schema.quote(actor_id)} already has a training job in progress ({first}); wait "
        "for it to finish or cancel it before starting another"
    )


def blocking_jobs(db: FirestoreClient, transaction: Any, actor_id: str, job_id: str) -> list[str]:
    """Ids of the actor's jobs other than ``job_id`` in :data:`BLOCKING_STATUSES`.

    Read in ``transaction``, so intake and an admin's re-dispatch both keep the
    one-active-job-per-actor rule.
    """
    from google.cloud.firestore_v1.base_query import FieldFilter

    query = (
        db.collection(schema.TRAINING_JOBS)
        .where(filter=FieldFilter(Field.ACTOR_ID, "==", actor_id))
        .where(filter=FieldFilter(Field.STATUS, "in", sorted(BLOCKING_STATUSES)))
    )
    return [s.id for s in query.get(transaction=transaction) if s.id != job_id]


def _instance_name_problems(name: Any) -> list[str]:
    rule = (
        "2-32 characters: letters, digits, '_' or '-', starting with a letter "
        "(it becomes the trigger word and part of file names)"
    )
    if not isinstance(name, str) or not name:
        return [f"{Field.INSTANCE_NAME} is missing; use {rule}"]
    if schema.INSTANCE_NAME_PATTERN.match(name):
        return []
    if any(c in name for c in "/\\") or ".." in name or name.startswith("."):
        return [f"{Field.INSTANCE_NAME} {schema.quote(name)} looks like a file path; use {rule}"]
    return [f"{Field.INSTANCE_NAME} {schema.quote(name)} is not allowed; use {rule}"]


def _image_problems(actor: Mapping[str, Any], settings: Settings) -> list[str]:
    images = actor.get(Field.IMAGES) or {}
    statuses = [r.get(ImageField.STATUS) for r in images.values() if isinstance(r, dict)]
    accepted = statuses.count(ImageStatus.ACCEPTED)
    rejected = statuses.count(ImageStatus.REJECTED)
    if accepted < settings.min_images:
        more = settings.min_images - accepted
        note = (
            f" ({rejected} uploaded photo{'s were' if rejected != 1 else ' was'} rejected; "
            "see each photo's reason)"
            if rejected
            else ""
        )
        plural = "s" if accepted != 1 else ""
        message = (
            f"the actor has {accepted} accepted photo{plural}; at least {settings.min_images} "
            f"are needed: upload {more} more{note}"
        )
        return [message]
    if accepted > settings.max_images:
        message = (
            f"the actor has {accepted} accepted photos; at most {settings.max_images} can be "
            f"used: remove {accepted - settings.max_images}"
        )
        return [message]
    mixed = identity.mixed_people_problem(images)  # the photos must still be one person
    return [mixed] if mixed else []


# --------------------------------------------------------------------------- I/O
class IntakeOutcome:
    QUEUED = JobStatus.QUEUED
    REJECTED = JobStatus.REJECTED
    MISSING = "missing"
    ALREADY_TAKEN = "already-taken"


def process_job(
    job_id: str,
    settings: Settings,
    *,
    db: FirestoreClient | None = None,
    now: datetime | None = None,
    nudge: bool = True,
) -> str:
    """Take in one job: ``pending`` (or no status) becomes ``queued`` or ``rejected``.

    Idempotent: a job that is no longer pending is left alone. When queued and
    ``nudge`` is set, the dispatcher is nudged through Cloud Tasks (best effort).
    """
    from actorgen import clients

    db = db or clients.firestore_client()
    when = now or datetime.now(UTC)
    job_ref = db.collection(schema.TRAINING_JOBS).document(job_id)

    def take_in(transaction: Any) -> str:
        job_snap = job_ref.get(transaction=transaction)
        if not job_snap.exists:
            return IntakeOutcome.MISSING
        job = job_snap.to_dict() or {}
        if job.get(Field.STATUS) not in (None, JobStatus.PENDING):
            return IntakeOutcome.ALREADY_TAKEN  # a redelivered trigger, or the sweeper won
        actor_id = job.get(Field.ACTOR_ID)
        actor_ref = actor = None
        others: list[str] = []
        if isinstance(actor_id, str) and actor_id and "/" not in actor_id:
            actor_ref = db.collection(schema.ACTORS).document(actor_id)
            actor_snap = actor_ref.get(transaction=transaction)
            actor = actor_snap.to_dict() if actor_snap.exists else None
            if actor is not None and actor.get(Field.USER_ID) == job.get(Field.USER_ID):
                others = blocking_jobs(db, transaction, actor_id, job_id)
        review = review_job(job, actor, settings, other_active_jobs=others)
        status = JobStatus.QUEUED if review.accepted else JobStatus.REJECTED
        schema.check_transition(job.get(Field.STATUS), status)
        update: dict[str, Any] = {
            **schema.status_fields(job, status, when),
            Field.ERROR: review.error,
            Field.UPDATED_AT: when,
        }
        if review.accepted:
            update.update(review.values)
            update.update(
                {
                    Field.QUEUED_AT: when,
                    Field.NEXT_ATTEMPT_AT: when,  # "ready": the dispatcher's gate
                    Field.ATTEMPT: 0,
                    Field.MAX_ATTEMPTS: settings.max_attempts,
                    Field.ATTEMPT_HISTORY: [],
                    Field.PROGRESS: 0,
                }
            )
        else:
            update[Field.FINISHED_AT] = when
        transaction.update(job_ref, update)
        if actor_ref is not None and actor is not None and review.may_update_actor:
            has_model = schema.actor_has_model(actor)
            transaction.update(
                actor_ref,
                {
                    Field.MODEL_STATUS: schema.model_status_for_job(
                        status, actor_has_model=has_model
                    ),
                    Field.MODEL_ERROR: review.error,
                    Field.LATEST_JOB_ID: job_id,
                },
            )
        return status

    outcome = run_in_transaction(db, take_in)
    log.info("intake of job %s: %s", job_id, outcome)
    if outcome == IntakeOutcome.QUEUED and nudge:
        from actorgen import tasks

        tasks.nudge_dispatcher(job_id, settings)
    return outcome
