"""Documents and uploads of a training job, as intake and upload validation leave them."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actorgen import schema

from tests import photos

F = schema.Field
IF = schema.ImageField
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The Docker image puts lora_trainer and actorgen side by side; locally these two.
TRAINER_PATHS = (REPO_ROOT / "trainer_image", REPO_ROOT / "functions")


def trainer_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for ``python -m lora_trainer`` subprocesses (offline, 1 thread)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(p) for p in TRAINER_PATHS] + [env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    for secret in ("HF_TOKEN", schema.ENV_HF_TOKEN_SECRET):
        env.pop(secret, None)
    env.update(extra or {})
    return env


@dataclass
class SeededJob:
    job_id: str
    actor_id: str
    uid: str
    image_paths: list[str]

    def job(self, db: Any) -> dict[str, Any]:
        return db.collection(schema.TRAINING_JOBS).document(self.job_id).get().to_dict()

    def actor(self, db: Any) -> dict[str, Any] | None:
        snap = db.collection(schema.ACTORS).document(self.actor_id).get()
        return snap.to_dict() if snap.exists else None


def seed_job(db: Any, bucket: Any, base_model: Path | str, *, images: int = 4,
             corrupt_index: int | None = None, with_actor: bool = True,
             status: str = schema.JobStatus.DISPATCHED, attempt: int = 1,
             **job_fields: Any) -> SeededJob:
    """Upload ``images`` photos of one person (tests.photos.portrait) and write the actor and job documents."""
    tag = uuid.uuid4().hex[:8]
    uid, actor_id, job_id = f"user-{tag}", f"actor-{tag}", f"job-{tag}"
    records, paths = {}, []
    for index in range(images):
        path = schema.upload_path(uid, actor_id, f"photo-{index}.jpg")
        data = photos.jpeg(photos.portrait(index))
        if index == corrupt_index:
            data = photos.truncated(data, keep=0.3)
        blob = bucket.blob(path)
        blob.upload_from_string(data, content_type="image/jpeg")
        # As upload validation records it: the judged generation of the object.
        records[schema.image_id(path)] = {IF.PATH: path, IF.STATUS: schema.ImageStatus.ACCEPTED,
                                          IF.GENERATION: blob.generation}
        paths.append(path)
    # A rejected photo must be ignored by the trainer even though it exists.
    rejected = schema.upload_path(uid, actor_id, "blurry.jpg")
    bucket.blob(rejected).upload_from_string(photos.text_as_jpg(), content_type="image/jpeg")
    records[schema.image_id(rejected)] = {IF.PATH: rejected, IF.STATUS: schema.ImageStatus.REJECTED,
                                          IF.REASON: "not a photo"}
    if with_actor:
        db.collection(schema.ACTORS).document(actor_id).set({
            F.USER_ID: uid,
            F.IMAGES: records,
            F.MODEL_STATUS: schema.ModelStatus.QUEUED,
            F.LATEST_JOB_ID: job_id,
        })
    job = {
        F.USER_ID: uid,
        F.ACTOR_ID: actor_id,
        F.INSTANCE_NAME: "ohwx",
        F.BASE_MODEL_ID: str(base_model),
        F.TRAINING_BATCH_SIZE: 1,
        F.LEARNING_RATE: 1e-3,
        F.LORA_RANK: 4,
        F.LORA_ALPHA: 8,
        F.STATUS: status,
        F.ATTEMPT: attempt,
    }
    job.update(job_fields)
    db.collection(schema.TRAINING_JOBS).document(job_id).set(job)
    return SeededJob(job_id, actor_id, uid, paths)


#: Trainer settings that keep a run at toy scale on two CPU cores.
TOY_ARGS = ["--device", "cpu", "--sample-steps", "2", "--num-samples", "2", "--no-hub",
            "--no-progress-bar", "--report-every", "0.5", "--min-free-disk-mb", "1",
            "--identity-samples", "2", "--identity-sample-steps", "2"]
TOY_SETTINGS: dict[str, Any] = {"sample_steps": 2, "num_samples": 2, "report_every_seconds": 0.5,
                                "min_free_disk_bytes": 1 << 20, "identity_samples": 2,
                                "identity_sample_steps": 2}


def main() -> None:
    """Seed one job into the emulators named by the environment; print its id.

    ``python -m tests.trainer.seed --base-model /tmp/tiny-sd`` (after exporting the
    variables that ``python -m tools.emulators`` prints).
    """
    import argparse

    from actorgen import clients

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    job = seed_job(clients.firestore_client(), clients.storage_bucket(), args.base_model,
                   images=args.images, **{F.TRAINING_STEPS: args.steps})
    print(job.job_id)


if __name__ == "__main__":
    main()
