"""Upload validation: one verdict per uploaded photo, recorded on its actor.

A photo uploaded to ``users/{uid}/actors/{actorId}/images/{file}`` is accepted when
it decodes (JPEG, PNG, WebP, HEIC), is small enough in bytes and large enough in
pixels, shows exactly one face of usable size and quality (sharp, lit, inside the
frame, not in profile), is not the same photo as another accepted photo of the
actor (exactly, by appearance, or by a face that is a copy), shows the actor's
person (:mod:`actorgen.identity`), and the actor has room for it. Otherwise it is
rejected with a reason the app can show; the file itself is kept.

The policy (:func:`analyse`, :func:`judge`, :func:`rejudge_identity`) is pure;
:func:`handle_upload` does the I/O: it reads the object, then writes
``actors/{actorId}.images.{imageId}``, the records of earlier photos whose
identity verdict changed, and ``acceptedImageCount`` in one transaction. Uploads whose actor does not exist, or
belongs to another user, are logged and nothing is written: the path names the
uploader, and an actor that is not theirs must not be touched. (If the actor
document is merely created after its photos, the sweeper validates them later.)

:func:`handle_deleted` undoes it: when the owner deletes a photo (or an upload
overwrites it), the verdict on that generation leaves the actor, so it no longer
counts toward the limits and the trainer never looks for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from actorgen import faces, identity, imaging, schema
from actorgen.faces import FaceAnalysis, QualityLimits, QualityProblem
from actorgen.schema import Field, ImageField, ImageStatus
from actorgen.txn import run_in_transaction

if TYPE_CHECKING:
    from google.cloud.firestore import Client as FirestoreClient
    from google.cloud.storage import Bucket
    from PIL import Image

    from actorgen.config import Settings

log = logging.getLogger(__name__)

#: Perceptual hashes (imagehash's pHash) this close, in bits of 64, are "the same photo"
#: (re-saved, resized, recoloured: 0 bits measured). Crops (10-14 bits) and mirrored
#: copies (28-32) are caught by the face instead (IDENTITY_COPY_MAX_DISTANCE).
NEAR_DUPLICATE_BITS: Final = 10
#: Faces this close (embedding distance) are the same photo of the face: mirrored,
#: cropped, re-encoded, resized, recoloured or rotated copies of real photos measured
#: 0.00-0.22, distinct real photos of one person 0.32-0.45 (docs/faces.md).
IDENTITY_COPY_MAX_DISTANCE: Final = 0.25
#: A usable face is at least this share of the photo's short side, and this many pixels.
MIN_FACE_FRACTION: Final = 0.10
MIN_FACE_PIXELS: Final = 64
#: Detections smaller than this are passed to the policy (to say "too small" rather
#: than "no face"); the detector's own floor is higher.
DETECT_FACE_FRACTION: Final = 0.04
#: A second face counts when it is at least this share of the largest face's width:
#: smaller detections are background noise or far-away passers-by.
SECOND_FACE_RATIO: Final = 0.5


#: Photos are analysed reduced to about this many pixels (face detection works on
#: 800 pixels, the hash on 32): decoding memory stays small whatever the photo's size.
ANALYSIS_PIXELS: Final = 4_000_000

#: Reason for a file the decoder or the analysis choked on in an unexpected way.
UNPROCESSABLE: Final = (
    "The photo could not be processed; upload it again, or upload another photo."
)


class Reason:
    """Machine codes of verdicts (``ImageField.REASON_CODE``); the text goes in REASON."""

    OK = "ok"
    EMPTY = "empty"
    TOO_LARGE = "too-large"
    UNREADABLE = "unreadable"
    TOO_SMALL = "too-small"
    DUPLICATE = "duplicate"
    NEAR_DUPLICATE = "near-duplicate"
    NO_FACE = "no-face"
    MANY_FACES = "many-faces"
    SMALL_FACE = "small-face"
    FACE_CUT_OFF = "face-cut-off"
    PROFILE = "profile"
    TOO_DARK = "too-dark"
    OVEREXPOSED = "overexposed"
    BLURRY = "blurry"
    DIFFERENT_PERSON = "different-person"
    UNPROCESSABLE = "unprocessable"
    TOO_MANY_IMAGES = "too-many-images"


#: What to do about each face quality problem (faces.QualityProblem -> Reason, text).
_QUALITY_REASONS: Final = {
    QualityProblem.CUT_OFF: (
        Reason.FACE_CUT_OFF,
        "The face is cut off by the edge of the photo; upload a photo with the whole face "
        "and some room around it.",
    ),
    QualityProblem.PROFILE: (
        Reason.PROFILE,
        "The face is turned too far to the side; upload a photo where both eyes are "
        "visible (facing the camera or turned a little).",
    ),
    QualityProblem.DARK: (
        Reason.TOO_DARK,
        "The face is too dark to see; upload a photo taken in better light.",
    ),
    QualityProblem.BLOWN_OUT: (
        Reason.OVEREXPOSED,
        "The face is washed out by light (overexposed); upload a photo without strong light "
        "or flash on the face.",
    ),
    QualityProblem.BLURRY: (
        Reason.BLURRY,
        "The face is blurry; upload a sharp photo (hold the camera still and focus on the "
        "face).",
    ),
}


@dataclass(frozen=True)
class UploadPolicy:
    """The limits a photo is judged by."""

    max_bytes: int
    min_side: int
    max_images: int
    max_pixels: int = imaging.DEFAULT_MAX_PIXELS
    near_duplicate_bits: int = NEAR_DUPLICATE_BITS
    min_face_fraction: float = MIN_FACE_FRACTION
    min_face_pixels: int = MIN_FACE_PIXELS
    identity_copy_distance: float = IDENTITY_COPY_MAX_DISTANCE
    same_person_distance: float = faces.SAME_PERSON_MAX_DISTANCE
    quality: QualityLimits = QualityLimits()

    @classmethod
    def from_settings(cls, settings: Settings) -> UploadPolicy:
        return cls(
            max_bytes=settings.max_upload_bytes,
            min_side=settings.min_image_side,
            max_images=settings.max_images,
        )


@dataclass(frozen=True)
class ImageFacts:
    """What analysing the bytes found; no judgement yet."""

    size_bytes: int
    sha256: str
    decode_error: str | None = None
    format: str = ""
    width: int = 0
    height: int = 0
    phash: str = ""
    faces: tuple[FaceAnalysis, ...] = ()
    #: Set when hashing or face analysis failed unexpectedly (the reason to record).
    analysis_error: str | None = None


@dataclass(frozen=True)
class Verdict:
    status: str  # ImageStatus
    code: str  # Reason
    reason: str | None = None  # None when accepted
    face: FaceAnalysis | None = None

    @property
    def accepted(self) -> bool:
        return self.status == ImageStatus.ACCEPTED


# --------------------------------------------------------------------------- pure policy
def analyse(data: bytes, policy: UploadPolicy) -> ImageFacts:
    """Decode ``data`` and measure it (format, oriented size, perceptual hash, faces).

    Never raises for a bad file: every failure ends in the facts (and so in a verdict).
    """
    facts = ImageFacts(size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    if not data or len(data) > policy.max_bytes:
        return facts  # judged on size alone; never decode what is too big to accept
    try:
        decoded = imaging.open_image(data, max_pixels=policy.max_pixels,
                                     working_pixels=ANALYSIS_PIXELS)
    except imaging.ImageDecodeError as err:
        return dataclasses.replace(facts, decode_error=str(err))
    except Exception:  # a decoder bug on one odd file must end in a verdict, not a retry loop
        log.exception("decoding an upload failed unexpectedly")
        return dataclasses.replace(facts, decode_error=UNPROCESSABLE)
    image = decoded.image  # at most about ANALYSIS_PIXELS; sizes and boxes are the photo's
    width, height = decoded.size
    facts = dataclasses.replace(facts, format=decoded.format, width=width, height=height)
    try:
        facts = dataclasses.replace(facts, phash=perceptual_hash(image))
        if min(width, height) < policy.min_side:
            return facts  # rejected on resolution; face analysis would be wasted
        found = [face.rescaled(1 / decoded.scale) for face in
                 faces.analyze_faces(image, min_face_fraction=DETECT_FACE_FRACTION)]
    except Exception as err:  # one odd photo must end in a verdict, not a retry loop
        log.error("analysing an upload failed unexpectedly: %s", type(err).__name__,
                  exc_info=True)
        return dataclasses.replace(facts, analysis_error=UNPROCESSABLE)
    return dataclasses.replace(facts, faces=tuple(found))


def judge(
    facts: ImageFacts,
    others: Mapping[str, Mapping[str, Any]],
    policy: UploadPolicy,
) -> Verdict:
    """The verdict on one photo, given the actor's other image records (by imageId)."""
    if facts.size_bytes == 0:
        return _reject(Reason.EMPTY, "The file is empty (0 bytes); upload the photo again.")
    if facts.size_bytes > policy.max_bytes:
        return _reject(
            Reason.TOO_LARGE,
            f"The file is {_mb(facts.size_bytes)}; photos up to {_mb(policy.max_bytes)} are "
            "accepted. Upload a smaller version.",
        )
    if facts.decode_error:
        return _reject(Reason.UNREADABLE, facts.decode_error)
    if facts.analysis_error:
        return _reject(Reason.UNPROCESSABLE, facts.analysis_error)
    if min(facts.width, facts.height) < policy.min_side:
        return _reject(
            Reason.TOO_SMALL,
            f"The photo is {facts.width}x{facts.height}; at least {policy.min_side} pixels on "
            "the short side are needed.",
        )
    accepted = [r for r in others.values() if r.get(ImageField.STATUS) == ImageStatus.ACCEPTED]
    for record in accepted:
        if record.get(ImageField.SHA256) == facts.sha256:
            return _reject(
                Reason.DUPLICATE,
                f"This is the same file as {_name(record)}, which is already accepted.",
            )
    for record in accepted:
        other = record.get(ImageField.PHASH)
        if other and facts.phash and hamming(other, facts.phash) <= policy.near_duplicate_bits:
            return _reject(
                Reason.NEAR_DUPLICATE,
                f"This looks like the same photo as {_name(record)}; upload a different photo "
                "of the person.",
            )
    faces = counted_faces(facts.faces)
    if not faces:
        return _reject(
            Reason.NO_FACE,
            "No face was found in this photo; upload a photo where the person's face is "
            "clearly visible and facing the camera.",
        )
    if len(faces) > 1:
        return _reject(
            Reason.MANY_FACES,
            f"This photo shows {len(faces)} faces; upload photos with only the person.",
        )
    face = faces[0]
    box = face.box
    short = min(facts.width, facts.height)
    needed = max(policy.min_face_pixels, round(policy.min_face_fraction * short))
    if min(box.w, box.h) < needed:
        return _reject(
            Reason.SMALL_FACE,
            f"The face is too small ({min(box.w, box.h)} pixels, "
            f"{100 * min(box.w, box.h) / short:.0f}% of the photo's short side); use a closer "
            f"photo where the face is at least {needed} pixels "
            f"({100 * needed / short:.0f}%) across.",
            face,
        )
    copy = _identity_copy_of(face, accepted, policy)
    if copy is not None:
        record, distance = copy
        return _reject(
            Reason.NEAR_DUPLICATE,
            f"This looks like a copy of {_name(record)} (the same photo, mirrored, cropped or "
            f"re-saved: the faces are {distance:.2f} apart, different photos are more than "
            f"{policy.identity_copy_distance:.2f}); upload a different photo of the person.",
            face,
        )
    problems = face.quality.problems(policy.quality)
    if problems:
        code, text = _QUALITY_REASONS[problems[0]]
        return _reject(code, text, face)
    if len(accepted) >= policy.max_images:
        return _reject(Reason.TOO_MANY_IMAGES,
                       _too_many(policy, len(accepted))[ImageField.REASON], face)
    return Verdict(ImageStatus.ACCEPTED, Reason.OK, None, face)


def counted_faces(found: Sequence[FaceAnalysis]) -> list[FaceAnalysis]:
    """Faces that count as people in the photo, largest first."""
    if not found:
        return []
    ordered = sorted(found, key=lambda f: f.box.area, reverse=True)
    largest = ordered[0].box.w
    return [f for f in ordered if f.box.w >= SECOND_FACE_RATIO * largest]


def _identity_copy_of(
    face: FaceAnalysis, accepted: Sequence[Mapping[str, Any]], policy: UploadPolicy
) -> tuple[Mapping[str, Any], float] | None:
    """The accepted record whose face is a copy of ``face`` (closest first), with the distance."""
    closest = None
    for record in accepted:
        other = faces.embedding_from_record(record)
        if other is None:
            continue
        distance = faces.embedding_distance(face.embedding, other)
        if distance <= policy.identity_copy_distance and (
            closest is None or distance < closest[1]
        ):
            closest = (record, distance)
    return closest


def rejudge_identity(
    images: Mapping[str, Mapping[str, Any]], policy: UploadPolicy
) -> dict[str, dict[str, Any]]:
    """Records (by imageId) whose one-person verdict changes, given all the actor's records.

    The candidates are the photos whose face passed every other check: accepted
    ones, and those rejected as a different person or for want of room. They are
    judged together by :func:`actorgen.identity.judge_identity`, so who the person
    is does not depend on the order they arrived in. The person's photos are
    accepted while the actor has room (those accepted stay, then the others by
    when they were judged), other people's are rejected; each candidate gets its
    ``identityDistance``.
    """
    waiting = (Reason.DIFFERENT_PERSON, Reason.TOO_MANY_IMAGES)
    candidates = {
        key: emb for key, record in images.items()
        if (record.get(ImageField.STATUS) == ImageStatus.ACCEPTED
            or record.get(ImageField.REASON_CODE) in waiting)
        and (emb := faces.embedding_from_record(record)) is not None
    }
    judged = identity.judge_identity(candidates, max_distance=policy.same_person_distance)

    def is_accepted(key: str) -> bool:
        return images[key].get(ImageField.STATUS) == ImageStatus.ACCEPTED

    # Accepted photos without an embedding (judged before faces were embedded) keep
    # their place; they take no part in the identity vote.
    room = policy.max_images - sum(1 for k in images if is_accepted(k) and k not in candidates)
    members = sorted(judged.members, key=lambda k: (
        not is_accepted(k), str(images[k].get(ImageField.VALIDATED_AT) or ""), k))
    keep = set(members[:max(0, room)])
    changed: dict[str, dict[str, Any]] = {}
    for key in sorted(candidates):
        record = dict(images[key])
        if key in judged.outsiders:
            record.update(_different_person(judged.distance(key), policy))
        elif key in keep:
            record.update({ImageField.STATUS: ImageStatus.ACCEPTED, ImageField.REASON: None,
                           ImageField.REASON_CODE: Reason.OK})
        else:
            record.update(_too_many(policy))
        record[ImageField.IDENTITY_DISTANCE] = judged.distance(key)
        if record != images[key]:
            changed[key] = record
    return changed


def _too_many(policy: UploadPolicy, accepted: int | None = None) -> dict[str, Any]:
    return {
        ImageField.STATUS: ImageStatus.REJECTED,
        ImageField.REASON_CODE: Reason.TOO_MANY_IMAGES,
        ImageField.REASON: (
            f"This actor already has {policy.max_images if accepted is None else accepted} "
            f"accepted photos, the most allowed ({policy.max_images}); this one was not added."
        ),
    }


def _different_person(distance: float | None, policy: UploadPolicy) -> dict[str, Any]:
    apart = f" (faces {distance:.2f} apart; one person is under " \
        f"{policy.same_person_distance:.2f})" if distance is not None else ""
    return {
        ImageField.STATUS: ImageStatus.REJECTED,
        ImageField.REASON_CODE: Reason.DIFFERENT_PERSON,
        ImageField.REASON: (
            f"This looks like a different person from your other photos{apart}; upload "
            "photos of one person only."
        ),
    }


def image_record(
    object_name: str,
    generation: int | None,
    facts: ImageFacts,
    verdict: Verdict,
    now: datetime,
) -> dict[str, Any]:
    """The document value of one image's verdict (keys from schema.ImageField)."""
    parsed = schema.parse_upload_path(object_name)
    return {
        ImageField.PATH: object_name,
        ImageField.FILE_NAME: parsed.file_name if parsed else object_name.rsplit("/", 1)[-1],
        ImageField.GENERATION: generation,
        ImageField.STATUS: verdict.status,
        ImageField.REASON: verdict.reason,
        ImageField.REASON_CODE: verdict.code,
        ImageField.SIZE_BYTES: facts.size_bytes,
        ImageField.FORMAT: facts.format or None,
        ImageField.WIDTH: facts.width or None,
        ImageField.HEIGHT: facts.height or None,
        ImageField.SHA256: facts.sha256,
        ImageField.PHASH: facts.phash or None,
        ImageField.FACE: None,
        ImageField.LANDMARKS: None,
        ImageField.EMBEDDING: None,
        ImageField.FACE_QUALITY: None,
        ImageField.IDENTITY_DISTANCE: None,
        **(verdict.face.as_record() if verdict.face else {}),
        ImageField.VALIDATED_AT: now,
    }


def accepted_count(images: Mapping[str, Mapping[str, Any]]) -> int:
    return sum(1 for r in images.values() if r.get(ImageField.STATUS) == ImageStatus.ACCEPTED)


def perceptual_hash(image: Image.Image) -> str:
    """64-bit DCT perceptual hash (imagehash's pHash) as 16 hex digits."""
    import imagehash

    return str(imagehash.phash(image))


def hamming(a: str, b: str) -> int:
    """Differing bits of two hex hashes."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def _reject(code: str, reason: str, face: FaceAnalysis | None = None) -> Verdict:
    return Verdict(ImageStatus.REJECTED, code, reason, face)


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def _name(record: Mapping[str, Any]) -> str:
    return str(record.get(ImageField.FILE_NAME) or "another photo")


# --------------------------------------------------------------------------- I/O
@dataclass(frozen=True)
class UploadEvent:
    """The parts of a Storage finalize event (or a swept object) that validation uses."""

    bucket: str
    name: str
    generation: int | None = None
    size: int | None = None

    @classmethod
    def from_storage_data(cls, data: Any) -> UploadEvent:
        """From ``firebase_functions.storage_fn.StorageObjectData`` (size is a string there)."""
        return cls(
            bucket=data.bucket,
            name=data.name,
            generation=_to_int(getattr(data, "generation", None)),
            size=_to_int(getattr(data, "size", None)),
        )


class Outcome:
    """What :func:`handle_upload` did (returned for logs and tests)."""

    NOT_AN_UPLOAD = "not-an-upload"
    NO_ACTOR = "no-actor"
    FOREIGN_ACTOR = "foreign-actor"
    ALREADY_JUDGED = "already-judged"
    GONE = "gone"
    ACCEPTED = ImageStatus.ACCEPTED
    REJECTED = ImageStatus.REJECTED
    # handle_deleted
    REMOVED = "removed"  # the deleted object's record is gone, the count recomputed
    NO_RECORD = "no-record"  # nothing recorded for that name (redelivery, never judged)
    KEPT = "kept"  # the record is of another (newer, or still live) generation


def handle_upload(
    event: UploadEvent,
    settings: Settings,
    *,
    db: FirestoreClient | None = None,
    bucket: Bucket | None = None,
    now: datetime | None = None,
) -> str:
    """Validate one uploaded object and record the verdict on its actor; returns an Outcome."""
    from actorgen import clients

    path = schema.parse_upload_path(event.name)
    if path is None:
        return Outcome.NOT_AN_UPLOAD
    db = db or clients.firestore_client()
    bucket = bucket or clients.storage_bucket(event.bucket)
    actor_ref = db.collection(schema.ACTORS).document(path.actor_id)
    image_key = schema.image_id(event.name)
    policy = UploadPolicy.from_settings(settings)

    # Cheap checks first, so a redelivered event or a stray upload costs one read.
    pre = _precheck(actor_ref.get(), path.uid, image_key, event.generation)
    if pre is not None:
        _log_skip(pre, event, path)
        return pre

    size = _object_size(bucket, event)
    if size is None:
        log.info("upload %s is gone; a newer event (if any) judges it", event.name)
        return Outcome.GONE
    if size > policy.max_bytes:
        # Judged on its size alone: never pull a huge file into the function's memory.
        facts = ImageFacts(size_bytes=size, sha256="")
    else:
        data = _download(bucket, event, size, policy)
        if data is None:
            log.info("upload %s is gone; a newer event (if any) judges it", event.name)
            return Outcome.GONE
        facts = analyse(data, policy)
    when = now or datetime.now(UTC)

    def record(transaction: Any) -> str:
        snapshot = actor_ref.get(transaction=transaction)
        skip = _precheck(snapshot, path.uid, image_key, event.generation)
        if skip is not None:
            return skip
        images = dict((snapshot.to_dict() or {}).get(Field.IMAGES) or {})
        others = {k: v for k, v in images.items() if k != image_key and isinstance(v, dict)}
        verdict = judge(facts, others, policy)
        images = {**others, image_key: image_record(
            event.name, event.generation, facts, verdict, when)}
        changed = rejudge_identity(images, policy)
        images.update(changed)
        transaction.update(
            actor_ref,
            {
                **{f"{Field.IMAGES}.{key}": images[key] for key in {image_key, *changed}},
                Field.ACCEPTED_IMAGE_COUNT: accepted_count(images),
            },
        )
        if changed.keys() - {image_key}:
            log.info("upload %s: identity verdicts changed on %s", event.name,
                     sorted(changed.keys() - {image_key}))
        return str(images[image_key][ImageField.STATUS])

    outcome = run_in_transaction(db, record)
    if outcome in (Outcome.ACCEPTED, Outcome.REJECTED):
        log.info("upload %s %s", event.name, outcome)
    else:
        _log_skip(outcome, event, path)
    return outcome


def handle_deleted(
    event: UploadEvent,
    settings: Settings,
    *,
    db: FirestoreClient | None = None,
    bucket: Bucket | None = None,
) -> str:
    """Forget the verdict on a deleted (or overwritten) upload; returns an Outcome.

    Storage sends a delete event for every generation that is removed, also
    when a new upload overwrites an object. The record
    ``actors/{actorId}.images.{imageId}`` is removed, and ``acceptedImageCount``
    recounted, in one transaction when it is the verdict on the deleted
    generation. A record of a newer generation (the re-upload's own verdict) is
    kept. When either generation is unknown, or the record is of an older one,
    the record goes only if no object of that name is live any more (a live one
    gets or has its own verdict). Redelivery finds no record and writes nothing.
    As for uploads, actors that do not exist or belong to someone else than the
    uploader named by the path are never touched.
    """
    from google.cloud import firestore

    from actorgen import clients

    path = schema.parse_upload_path(event.name)
    if path is None:
        return Outcome.NOT_AN_UPLOAD
    db = db or clients.firestore_client()
    actor_ref = db.collection(schema.ACTORS).document(path.actor_id)
    image_key = schema.image_id(event.name)
    live: list[bool] = []  # whether an object of that name exists, asked at most once

    def object_is_live() -> bool:
        if not live:
            nonlocal bucket
            bucket = bucket or clients.storage_bucket(event.bucket)
            live.append(bool(bucket.blob(event.name).exists()))
        return live[0]

    def forget(transaction: Any) -> str:
        snapshot = actor_ref.get(transaction=transaction)
        if not snapshot.exists:
            return Outcome.NO_ACTOR
        actor = snapshot.to_dict() or {}
        if actor.get(Field.USER_ID) != path.uid:
            return Outcome.FOREIGN_ACTOR
        images = dict(actor.get(Field.IMAGES) or {})
        record = images.get(image_key)
        if not isinstance(record, dict):
            return Outcome.NO_RECORD
        seen = _to_int(record.get(ImageField.GENERATION))
        deleted = event.generation
        if seen is not None and deleted is not None and seen > deleted:
            return Outcome.KEPT  # a late event of an older generation
        if (seen is None or deleted is None or seen < deleted) and object_is_live():
            return Outcome.KEPT  # not provably the deleted one, and the name is live
        others = {k: v for k, v in images.items() if k != image_key and isinstance(v, dict)}
        # Without this photo the person's group may change: judge the rest again.
        changed = rejudge_identity(others, UploadPolicy.from_settings(settings))
        others.update(changed)
        transaction.update(actor_ref, {
            f"{Field.IMAGES}.{image_key}": firestore.DELETE_FIELD,
            **{f"{Field.IMAGES}.{key}": others[key] for key in changed},
            Field.ACCEPTED_IMAGE_COUNT: accepted_count(others),
        })
        return Outcome.REMOVED

    outcome = run_in_transaction(db, forget)
    if outcome == Outcome.REMOVED:
        log.info("upload %s (generation %s) deleted: its verdict is removed", event.name,
                 event.generation)
    elif outcome in (Outcome.NO_ACTOR, Outcome.FOREIGN_ACTOR):
        log.warning("deleted upload %s: actor %s %s; nothing changed", event.name,
                    path.actor_id, "does not exist" if outcome == Outcome.NO_ACTOR
                    else f"does not belong to uploader {path.uid}")
    else:
        log.info("deleted upload %s (generation %s): %s", event.name, event.generation, outcome)
    return outcome


def _precheck(snapshot: Any, uid: str, image_key: str, generation: int | None) -> str | None:
    """An Outcome when there is nothing to do for this upload, else None."""
    if not snapshot.exists:
        return Outcome.NO_ACTOR
    actor = snapshot.to_dict() or {}
    if actor.get(Field.USER_ID) != uid:
        return Outcome.FOREIGN_ACTOR
    existing = (actor.get(Field.IMAGES) or {}).get(image_key)
    if isinstance(existing, dict) and existing.get(ImageField.STATUS):
        seen = _to_int(existing.get(ImageField.GENERATION))
        # The same generation again (redelivery) or an older one (late delivery): done.
        if generation is None or seen is None or seen >= generation:
            return Outcome.ALREADY_JUDGED
    return None


def _object_size(bucket: Bucket, event: UploadEvent) -> int | None:
    """The object's size from the event, else from its metadata; None when it is gone."""
    from google.api_core import exceptions as gexc

    if event.size is not None:
        return event.size
    blob = bucket.blob(event.name)
    try:
        blob.reload()
    except gexc.NotFound:
        return None
    return int(blob.size or 0)


def _download(bucket: Bucket, event: UploadEvent, size: int, policy: UploadPolicy) -> bytes | None:
    """The object's bytes (this generation), at most one byte past the limit; None if gone."""
    from google.api_core import exceptions as gexc

    if size == 0:
        return b""
    blob = bucket.blob(event.name, generation=event.generation)
    try:
        # One byte past the limit is enough to tell that the metadata lied about the size.
        data = blob.download_as_bytes(start=0, end=policy.max_bytes)
    except gexc.NotFound:
        return None
    # Cloud Storage answers 404 for a generation it no longer has; the Storage emulator
    # ignores the generation and serves the live object, which says its own generation.
    served = _to_int(blob.generation)
    if event.generation is not None and served is not None and served != event.generation:
        return None
    return data


def _log_skip(outcome: str, event: UploadEvent, path: schema.UploadPath) -> None:
    if outcome == Outcome.NO_ACTOR:
        log.warning(
            "upload %s: actor %s does not exist; nothing recorded (the sweeper retries "
            "once it exists)", event.name, path.actor_id,
        )
    elif outcome == Outcome.FOREIGN_ACTOR:
        log.warning(
            "upload %s: actor %s does not belong to uploader %s; nothing recorded",
            event.name, path.actor_id, path.uid,
        )
    else:
        log.info("upload %s: %s", event.name, outcome)


def _to_int(value: Any) -> int | None:
    try:
        return int(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None
