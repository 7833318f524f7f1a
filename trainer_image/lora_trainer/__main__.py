"""Entry point: ``python -m lora_trainer --job-id ID --attempt N``.

The container's ENTRYPOINT, the LocalExecutor and the tests all start the
trainer exactly like this. Job id, attempt, project and bucket fall back to
the environment variables named in ``actorgen.schema``; ``ACTORGEN_TRAINER_ARGS``
adds operator defaults for any other option (e.g. ``--sample-steps 10`` for a
local demo, or ``--compile regional`` on a Vertex deployment) that the command line overrides.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from actorgen import schema

from .config import COMPILE_MODES, DEFAULT_FACE_LOSS_WEIGHT, MIXED_PRECISION_CHOICES


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lora_trainer",
                                description="Train a person LoRA for one training job.")
    p.add_argument("--job-id", default=os.environ.get(schema.ENV_JOB_ID),
                   help=f"training job id (env {schema.ENV_JOB_ID})")
    p.add_argument("--attempt", type=int, default=_env_int(schema.ENV_ATTEMPT) or 1,
                   help=f"1-based attempt number (env {schema.ENV_ATTEMPT}; default 1)")
    p.add_argument("--project", default=os.environ.get(schema.ENV_PROJECT),
                   help=f"Google Cloud project (env {schema.ENV_PROJECT})")
    p.add_argument("--bucket", default=os.environ.get(schema.ENV_BUCKET),
                   help=f"Cloud Storage bucket (env {schema.ENV_BUCKET})")
    p.add_argument("--work-dir", type=Path,
                   default=Path(os.environ.get("ACTORGEN_WORK_DIR", "/tmp/actorgen-trainer")),
                   help="local scratch space for photos, checkpoints and exports "
                        "(env ACTORGEN_WORK_DIR)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available")
    p.add_argument("--max-steps-override", type=int, default=None,
                   help="train this many steps instead of the job's (tests, demos)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=None)
    p.add_argument("--report-every", type=float, default=None, dest="report_every_seconds",
                   help="seconds between progress writes to the job document")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISION_CHOICES, default=None)
    p.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default=None)
    p.add_argument("--caption-template", default=None,
                   help='e.g. "a photo of {instance} {class_word}"')
    p.add_argument("--sample-steps", type=int, default=None,
                   help="denoising steps of the sample images and class images")
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--num-class-images", type=int, default=None)
    p.add_argument("--face-loss-weight", type=float, default=None,
                   help="loss weight of the face region against 1 for the background "
                        f"(default {DEFAULT_FACE_LOSS_WEIGHT:g}; 1 turns it off)")
    p.add_argument("--noise-offset", type=float, default=None,
                   help="offset noise scale, e.g. 0.05 (default 0: off)")
    p.add_argument("--identity-checkpoints", type=int, default=None,
                   help="steps in the last 30%% of training at which the identity score is "
                        "measured (default 3; 0 turns it off)")
    p.add_argument("--identity-samples", type=int, default=None,
                   help="portraits rendered per identity score (default 4)")
    p.add_argument("--identity-sample-steps", type=int, default=None,
                   help="denoising steps of those portraits (default 20)")
    p.add_argument("--publish-last", action="store_false", default=None,
                   dest="publish_best_identity",
                   help="publish the last step even when an earlier one has a better "
                        "identity score")
    p.add_argument("--min-free-disk-mb", type=float, default=None,
                   help="refuse to start with less free disk (default 2048)")
    p.add_argument("--compile", nargs="?", const="regional", default=None,
                   choices=COMPILE_MODES, dest="compile_mode",
                   help="torch.compile the UNet: regional (its repeated blocks; the "
                        "default of a bare --compile), full, or off (default)")
    p.add_argument("--no-cuda-graphs", action="store_false", default=None, dest="cuda_graphs",
                   help="compile without CUDA graphs (torch.compile's default mode)")
    p.add_argument("--no-fused-lora", action="store_false", default=None, dest="fused_lora",
                   help="compute q, k and v and their LoRAs one projection at a time")
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="GPU memory the run may use (default: the whole GPU); gradient "
                        "checkpointing turns on when a measured step does not fit")
    p.add_argument("--push-to-hub", action="store_true", default=_env_flag(schema.ENV_HF_PUSH),
                   help="also push the trained LoRA to a private Hugging Face Hub repo "
                        f"(env {schema.ENV_HF_PUSH}=1; off by default: a token alone, "
                        "needed for gated base models, never pushes)")
    p.add_argument("--no-hub", action="store_true",
                   help="never push to the Hugging Face Hub (overrides --push-to-hub)")
    p.add_argument("--no-progress-bar", action="store_true")
    p.add_argument("--keep-work-dir", action="store_true")
    p.add_argument("--log-level", default=os.environ.get("ACTORGEN_LOG_LEVEL", "INFO"))
    p.add_argument("--log-format", choices=("json", "text"),
                   default=os.environ.get("ACTORGEN_LOG_FORMAT", "json"),
                   help="json: one Cloud Logging structured line per record, with job, "
                        "attempt and user (default; env ACTORGEN_LOG_FORMAT); text: for a "
                        "terminal")
    args = p.parse_args(argv)
    if not args.job_id:
        p.error(f"--job-id (or {schema.ENV_JOB_ID}) is required")
    return args


def _configure_logging(args: argparse.Namespace) -> None:
    """Structured lines on stderr (Vertex sends both streams to Cloud Logging), each with
    this process's job and attempt; the run adds the user once it has read the job."""
    from actorgen import logs

    logs.install(function=schema.TRAINER_MODULE, level=args.log_level.upper(),
                 stream=sys.stderr, json_lines=args.log_format == "json")
    logs.set_defaults(job_id=args.job_id, attempt=args.attempt)


def with_env_defaults(argv: list[str]) -> list[str]:
    """``argv`` behind the options of ``ACTORGEN_TRAINER_ARGS`` (the later option wins)."""
    return shlex.split(os.environ.get(schema.ENV_TRAINER_ARGS, "")) + list(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(with_env_defaults(argv))
    except (SystemExit, ValueError) as err:
        if isinstance(err, SystemExit) and err.code in (0, None):
            raise  # --help
        # The command line alone is what the executor wrote; when it parses, the fault
        # is the deployment's TRAINER_ARGS: end the job with that, not a retry loop.
        args = parse_args(argv)
        _configure_logging(args)
        from .run import record_startup_failure

        return record_startup_failure(
            args.job_id, args.attempt, args.project,
            f"the deployment's trainer options (functions param TRAINER_ARGS, passed as "
            f"{schema.ENV_TRAINER_ARGS}) are invalid: "
            f"{os.environ.get(schema.ENV_TRAINER_ARGS, '')!r}; fix the param, then "
            f"re-dispatch the job",
        )
    _configure_logging(args)
    from .run import RunOptions, run_job

    settings = {
        "checkpoint_every": args.checkpoint_every,
        "keep_checkpoints": args.keep_checkpoints,
        "report_every_seconds": args.report_every_seconds,
        "mixed_precision": args.mixed_precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "caption_template": args.caption_template,
        "sample_steps": args.sample_steps,
        "num_samples": args.num_samples,
        "num_class_images": args.num_class_images,
        "face_loss_weight": args.face_loss_weight,
        "noise_offset": args.noise_offset,
        "identity_checkpoints": args.identity_checkpoints,
        "identity_samples": args.identity_samples,
        "identity_sample_steps": args.identity_sample_steps,
        "publish_best_identity": args.publish_best_identity,
        "compile_mode": args.compile_mode,
        "cuda_graphs": args.cuda_graphs,
        "fused_lora": args.fused_lora,
        "gpu_memory_gib": args.gpu_memory_gib,
        "min_free_disk_bytes": (None if args.min_free_disk_mb is None
                                else int(args.min_free_disk_mb * 1024 * 1024)),
    }
    options = RunOptions(
        job_id=args.job_id,
        attempt=args.attempt,
        project=args.project,
        bucket=args.bucket,
        work_dir=args.work_dir,
        settings={k: v for k, v in settings.items() if v is not None},
        max_steps_override=args.max_steps_override,
        device=args.device,
        push_to_hub=args.push_to_hub and not args.no_hub,
        progress_bar=not args.no_progress_bar,
        keep_work_dir=args.keep_work_dir,
    )
    return run_job(options)


if __name__ == "__main__":
    sys.exit(main())
