"""The DreamBooth-LoRA optimisation: one step, and the loop around it.

One step: draw photos (with random horizontal flips) from the cached VAE
posteriors, add noise at random timesteps, predict it (or the velocity, for
v-prediction models) with the LoRA'd UNet, weight the loss per sample with
min-SNR, add the prior-preservation loss, and take an AdamW step. Everything
random comes from one generator on the device, whose state is checkpointed,
so a resumed run draws exactly what an uninterrupted one would. Nothing in a
step waits for the GPU; the loop reads the loss back only when it reports.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .encode import LatentStats, PromptEmbeds, encode_tokens
from .errors import Preempted
from .models import SDXL, LoadedModel, lora_modules
from .timing import Phase, PhaseTimer

#: ``(model, config, resolution, draw) -> class latents``: a cache that calls ``draw``
#: (generating the class images) only when it does not have them.
ClassLatentsSource = Callable[[LoadedModel, TrainConfig, int, Callable[[], LatentStats]],
                              LatentStats]

if TYPE_CHECKING:
    from .face_loss import PixelBox
    from .memory import MemoryPlan

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """Everything a step reads, already on the device."""

    instance: LatentStats
    instance_tokens: list[torch.Tensor]  # [1, L] per tokenizer
    instance_embeds: PromptEmbeds | None  # None when the text encoders are trained
    class_latents: LatentStats | None = None
    class_tokens: list[torch.Tensor] | None = None
    class_embeds: PromptEmbeds | None = None
    time_ids: torch.Tensor | None = None  # SDXL [1, 6]
    #: Face-weighted loss maps [N, 1, h, w] aligned with ``instance`` (face_loss.py).
    instance_weights: torch.Tensor | None = None


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    loss: float  # mean training loss since the previous report
    samples_per_second: float
    eta_seconds: float
    elapsed_seconds: float


#: ``metrics.finalLoss`` is the mean loss of this many final steps: a fixed number of
#: steps, not the last report window (whose length depends on the wall clock).
FINAL_LOSS_STEPS = 50


@dataclass
class LoopResult:
    steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss)
    train_seconds: float = 0.0
    samples_per_second: float = 0.0
    #: How much longer the first step took than the later ones on average (with
    #: torch.compile: the compilation), 0 for runs of one step.
    first_step_overhead_seconds: float = 0.0
    #: Mean training loss of the last FINAL_LOSS_STEPS steps (``metrics.finalLoss``).
    final_loss: float | None = None


class LoraTrainer:
    """Optimiser, LR schedule, RNG and the training step for one LoRA."""

    def __init__(self, model: LoadedModel, config: TrainConfig, data: TrainingData,
                 params: list[torch.nn.Parameter], mixed_precision: str) -> None:
        from accelerate import Accelerator
        from diffusers.optimization import get_scheduler

        self.model = model
        self.config = config
        self.data = data
        self.params = params
        self.device = model.device
        # bf16-pure: no autocast; inputs are cast once to the frozen weights' dtype.
        self.compute_dtype = model.weight_dtype if mixed_precision == "bf16-pure" else None
        self.accelerator = Accelerator(
            mixed_precision="no" if self.compute_dtype else mixed_precision,
            cpu=model.device.type == "cpu",
        )
        self.modules = lora_modules(model, config)
        optimizer = torch.optim.AdamW(
            params,
            lr=config.learning_rate,
            betas=(0.9, 0.999),
            weight_decay=config.adam_weight_decay,
            eps=1e-8,
            # One kernel for all parameters instead of several per tensor, and its step
            # count stays on the device (the foreach version reads it on the host).
            fused=model.device.type in ("cuda", "cpu"),
        )
        lr_scheduler = get_scheduler(
            "constant_with_warmup",
            optimizer=optimizer,
            num_warmup_steps=config.resolved_warmup_steps,
        )
        prepared = self.accelerator.prepare(*self.modules.values(), optimizer, lr_scheduler)
        *_, self.optimizer, self.lr_scheduler = prepared
        self.unet = self.model.unet
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.step = 0
        #: Per-step losses (device tensors: no host sync) of the last FINAL_LOSS_STEPS steps.
        self.recent_losses: deque[torch.Tensor] = deque(maxlen=FINAL_LOSS_STEPS)
        self.prediction_type = model.info.prediction_type
        self.samples_per_step = config.train_batch_size * (2 if data.class_latents else 1)
        sched = model.noise_scheduler
        self.num_timesteps = sched.config.num_train_timesteps
        alphas_cumprod = sched.alphas_cumprod.to(self.device, torch.float32)
        self._sqrt_alpha = alphas_cumprod.sqrt()
        self._sqrt_one_minus_alpha = (1.0 - alphas_cumprod).sqrt()
        self._snr = alphas_cumprod / (1.0 - alphas_cumprod)
        #: Set by build_trainer when compiled regions replay CUDA graphs.
        self.cuda_graphs = False

    # ------------------------------------------------------------------ step
    def _draw(self, stats: LatentStats, count: int) -> torch.Tensor:
        """``count`` latents sampled from random cached posteriors."""
        return self._draw_indexed(stats, count)[0]

    def _draw_indexed(self, stats: LatentStats, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_draw` and the cache rows drawn (to pick their loss weight maps).

        With random flips on, the mirrored photos are part of the cache, so a
        uniform index is also a random flip.
        """
        index = torch.randint(0, len(stats), (count,), device=self.device,
                              generator=self.generator)
        mean, std = stats.mean[index], stats.std[index]
        noise = torch.randn(mean.shape, device=self.device, generator=self.generator)
        return mean + std * noise, index

    def _conditioning(self, batch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        data = self.data
        if data.instance_embeds is not None:
            inst = data.instance_embeds
            cls = data.class_embeds
        else:  # text-encoder LoRA: the embeddings change every step
            tokens = data.instance_tokens
            if data.class_tokens is not None:
                tokens = [torch.cat([a, b]) for a, b in zip(tokens, data.class_tokens, strict=True)]
            both = encode_tokens(self.model, tokens)
            inst = PromptEmbeds(both.hidden[:1], None if both.pooled is None else both.pooled[:1])
            cls = None
            if data.class_tokens is not None:
                cls = PromptEmbeds(both.hidden[1:2],
                                   None if both.pooled is None else both.pooled[1:2])
        parts = [inst.repeat(batch)]
        if data.class_latents is not None and cls is not None:
            parts.append(cls.repeat(batch))
        hidden = torch.cat([p.hidden for p in parts])
        added = None
        if self.model.kind == SDXL:
            pooled = torch.cat([p.pooled for p in parts])  # type: ignore[misc]
            added = {
                "text_embeds": pooled,
                "time_ids": data.time_ids.expand(hidden.shape[0], -1),  # type: ignore[union-attr]
            }
        return hidden, added

    def _compute_inputs(
        self, noisy: torch.Tensor, hidden: torch.Tensor, added: dict[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
        """The UNet's inputs in its compute dtype (a no-op under autocast)."""
        dtype = self.compute_dtype
        if dtype is None:
            return noisy, hidden, added
        if added is not None:
            added = {k: v.to(dtype) for k, v in added.items()}
        return noisy.to(dtype), hidden.to(dtype), added

    def _loss(self, latents: torch.Tensor, hidden: torch.Tensor,
              added: dict[str, torch.Tensor] | None, noise: torch.Tensor,
              timesteps: torch.Tensor, pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample min-SNR-weighted MSE ``[n]``, face-weighted by ``pixel_weight``."""
        a = self._sqrt_alpha[timesteps].view(-1, 1, 1, 1)
        s = self._sqrt_one_minus_alpha[timesteps].view(-1, 1, 1, 1)
        noisy = a * latents + s * noise
        if self.device.type == "cuda":
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        noisy, hidden, added = self._compute_inputs(noisy, hidden, added)
        pred = self.unet(noisy, timesteps, encoder_hidden_states=hidden,
                         added_cond_kwargs=added, return_dict=False)[0]
        target = noise if self.prediction_type == "epsilon" else a * noise - s * latents
        error = F.mse_loss(pred.float(), target.float(), reduction="none")
        if pixel_weight is not None:  # [n, 1, h, w] with mean 1 per sample
            error = error * pixel_weight
        loss = error.mean(dim=(1, 2, 3))
        gamma = self.config.min_snr_gamma
        if gamma > 0:
            # Min-SNR-gamma (Hang et al. 2023): equalises the pull of easy and
            # hard timesteps; v-prediction's target already scales by SNR+1.
            snr = self._snr[timesteps]
            weight = torch.clamp(snr, max=gamma)
            weight = weight / (snr + 1) if self.prediction_type == "v_prediction" else weight / snr
            loss = loss * weight
        return loss

    def train_step(self) -> torch.Tensor:
        """One optimisation step; returns the loss as a device tensor (no host sync)."""
        if self.cuda_graphs:
            from .compilation import mark_step_begin

            mark_step_begin()
        loss = self._forward_backward()
        if self.config.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss

    def probe_step(self) -> None:
        """A step's forward and backward that leaves no trace (memory.py measures it).

        The random state is restored and the gradients dropped: the run that
        follows draws and trains exactly as it would have without the probe.
        """
        state = self.generator.get_state()
        try:
            self._forward_backward()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.generator.set_state(state)

    def _forward_backward(self) -> torch.Tensor:
        """Draw a batch, compute the loss and its gradients; the loss, detached."""
        batch = self.config.train_batch_size
        latents, index = self._draw_indexed(self.data.instance, batch)
        weights = self.data.instance_weights
        pixel_weight = None if weights is None else weights[index]
        if self.data.class_latents is not None:
            latents = torch.cat([latents, self._draw(self.data.class_latents, batch)])
            if pixel_weight is not None:  # class images: no face box, plain mean
                pixel_weight = torch.cat([pixel_weight, torch.ones_like(pixel_weight)])
        noise = torch.randn(latents.shape, device=self.device, generator=self.generator)
        if self.config.noise_offset > 0:
            # Offset noise: a per-sample, per-channel constant lets the LoRA learn
            # whole-image brightness (off by default: drawn only when on).
            noise = noise + self.config.noise_offset * torch.randn(
                (*latents.shape[:2], 1, 1), device=self.device, generator=self.generator)
        timesteps = torch.randint(0, self.num_timesteps, (latents.shape[0],),
                                  device=self.device, generator=self.generator)
        with self.accelerator.autocast():
            hidden, added = self._conditioning(batch)
            per_sample = self._loss(latents, hidden, added, noise, timesteps, pixel_weight)
        loss = per_sample[:batch].mean()
        if self.data.class_latents is not None:
            loss = loss + self.config.prior_loss_weight * per_sample[batch:].mean()
        self.accelerator.backward(loss)
        return loss.detach()

    # ------------------------------------------------------------- evaluation
    @torch.no_grad()
    def fixed_noise_loss(self, *, seed: int = 0, images: int = 8,
                         timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)) -> float:
        """Unweighted loss on the photos' posterior means with fixed noise and timesteps.

        The same number before and after training says how much the LoRA
        learned, free of the sampling noise of the training loss.
        """
        gen = torch.Generator(self.device).manual_seed(seed)
        n = min(images, len(self.data.instance))
        latents = self.data.instance.mean[:n]
        total = 0.0
        for t in timesteps:
            if self.cuda_graphs:
                from .compilation import mark_step_begin

                mark_step_begin()
            noise = torch.randn(latents.shape, device=self.device, generator=gen)
            ts = torch.full((n,), t, device=self.device, dtype=torch.long)
            with self.accelerator.autocast():
                hidden, added = self._conditioning(n)
                hidden = hidden[:n]
                if added is not None:
                    added = {k: v[:n] for k, v in added.items()}
                a = self._sqrt_alpha[ts].view(-1, 1, 1, 1)
                s = self._sqrt_one_minus_alpha[ts].view(-1, 1, 1, 1)
                noisy, hidden, added = self._compute_inputs(a * latents + s * noise, hidden, added)
                pred = self.unet(noisy, ts, encoder_hidden_states=hidden,
                                 added_cond_kwargs=added, return_dict=False)[0]
            target = noise if self.prediction_type == "epsilon" else a * noise - s * latents
            total += F.mse_loss(pred.float(), target.float()).item()
        return total / len(timesteps)

    # ------------------------------------------------------------ checkpoints
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The LoRA weights by ``component.parameter`` name (fp32, on the CPU)."""
        state = {}
        for name, module in self.modules.items():
            for pname, param in module.named_parameters():
                if param.requires_grad:
                    state[f"{name}.{pname}"] = param.detach().to("cpu", copy=True)
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = {}
        for name, module in self.modules.items():
            for pname, param in module.named_parameters():
                if param.requires_grad:
                    expected[f"{name}.{pname}"] = param
        if set(expected) != set(state):
            raise ValueError("checkpoint LoRA weights do not match this model's adapters")
        with torch.no_grad():
            for key, param in expected.items():
                param.copy_(state[key].to(param.device, param.dtype))

    def training_state(self) -> dict[str, Any]:
        """Optimiser, LR schedule, loss scaler, RNG and step: all a resume needs."""
        scaler = self.accelerator.scaler
        # A snapshot: state_dict() returns live tensors that the next step mutates.
        return _cpu_copy({
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "generator": self.generator.get_state(),
            # So a resumed run reports the same final loss as one that ran straight.
            "recent_losses": [float(loss) for loss in self.recent_losses],
        })

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"].cpu())
        self.step = int(state["step"])
        self.recent_losses.clear()  # none in checkpoints made before they were kept
        self.recent_losses.extend(torch.tensor(loss, device=self.device)
                                  for loss in state.get("recent_losses", ()))

    def final_loss(self) -> float | None:
        """Mean loss of the last :data:`FINAL_LOSS_STEPS` steps (None before any step)."""
        if not self.recent_losses:
            return None
        return float(torch.stack(list(self.recent_losses)).float().mean())

    # ------------------------------------------------------------------- loop
    def run(
        self,
        total_steps: int,
        *,
        report_every_seconds: float,
        on_report: Callable[[Progress], None] | None = None,
        checkpoint_every: int = 0,
        on_checkpoint: Callable[[int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        progress_bar: bool = True,
        on_step: Callable[[int], None] | None = None,
    ) -> LoopResult:
        """Train up to ``total_steps``; report, checkpoint and stop as asked.

        ``should_stop`` returning True (SIGTERM) checkpoints and raises
        :class:`~lora_trainer.errors.Preempted`. ``on_report`` may raise to
        stop (cancel, superseded). ``on_step`` runs after every step, before
        its checkpoint (the identity score); its time is left out of the rates.
        """
        from tqdm.auto import tqdm

        result = LoopResult(steps=self.step)
        start_step = self.step
        started = time.monotonic()
        window_start, window_step = started, self.step
        loss_sum = torch.zeros((), device=self.device)
        first_step_seconds = None
        callback_seconds = 0.0  # reports and checkpoints, not steps
        bar = tqdm(total=total_steps, initial=self.step, desc="training", unit="step",
                   disable=not progress_bar, mininterval=2.0)
        try:
            while self.step < total_steps:
                step_loss = self.train_step()
                loss_sum += step_loss
                self.recent_losses.append(step_loss)
                if first_step_seconds is None:
                    if self.device.type == "cuda":  # once per run: the step really ended
                        torch.cuda.synchronize(self.device)
                    first_step_seconds = time.monotonic() - started
                bar.update(1)
                done = self.step >= total_steps
                now = time.monotonic()
                if done or now - window_start >= report_every_seconds:
                    mean_loss = (loss_sum / (self.step - window_step)).item()  # syncs
                    now = time.monotonic()
                    rate = (self.step - window_step) / max(now - window_start, 1e-9)
                    sps = rate * self.samples_per_step
                    progress = Progress(
                        step=self.step,
                        total_steps=total_steps,
                        loss=mean_loss,
                        samples_per_second=sps,
                        eta_seconds=(total_steps - self.step) / rate if rate else 0.0,
                        elapsed_seconds=now - started,
                    )
                    result.losses.append((self.step, mean_loss))
                    bar.set_postfix(loss=f"{mean_loss:.4f}", samples_s=f"{sps:.1f}")
                    loss_sum.zero_()
                    window_start, window_step = now, self.step
                    if on_report is not None:
                        on_report(progress)
                stop = should_stop() if should_stop is not None else False
                if on_step is not None and not stop:
                    paused = time.monotonic()
                    on_step(self.step)
                    paused = time.monotonic() - paused
                    # Left out of the step rates and times (the identity samples).
                    started += paused
                    window_start += paused
                    now += paused
                periodic = checkpoint_every and self.step % checkpoint_every == 0
                if on_checkpoint is not None and (periodic or done or stop):
                    on_checkpoint(self.step)
                callback_seconds += time.monotonic() - now
                if stop and not done:
                    raise Preempted(f"stopped at step {self.step} on request")
        finally:
            bar.close()
        elapsed = time.monotonic() - started
        result.steps = self.step
        result.final_loss = self.final_loss()
        result.train_seconds = elapsed
        if self.step > start_step and elapsed > 0:
            result.samples_per_second = (self.step - start_step) * self.samples_per_step / elapsed
        later_steps = self.step - start_step - 1
        if first_step_seconds is not None and later_steps > 0:
            typical = (elapsed - callback_seconds - first_step_seconds) / later_steps
            result.first_step_overhead_seconds = max(0.0, first_step_seconds - max(0.0, typical))
        return result


def _cpu_copy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


class StopFlag:
    """SIGTERM (preemption): checkpoint or stop promptly, whatever the worker is doing.

    Inside :meth:`interrupting` (the job's work) the handler raises :class:`Preempted`
    at once: loading the model, class images, export and upload have nothing to
    checkpoint and no step to wait for, and waiting for the phase to end would only
    end in SIGKILL. Inside :meth:`deferred` (the training loop) it only sets the
    flag: the loop checkpoints and raises after the current step. Elsewhere (start-up,
    recording an outcome) it only sets the flag. The restarted worker resumes from
    the last checkpoint.
    """

    _FLAG, _RAISE = "flag", "raise"

    def __init__(self) -> None:
        self.requested = False
        self._mode = self._FLAG

    def __call__(self) -> bool:
        return self.requested

    def install(self) -> Any:
        """Handle SIGTERM from now on; returns the previous handler (for :meth:`restore`)."""

        def handler(signum: int, _frame: Any) -> None:
            self.requested = True
            if self._mode != self._RAISE:
                log.warning("signal %d: stopping at the next safe point", signum)
                return
            self._mode = self._FLAG  # once: a second signal must not break the way out
            log.warning("signal %d: stopping now", signum)
            raise Preempted(f"stopped on signal {signum}")

        self._previous = signal.signal(signal.SIGTERM, handler)
        return self._previous

    @contextlib.contextmanager
    def interrupting(self) -> Iterator[None]:
        """While inside, a signal raises :class:`Preempted` wherever the worker is."""
        yield from self._within(self._RAISE, "before the work started")

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """While inside, a signal waits for the loop (which checks this flag each step)."""
        yield from self._within(self._FLAG, "before training")
        if self.requested:  # arrived on the last step: its checkpoint is saved
            raise Preempted("stopped on a signal after the last step")

    def _within(self, mode: str, where: str) -> Iterator[None]:
        if self.requested:
            raise Preempted(f"stopped on a signal {where}")
        outer, self._mode = self._mode, mode
        try:
            yield
        finally:
            self._mode = outer

    def restore(self) -> None:
        previous = getattr(self, "_previous", None)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@dataclass
class PreparedTraining:
    trainer: LoraTrainer
    resolution: int
    mixed_precision: str
    gradient_checkpointing: bool
    face_weighted_photos: int = 0  # photos whose loss is face-weighted
    #: Attention modules computing q/k/v and their LoRAs fused (fused_lora.py).
    fused_attention: int = 0
    #: Regions torch.compile will compile (0: eager).
    compiled_regions: int = 0
    #: The measured memory of a step, on a GPU with checkpointing "auto" (memory.py).
    memory: MemoryPlan | None = None


def build_trainer(model: LoadedModel, config: TrainConfig, pixels: torch.Tensor,
                  face_boxes: Sequence[PixelBox | None] | None = None, *,
                  timer: PhaseTimer | None = None,
                  class_latents_source: ClassLatentsSource | None = None) -> PreparedTraining:
    """Cache latents and embeddings, attach the LoRA and make the trainer.

    ``pixels`` are the prepared photos ``[N, 3, H, W]`` in [-1, 1] at the
    training resolution; ``face_boxes`` their face boxes in those pixels (None
    entries for photos without one) for the face-weighted loss. Order matters: class images are drawn by the base
    model before any LoRA exists, and the frozen encoders leave the GPU
    before the UNet's activations need the room.

    ``timer`` gets the encoding and class-image phases; ``class_latents_source``
    (the class-image cache) replaces drawing the class images when it has them.
    """
    from .encode import (
        encode_images,
        encode_prompts,
        generate_class_latents,
        offload_frozen_encoders,
        sdxl_time_ids,
        tokenize,
    )
    from .face_loss import face_share, instance_weight_maps
    from .compilation import compile_unet, uses_cuda_graphs, want_cuda_graphs
    from .fused_lora import fuse_lora_projections
    from .memory import CudaMemoryMeter, optimizer_state_bytes, plan_memory
    from .models import add_lora, enable_gradient_checkpointing, resolve_precision

    timer = timer or PhaseTimer()
    resolution = int(pixels.shape[-1])
    mixed_precision, _ = resolve_precision(config.mixed_precision, model.device)
    with timer.phase(Phase.ENCODE):
        instance = encode_images(model, pixels, flip=config.random_flip)
    instance_weights = None
    if face_boxes is not None:
        instance_weights = instance_weight_maps(
            face_boxes, resolution, instance.mean.shape[-1], config.face_loss_weight,
            flip=config.random_flip)
    if instance_weights is not None:
        log.info("face-weighted loss: weight %g on the face of %d of %d photos, %.0f%% of "
                 "the loss's weight on faces", config.face_loss_weight,
                 sum(b is not None for b in face_boxes or ()), pixels.shape[0],
                 100 * face_share(instance_weights, face_boxes or (), resolution))
        instance_weights = instance_weights.to(model.device)
    class_latents = class_tokens = class_embeds = None
    if config.prior_preservation:

        def draw() -> LatentStats:
            return generate_class_latents(
                model, config.class_prompt, config.num_class_images, resolution,
                steps=config.sample_steps, guidance_scale=config.guidance_scale,
                seed=config.seed,
            )

        with timer.phase(Phase.CLASS_IMAGES):
            class_latents = (class_latents_source(model, config, resolution, draw)
                             if class_latents_source is not None else draw())
        with timer.phase(Phase.ENCODE):
            class_tokens = [t for t in tokenize(model, [config.class_prompt])]
            class_embeds = None if config.train_text_encoder else encode_prompts(
                model, [config.class_prompt])
    with timer.phase(Phase.ENCODE):
        instance_tokens = tokenize(model, [config.instance_prompt])
        instance_embeds = None if config.train_text_encoder else encode_prompts(
            model, [config.instance_prompt])
    offload_frozen_encoders(model, keep_text_encoders=config.train_text_encoder)
    params = add_lora(model, config)
    fused = fuse_lora_projections(model.unet) if config.fused_lora else 0
    measure = config.gradient_checkpointing == "auto" and model.device.type == "cuda"
    checkpointing = config.gradient_checkpointing == "on"
    if checkpointing:
        enable_gradient_checkpointing(model, config)
    data = TrainingData(
        instance=instance,
        instance_tokens=instance_tokens,
        instance_embeds=instance_embeds,
        class_latents=class_latents,
        class_tokens=class_tokens,
        class_embeds=class_embeds,
        time_ids=sdxl_time_ids(resolution, model.device) if model.kind == SDXL else None,
        instance_weights=instance_weights,
    )
    trainer = LoraTrainer(model, config, data, params, mixed_precision)
    plan = None
    if measure:  # eager, before compiling: what the step needs as it will train
        plan = plan_memory(trainer.probe_step,
                           lambda: enable_gradient_checkpointing(model, config),
                           CudaMemoryMeter(model.device), gpu_memory_gib=config.gpu_memory_gib,
                           extra_bytes=optimizer_state_bytes(params))
        checkpointing = plan.gradient_checkpointing
    # In place: parameter names (and so checkpoints and exports) stay the same.
    cuda_graphs = want_cuda_graphs(config.cuda_graphs, checkpointing)
    if cuda_graphs != config.cuda_graphs and config.compiles:
        log.info("CUDA graphs off: gradient checkpointing is on (compilation.want_cuda_graphs)")
    regions = compile_unet(model.unet, config.compile_mode, device=model.device,
                           cuda_graphs=cuda_graphs)
    trainer.cuda_graphs = uses_cuda_graphs(config.compile_mode, model.device, cuda_graphs)
    log.info(
        "training %s LoRA: %d photos (%d with flips), %d px, batch %d, %s, "
        "gradient checkpointing %s, prior preservation %s, %d fused attention modules, "
        "compile %s (%d regions%s)",
        model.kind, pixels.shape[0], len(instance), resolution, config.train_batch_size,
        mixed_precision, "on" if checkpointing else "off",
        "on" if class_latents is not None else "off", fused, config.compile_mode, regions,
        ", CUDA graphs" if trainer.cuda_graphs else "",
    )
    weighted = 0 if instance_weights is None else sum(b is not None for b in face_boxes or ())
    return PreparedTraining(trainer, resolution, mixed_precision, checkpointing, weighted,
                            fused_attention=fused, compiled_regions=regions, memory=plan)
