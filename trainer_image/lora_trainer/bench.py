"""GPU benchmark of the product's training loop on full-size model shapes.

Builds an SD 1.5- or SDXL-shaped pipeline with random weights directly on the
device (no download, no network, no Firestore), caches latents of synthetic
photos, attaches the LoRA and runs ``LoraTrainer.run`` -- the same code path as
a training job. Prints one JSON line per model with steady-state samples/s
(warm-up excluded) and peak GPU memory.

    python -m lora_trainer.bench --model sd15 --steps 60 --warmup 10
    python -m lora_trainer.bench --model sd15,sdxl --batch 4 --out results.jsonl
    python -m lora_trainer.bench --model sd15 --compile regional --gpu-memory-gib 24
    python -m lora_trainer.bench --model sd15 --size tiny --device cpu --steps 3   # smoke test

Each line also gives ``aten_ops_per_step``: the PyTorch operators one eager
step dispatches (each at least one kernel launch on a GPU; the host-bound
step's cost), counted on any device, so ``--no-fused-lora`` against the
default shows what the fusion saves even on the CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from typing import Any

import torch

from .config import COMPILE_MODES, MIXED_PRECISION_CHOICES

MODELS = {"sd15": "sd", "sdxl": "sdxl"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class AtenOpCounter:
    """Counts the PyTorch operators dispatched while active, by name.

    A ``TorchDispatchMode``: it sees every ATen call below autograd, forward and
    backward alike, on any device. ``_local_scalar_dense`` is a read of a tensor's
    value by the host (``.item()``, ``bool(t)``): a synchronisation on a GPU.
    """

    def __init__(self) -> None:
        from collections import Counter

        from torch.utils._python_dispatch import TorchDispatchMode

        counts: Counter[str] = Counter()
        self.counts = counts

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                counts[func.overloadpacket.__name__] += 1
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()

    def __enter__(self) -> AtenOpCounter:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def host_reads(self) -> int:
        return self.counts["_local_scalar_dense"]


def synthetic_photos(count: int, resolution: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1] (upsampled noise: photo-like spectra, no files)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 8, 8, generator=gen) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(resolution, resolution),
                                           mode="bicubic", align_corners=False).clamp(-1, 1)


def run_one(model_name: str, args: argparse.Namespace) -> dict[str, Any]:
    from . import models, synthetic
    from .config import STEP_FLOPS_PER_SAMPLE, TrainConfig
    from .training import build_trainer

    kind = MODELS[model_name]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    pipeline = synthetic.build_pipeline(kind, args.size, seed=args.seed, device=device)
    info = models.info_from_pipeline(pipeline, f"synthetic-{model_name}-{args.size}")
    resolution = args.resolution or info.native_resolution
    config = TrainConfig(
        job_id="bench", attempt=1, user_id="bench", actor_id="bench", instance_name="ohwx",
        base_model_id=info.model_id, max_train_steps=args.warmup + args.steps,
        train_batch_size=args.batch, lora_rank=args.rank, lora_alpha=args.rank,
        resolution=resolution, learning_rate=1e-4, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, compile_mode=args.compile,
        cuda_graphs=not args.no_cuda_graphs, fused_lora=not args.no_fused_lora,
        gpu_memory_gib=args.gpu_memory_gib,
        prior_preservation=args.prior, num_class_images=4, sample_steps=2,
        train_text_encoder=args.train_text_encoder, seed=args.seed,
        max_grad_norm=args.max_grad_norm,
    )
    _, weight_dtype = models.resolve_precision(config.mixed_precision, device)
    model = models.prepare_pipeline(pipeline, info, device, weight_dtype)
    _sync(device)
    build_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    prepared = build_trainer(model, config, synthetic_photos(args.images, resolution))
    trainer = prepared.trainer
    _sync(device)
    prepare_s = time.perf_counter() - t0

    # Warm-up: kernel selection, allocator growth and (with --compile) compilation.
    t0 = time.perf_counter()
    trainer.run(args.warmup, report_every_seconds=math.inf, progress_bar=False)
    _sync(device)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = trainer.run(args.warmup + args.steps, report_every_seconds=math.inf,
                         progress_bar=not args.quiet)
    _sync(device)
    steady_s = time.perf_counter() - t0
    samples = args.steps * trainer.samples_per_step
    sps = samples / steady_s
    ops = None
    if config.compile_mode == "off":  # compiled regions do not dispatch op by op
        with AtenOpCounter() as counter:
            trainer.train_step()
        _sync(device)
        ops = counter.total
    if args.profile:
        _profile(trainer, args.warmup + args.steps, device)
    out: dict[str, Any] = {
        "model": model_name,
        "size": args.size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "batch": args.batch,
        "samples_per_step": trainer.samples_per_step,
        "resolution": resolution,
        "rank": args.rank,
        "mixed_precision": prepared.mixed_precision,
        "gradient_checkpointing": prepared.gradient_checkpointing,
        "compile": args.compile,
        "compiled_regions": prepared.compiled_regions,
        "cuda_graphs": trainer.cuda_graphs,
        "fused_attention_modules": prepared.fused_attention,
        "aten_ops_per_step": ops,
        "prior_preservation": args.prior,
        "train_text_encoder": args.train_text_encoder,
        "warmup_steps": args.warmup,
        "steps": args.steps,
        "samples_per_second": round(sps, 2),
        "step_ms": round(1000 * steady_s / args.steps, 2),
        "loss": round(result.losses[-1][1], 4) if result.losses else None,
        "build_seconds": round(build_s, 1),
        "prepare_seconds": round(prepare_s, 1),
        "warmup_seconds": round(warmup_s, 1),
        "steady_seconds": round(steady_s, 2),
    }
    if prepared.memory is not None and prepared.memory.step_bytes is not None:
        out["probe_step_gib"] = round(prepared.memory.step_bytes / 2**30, 2)
        out["memory_budget_gib"] = round(prepared.memory.budget_bytes / 2**30, 2)
    if device.type == "cuda":
        out["peak_memory_gib_reserved"] = round(
            torch.cuda.max_memory_reserved(device) / 2**30, 2)
        out["peak_memory_gib_steady"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        out["peak_memory_gib_total_process"] = round(
            torch.cuda.memory_stats(device).get("allocated_bytes.all.peak", 0) / 2**30, 2)
        if args.size == "full" and not args.train_text_encoder:
            # Useful work only (recomputation under checkpointing not counted).
            flops = STEP_FLOPS_PER_SAMPLE[kind] * (resolution / info.native_resolution) ** 2
            out["useful_tflops"] = round(sps * flops / 1e12, 1)
    del trainer, prepared, model, pipeline
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def count_unet_step_ops(kind: str, size: str, *, fused: bool, batch: int = 4, rank: int = 16,
                        dtype: torch.dtype = torch.bfloat16) -> int:
    """ATen ops of one LoRA forward and backward of the UNet alone, at its native size.

    Built on the meta device: full-size shapes without their memory or FLOPs, so
    the count of a 2.6B-parameter SDXL UNet takes seconds on a CPU.
    """
    from . import synthetic
    from .fused_lora import fuse_lora_projections

    config = synthetic.unet_config(kind, size)
    with torch.device("meta"):
        unet = synthetic.build_lora_unet(kind, size, rank=rank, alpha=rank, dtype=dtype)
        if fused:
            fuse_lora_projections(unet)
        side = config["sample_size"]
        latents = torch.randn(batch, 4, side, side, dtype=dtype)
        hidden = torch.randn(batch, 77, config["cross_attention_dim"], dtype=dtype)
        timesteps = torch.randint(0, 1000, (batch,))
        added = None
        if kind == "sdxl":
            pooled = (config["projection_class_embeddings_input_dim"]
                      - 6 * config["addition_time_embed_dim"])
            added = {"text_embeds": torch.randn(batch, pooled, dtype=dtype),
                     "time_ids": torch.randn(batch, 6, dtype=dtype)}
        with AtenOpCounter() as counter:
            pred = unet(latents, timesteps, encoder_hidden_states=hidden,
                        added_cond_kwargs=added, return_dict=False)[0]
            pred.float().square().mean().backward()
    return counter.total


def _profile(trainer: Any, done_steps: int, device: torch.device, steps: int = 5) -> None:
    """Print where a few steady-state steps spend GPU time, and how busy the GPU is."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        trainer.run(done_steps + steps, report_every_seconds=math.inf, progress_bar=False)
        _sync(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    print(f"profile: {steps} steps in {wall * 1000:.0f} ms wall, GPU kernels busy "
          f"{gpu_us / 1000:.0f} ms ({100 * gpu_us / 1e6 / wall:.0f}%)", file=sys.stderr)
    print(events.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60),
          file=sys.stderr)
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60),
          file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LoRA training throughput on full-size shapes.")
    p.add_argument("--model", default="sd15", help="sd15, sdxl or a comma list")
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--steps", type=int, default=50, help="timed steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--resolution", type=int, default=0, help="0: native (512 / 1024)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--images", type=int, default=8, help="synthetic photos in the cache")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISION_CHOICES, default="auto")
    p.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--compile", nargs="?", const="regional", default="off", choices=COMPILE_MODES,
                   help="torch.compile the UNet: regional (a bare --compile) or full")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="compile without CUDA graphs")
    p.add_argument("--no-fused-lora", action="store_true",
                   help="q, k, v and their LoRAs one projection at a time")
    p.add_argument("--gpu-memory-gib", type=float, default=0.0,
                   help="plan memory for a GPU of this size (e.g. 24 for an L4)")
    p.add_argument("--prior", action="store_true", help="prior preservation (2x samples)")
    p.add_argument("--train-text-encoder", action="store_true")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile 5 steps and print the top kernels")
    p.add_argument("--count-ops", action="store_true",
                   help="only count the UNet step's ATen ops, fused and unfused, on the meta "
                        "device (full-size shapes on any machine)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    status = 0
    if args.count_ops:
        for name in [m.strip() for m in args.model.split(",") if m.strip()]:
            counts = {f"aten_ops_{'fused' if fused else 'unfused'}": count_unet_step_ops(
                MODELS[name], args.size, fused=fused, batch=args.batch, rank=args.rank)
                for fused in (True, False)}
            print(json.dumps({"model": name, "size": args.size, "batch": args.batch,
                              "scope": "UNet forward+backward, bf16, meta device", **counts}))
        return 0
    for name in [m.strip() for m in args.model.split(",") if m.strip()]:
        if name not in MODELS:
            print(f"unknown model {name!r}; choose from {sorted(MODELS)}", file=sys.stderr)
            return 2
        try:
            result = run_one(name, args)
        except torch.cuda.OutOfMemoryError as err:  # report and go on with the next model
            result = {"model": name, "error": f"out of memory: {str(err)[:200]}"}
            status = 1
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
