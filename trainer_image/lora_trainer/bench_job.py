"""Where a whole job's time goes, without Firestore or Storage: the job's phase table.

Runs what one training job runs, in the same order and with the same code, on
a random-weight model built from configs (full-size SD 1.5 / SDXL shapes on a
GPU, ``--size tiny`` on the CPU): synthetic photos, the model, encoding,
class images (``--prior``), LoRA set-up, compile (``--compile``), every step,
checkpoints (written to local disk), samples and the exported files. It prints
:func:`lora_trainer.timing.format_table` -- the table the trainer logs at the
end of a job -- and one JSON line with the phases. Phases that need the
emulators or the cloud (reading the job, photo download, upload, the final
write) are shown as ``-``; their size on the CPU comes from a real job (see
docs/trainer.md).

    python -m lora_trainer.bench_job --model sd15 --steps 800 --batch 2      # GPU, default job
    python -m lora_trainer.bench_job --model sd15 --size tiny --device cpu --steps 800
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from .timing import Phase, PhaseTimer, format_table, process_start_monotonic

#: Phases of a job that this benchmark cannot run (no Firestore, no Storage).
NOT_RUN = (Phase.JOB_START, Phase.UPLOAD, Phase.FINAL_WRITE)


def run_whole_job(args: argparse.Namespace, timer: PhaseTimer) -> dict[str, Any]:
    with timer.phase(Phase.IMPORTS):
        import torch

        from . import export, identity, models, synthetic
        from .bench import MODELS, synthetic_photos
        from .config import TrainConfig
        from .training import build_trainer

        if args.threads:
            torch.set_num_threads(args.threads)
        models.import_libraries()
    kind = MODELS[args.model]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with timer.phase(Phase.PHOTOS):
        photos = synthetic_photos(args.images, 8)  # resized below, once the model is known
    with timer.phase(Phase.MODEL):  # built from configs: stands in for download + load
        pipeline = synthetic.build_pipeline(kind, args.size, seed=args.seed, device=device)
        info = models.info_from_pipeline(pipeline, f"synthetic-{args.model}-{args.size}")
        resolution = args.resolution or info.native_resolution
        config = TrainConfig(
            job_id="bench", attempt=1, user_id="bench", actor_id="bench", instance_name="ohwx",
            base_model_id=info.model_id, max_train_steps=args.steps,
            train_batch_size=args.batch, lora_rank=args.rank, lora_alpha=args.rank,
            resolution=resolution, mixed_precision=args.mixed_precision,
            compile_mode=args.compile, cuda_graphs=not args.no_cuda_graphs,
            fused_lora=not args.no_fused_lora, gpu_memory_gib=args.gpu_memory_gib,
            prior_preservation=args.prior,
            num_class_images=args.num_class_images, sample_steps=args.sample_steps,
            num_samples=args.num_samples, checkpoint_every=args.checkpoint_every,
            seed=args.seed, identity_checkpoints=args.identity_checkpoints,
            identity_samples=args.identity_samples,
            identity_sample_steps=args.identity_sample_steps,
        )
        _, weight_dtype = models.resolve_precision(config.mixed_precision, device)
        model = models.prepare_pipeline(pipeline, info, device, weight_dtype)
    with timer.phase(Phase.PHOTOS):
        photos = torch.nn.functional.interpolate(photos, size=(resolution, resolution),
                                                 mode="bicubic", align_corners=False).clamp(-1, 1)
    with timer.phase(Phase.SETUP):
        prepared = build_trainer(model, config, photos, timer=timer)
        trainer = prepared.trainer
        eval_start = trainer.fixed_noise_loss(seed=config.seed)

    # The identity score as a job runs it. The synthetic photos have no face, so the
    # reference is a stand-in embedding: the cost is the same (random weights draw
    # no face, the dearest case: the CNN detector runs after HOG finds nothing).
    tracker = identity.IdentityTracker(
        steps=identity.evaluation_steps(config.max_train_steps, config.identity_checkpoints,
                                        config.identity_fraction),
        judge=identity.sample_judge(model, config, prepared.resolution, [[0.0] * 128]),
        same_person_max=0.6)
    work = Path(tempfile.mkdtemp(prefix="bench-job-"))

    def checkpoint(step: int) -> None:  # the files a checkpoint writes, on local disk
        from safetensors.torch import save_file

        with timer.phase(Phase.CHECKPOINTS):
            save_file({k: v.contiguous() for k, v in trainer.trainable_state().items()},
                      str(work / "lora.safetensors"))
            torch.save(trainer.training_state(), work / "state.pt")

    with timer.phase(Phase.STEPS):
        loop = trainer.run(config.max_train_steps, report_every_seconds=math.inf,
                           checkpoint_every=config.checkpoint_every, on_checkpoint=checkpoint,
                           progress_bar=not args.quiet,
                           on_step=identity.step_hook(tracker, trainer, timer))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if config.compiles:
        timer.move(Phase.STEPS, Phase.COMPILE, loop.first_step_overhead_seconds)
    with timer.phase(Phase.EXPORT):
        eval_end = trainer.fixed_noise_loss(seed=config.seed)
        out = work / "export"
        out.mkdir()
        export.save_diffusers_lora(model, config, out)
        export.save_kohya_lora(model, config, out)
        with timer.phase(Phase.SAMPLES):
            export.render_samples(model, config, prepared.resolution, out)
    timings: dict[str, Any] = timer.total()
    timings.update({name: None for name in NOT_RUN})
    steps_s = timings.get(Phase.STEPS) or 0.0
    return {
        "model": args.model,
        "size": args.size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "steps": config.max_train_steps,
        "batch": config.train_batch_size,
        "samples_per_step": trainer.samples_per_step,
        "resolution": prepared.resolution,
        "mixed_precision": prepared.mixed_precision,
        "compile": config.compile_mode,
        "cuda_graphs": trainer.cuda_graphs,
        "fused_attention_modules": prepared.fused_attention,
        "gradient_checkpointing": prepared.gradient_checkpointing,
        "prior_preservation": config.prior_preservation,
        "samples_per_second_steps": round(
            config.max_train_steps * trainer.samples_per_step / steps_s, 2) if steps_s else None,
        "eval_loss_start": round(eval_start, 4),
        "eval_loss_end": round(eval_end, 4),
        "identity": {"steps": [s.step for s in tracker.scores],
                     "samples": config.identity_samples,
                     "sample_steps": config.identity_sample_steps,
                     "seconds": [round(s.seconds, 3) for s in tracker.scores]},
        "timings": timings,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from .config import MIXED_PRECISION_CHOICES

    p = argparse.ArgumentParser(description="The phase table of one whole training job.")
    p.add_argument("--model", choices=("sd15", "sdxl"), default="sd15")
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--steps", type=int, default=800, help="the job's steps (default job: 800)")
    p.add_argument("--batch", type=int, default=2, help="default job: 2")
    p.add_argument("--resolution", type=int, default=0, help="0: native")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--images", type=int, default=10, help="photos (with flips: twice as many)")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISION_CHOICES, default="auto")
    p.add_argument("--compile", nargs="?", const="regional", default="off",
                   choices=("off", "regional", "full"),
                   help="torch.compile the UNet: regional (a bare --compile) or full")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--no-fused-lora", action="store_true")
    p.add_argument("--gpu-memory-gib", type=float, default=0.0,
                   help="plan memory for a GPU of this size (e.g. 24 for an L4)")
    p.add_argument("--prior", action="store_true", help="prior preservation (class images)")
    p.add_argument("--num-class-images", type=int, default=50)
    p.add_argument("--sample-steps", type=int, default=30)
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--identity-checkpoints", type=int, default=3,
                   help="identity score evaluations (0: none)")
    p.add_argument("--identity-samples", type=int, default=4)
    p.add_argument("--identity-sample-steps", type=int, default=20)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append the JSON line to this file")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    timer = PhaseTimer(process_start_monotonic())
    timer.mark_since_start(Phase.STARTUP)
    args = parse_args(argv)
    result = run_whole_job(args, timer)
    print(format_table(result["timings"]), file=sys.stderr)
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
