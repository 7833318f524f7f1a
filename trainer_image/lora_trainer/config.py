"""The trainer's typed configuration: the job document's hyper-parameters plus
trainer settings that the job does not carry (checkpointing, reporting, samples).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from actorgen import schema

from .errors import TrainerError

F = schema.Field

DEFAULT_CAPTION_TEMPLATE: Final = "a photo of {instance} {class_word}"
#: Prompts of the sample images in the export; ``{trigger}`` is "<instance> <class word>".
DEFAULT_SAMPLE_PROMPTS: Final = (
    "a photo of {trigger}",
    "a close-up portrait photo of {trigger}, studio lighting",
    "a photo of {trigger} smiling, outdoors, natural light",
    "an oil painting of {trigger}",
)
#: "bf16-pure": frozen weights and activations in bf16 without autocast (LoRA weights and
#: optimiser state stay fp32); fewer casts and kernel launches than "bf16" (autocast).
MIXED_PRECISION_CHOICES: Final = ("auto", "no", "fp16", "bf16", "bf16-pure")
GRADIENT_CHECKPOINTING_CHOICES: Final = ("auto", "on", "off")
#: torch.compile of the UNet: none, only its repeated blocks (compiles in a fraction of
#: the time, one cached graph per block shape), or the whole UNet (compilation.py).
COMPILE_MODES: Final = ("off", "regional", "full")
#: Face region twice as heavy as the background: about a quarter of the loss's weight
#: then falls on the face instead of a seventh (face_loss.py), while hair, shoulders
#: and backdrop still count.
DEFAULT_FACE_LOSS_WEIGHT: Final = 2.0
MAX_FACE_LOSS_WEIGHT: Final = 20.0


#: TrainConfig fields that cannot change the trained weights: identity, bookkeeping,
#: the export's samples, and speed-only switches (same maths). Every other field is in
#: the checkpoint fingerprint, so a new option is covered without touching this; add a
#: field here only when a checkpoint made under another value resumes to the same model.
#: (``sample_steps`` and ``guidance_scale`` also make the class images: not listed.)
NOT_TRAINING_FIELDS: Final = frozenset({
    "job_id", "attempt", "user_id", "actor_id",
    "checkpoint_every", "keep_checkpoints", "report_every_seconds", "min_free_disk_bytes",
    "num_samples", "gradient_checkpointing",
    # Speed and memory only: the same maths on the same parameters (fused_lora.py,
    # compilation.py, memory.py), so a checkpoint resumes under any of their values.
    "compile_mode", "cuda_graphs", "fused_lora", "gpu_memory_gib",
    # The identity score only reads the weights; its state in a checkpoint carries
    # these settings and is dropped when they differ (identity.IdentityTracker).
    "identity_checkpoints", "identity_fraction", "identity_samples", "identity_sample_steps",
    "publish_best_identity",
})


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs, resolved and validated."""

    job_id: str
    attempt: int
    user_id: str
    actor_id: str
    instance_name: str
    base_model_id: str
    class_word: str = schema.DEFAULT_CLASS_WORD
    # -- hyper-parameters from the job (schema.HYPERPARAMETERS) --
    max_train_steps: int = 800
    train_batch_size: int = 2
    learning_rate: float = 1e-4
    lora_rank: int = 16
    lora_alpha: int = 16
    resolution: int = 0  # 0: the base model's native resolution
    train_text_encoder: bool = False
    prior_preservation: bool = False
    min_snr_gamma: float = 5.0
    seed: int = 1234
    # -- trainer settings --
    caption_template: str = DEFAULT_CAPTION_TEMPLATE
    mixed_precision: str = "auto"
    gradient_checkpointing: str = "auto"
    checkpoint_every: int = 200
    keep_checkpoints: int = 1
    report_every_seconds: float = 5.0
    warmup_steps: int | None = None  # None: 5% of the steps, at most 100
    adam_weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    random_flip: bool = True
    face_margin: float = 1.0
    #: Loss weight of the face region against 1 for the rest of the photo (maps scaled
    #: to mean 1; see face_loss.py). 1.0 turns the weighting off.
    face_loss_weight: float = DEFAULT_FACE_LOSS_WEIGHT
    #: Offset noise (Guttenberg 2023): a per-channel constant of this scale added to the
    #: noise, so the LoRA can shift whole-image brightness. 0 turns it off.
    noise_offset: float = 0.0
    #: Identity score (identity.py): evaluations spread over the last ``identity_fraction``
    #: of the steps (0: off), each rendering ``identity_samples`` portraits of
    #: ``identity_sample_steps`` denoising steps; the best-scored step is published.
    identity_checkpoints: int = 3
    identity_fraction: float = 0.3
    identity_samples: int = 4
    identity_sample_steps: int = 20
    publish_best_identity: bool = True
    num_class_images: int = 50
    prior_loss_weight: float = 1.0
    num_samples: int = 4
    sample_steps: int = 30
    guidance_scale: float = 7.0
    compile_mode: str = "off"
    #: With compilation on a GPU: replay CUDA graphs (torch.compile's "reduce-overhead").
    cuda_graphs: bool = True
    #: One matmul for q/k/v (and k/v of cross-attention) and their LoRAs (fused_lora.py).
    fused_lora: bool = True
    #: GPU memory the run may use, GiB (0: the whole GPU). Gradient checkpointing "auto"
    #: turns on when a measured step does not fit (memory.py); 24 plans for an L4.
    gpu_memory_gib: float = 0.0
    min_free_disk_bytes: int = 2 * 1024**3

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise TrainerError(f"mixed precision must be one of {MIXED_PRECISION_CHOICES}")
        if self.gradient_checkpointing not in GRADIENT_CHECKPOINTING_CHOICES:
            raise TrainerError(
                f"gradient checkpointing must be one of {GRADIENT_CHECKPOINTING_CHOICES}"
            )
        if self.compile_mode not in COMPILE_MODES:
            raise TrainerError(f"compile mode must be one of {COMPILE_MODES}, "
                               f"not {self.compile_mode!r}")
        if self.gpu_memory_gib < 0:
            raise TrainerError("the GPU memory budget cannot be negative (0: the whole GPU)")
        if self.max_train_steps < 1 or self.train_batch_size < 1:
            raise TrainerError("training needs at least one step and a batch of at least one")
        if self.checkpoint_every < 1:
            raise TrainerError("checkpoint_every must be at least 1")
        if not 1.0 <= self.face_loss_weight <= MAX_FACE_LOSS_WEIGHT:
            raise TrainerError(f"the face loss weight must be between 1 (off) and "
                               f"{MAX_FACE_LOSS_WEIGHT:g}, not {self.face_loss_weight:g}")
        if not 0.0 <= self.noise_offset <= 1.0:
            raise TrainerError(f"the noise offset must be between 0 (off) and 1, "
                               f"not {self.noise_offset:g}")
        if self.identity_checkpoints < 0 or self.identity_samples < 0:
            raise TrainerError("identity checkpoints and samples cannot be negative")
        if self.identity_sample_steps < 1:
            raise TrainerError("identity samples need at least one denoising step")
        if not 0.0 < self.identity_fraction <= 1.0:
            raise TrainerError("the identity fraction must be in (0, 1]")
        if "{instance}" not in self.caption_template:
            raise TrainerError("the caption template must contain {instance}")

    @property
    def compiles(self) -> bool:
        """Whether torch.compile runs (any ``compile_mode`` but "off")."""
        return self.compile_mode != "off"

    @property
    def trigger(self) -> str:
        """The words that call the trained person up in a prompt."""
        return f"{self.instance_name} {self.class_word}"

    @property
    def instance_prompt(self) -> str:
        return self.caption_template.format(instance=self.instance_name,
                                            class_word=self.class_word)

    @property
    def class_prompt(self) -> str:
        """The instance prompt without the instance token (prior preservation)."""
        return " ".join(
            self.caption_template.format(instance="", class_word=self.class_word).split()
        )

    @property
    def resolved_warmup_steps(self) -> int:
        if self.warmup_steps is not None:
            return max(0, min(self.warmup_steps, self.max_train_steps))
        return min(100, self.max_train_steps // 20)

    def sample_prompts(self) -> list[str]:
        prompts = DEFAULT_SAMPLE_PROMPTS * math.ceil(self.num_samples / len(DEFAULT_SAMPLE_PROMPTS))
        return [p.format(trigger=self.trigger) for p in prompts[: self.num_samples]]

    def hyperparameters(self) -> dict[str, Any]:
        """The job-level hyper-parameters under their schema field names."""
        return {
            F.TRAINING_STEPS: self.max_train_steps,
            F.TRAINING_BATCH_SIZE: self.train_batch_size,
            F.LEARNING_RATE: self.learning_rate,
            F.LORA_RANK: self.lora_rank,
            F.LORA_ALPHA: self.lora_alpha,
            F.RESOLUTION: self.resolution,
            F.TRAIN_TEXT_ENCODER: self.train_text_encoder,
            F.PRIOR_PRESERVATION: self.prior_preservation,
            F.MIN_SNR_GAMMA: self.min_snr_gamma,
            F.SEED: self.seed,
            F.CLASS_WORD: self.class_word,
        }

    def training_fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint must share to be resumed: every field that can
        change training (all but :data:`NOT_TRAINING_FIELDS`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in NOT_TRAINING_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_job(
        cls,
        job_id: str,
        attempt: int,
        job: Mapping[str, Any],
        **settings: Any,
    ) -> TrainConfig:
        """Build from a ``training_jobs`` document; ``settings`` override trainer settings.

        Intake has validated and filled the hyper-parameters already; they are
        resolved again here so a document edited by hand cannot break training.
        """
        values, problems = schema.normalize_hyperparameters(job)
        if problems:
            raise TrainerError("the job's settings are invalid: " + "; ".join(problems))
        missing = [
            name
            for name in (F.USER_ID, F.ACTOR_ID, F.INSTANCE_NAME, F.BASE_MODEL_ID)
            if not job.get(name)
        ]
        if missing:
            raise TrainerError(f"the job document lacks {', '.join(missing)}")
        instance = str(job[F.INSTANCE_NAME])
        if not schema.INSTANCE_NAME_PATTERN.match(instance):
            raise TrainerError(f"the instance name {instance!r} is not valid")
        class_word = str(job.get(F.CLASS_WORD) or schema.DEFAULT_CLASS_WORD)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(settings) - fields
        if unknown:
            raise TypeError(f"unknown trainer settings: {sorted(unknown)}")
        return cls(
            job_id=job_id,
            attempt=attempt,
            user_id=str(job[F.USER_ID]),
            actor_id=str(job[F.ACTOR_ID]),
            instance_name=instance,
            base_model_id=str(job[F.BASE_MODEL_ID]),
            class_word=class_word,
            max_train_steps=values[F.TRAINING_STEPS],
            train_batch_size=values[F.TRAINING_BATCH_SIZE],
            learning_rate=values[F.LEARNING_RATE],
            lora_rank=values[F.LORA_RANK],
            lora_alpha=values[F.LORA_ALPHA],
            resolution=values[F.RESOLUTION],
            train_text_encoder=values[F.TRAIN_TEXT_ENCODER],
            prior_preservation=values[F.PRIOR_PRESERVATION],
            min_snr_gamma=values[F.MIN_SNR_GAMMA],
            seed=values[F.SEED],
            **{k: v for k, v in settings.items() if v is not None},
        )


# ---------------------------------------------------------------------------
# Cost estimates (used for the ETA before the first measured steps)
# ---------------------------------------------------------------------------
#: Forward+backward FLOPs of one LoRA (rank 16, attention) training sample at the
#: model's native resolution, measured with torch's FlopCounterMode (trainer-notes).
STEP_FLOPS_PER_SAMPLE: Final = {"sd": 1.725e12, "sdxl": 14.188e12}
#: Extra cost of recomputing activations under gradient checkpointing.
CHECKPOINTING_FACTOR: Final = {"sd": 2.317 / 1.725, "sdxl": 19.336 / 14.188}
#: Share of peak bf16 throughput the lean loop reached on an H200 (trainer-notes).
TYPICAL_UTILISATION: Final = 0.10


def step_flops(kind: str, native_resolution: int, config: TrainConfig,
               gradient_checkpointing: bool = False) -> float:
    """FLOPs of one optimisation step (batch, resolution and prior preservation included)."""
    resolution = config.resolution or native_resolution
    per_sample = STEP_FLOPS_PER_SAMPLE[kind] * (resolution / native_resolution) ** 2
    if gradient_checkpointing:
        per_sample *= CHECKPOINTING_FACTOR[kind]
    samples = config.train_batch_size * (2 if config.prior_preservation else 1)
    return per_sample * samples


def estimate_training_seconds(kind: str, native_resolution: int, config: TrainConfig,
                              peak_flops: float, *, remaining_steps: int | None = None,
                              gradient_checkpointing: bool = False) -> float:
    """A rough duration of the remaining steps on a device of ``peak_flops`` FLOP/s."""
    steps = config.max_train_steps if remaining_steps is None else remaining_steps
    achieved = peak_flops * TYPICAL_UTILISATION
    return steps * step_flops(kind, native_resolution, config, gradient_checkpointing) / achieved


#: Dense bf16 tensor throughput of common training GPUs (FLOP/s), for the first ETA.
#: Keys are whole model names: "L4" must not match "NVIDIA L40S".
PEAK_FLOPS: Final = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "T4": 65e12,
                     "V100": 125e12, "A10": 125e12, "L40": 181e12, "L40S": 362e12}
#: Assumed for a GPU the table does not know.
DEFAULT_PEAK_FLOPS: Final = 100e12


def peak_flops(device_name: str) -> float:
    """Peak bf16 FLOP/s of the GPU that CUDA calls ``device_name`` (e.g. "NVIDIA L4").

    Matched word by word ("NVIDIA A100-SXM4-40GB" is an A100), never by substring.
    """
    for word in re.split(r"[\s_-]+", device_name.upper()):
        if word in PEAK_FLOPS:
            return PEAK_FLOPS[word]
    return DEFAULT_PEAK_FLOPS
