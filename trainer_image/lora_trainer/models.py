"""Loading the base model and attaching LoRA adapters.

The model family (SD 1.x/2.x or SDXL), its prediction type and its native
resolution come from the model's own config files, never from its name, so a
hub id in production and a local folder in tests go through the same code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Final

import torch

from .config import TrainConfig
from .errors import ModelLoadError

log = logging.getLogger(__name__)

SD: Final = "sd"
SDXL: Final = "sdxl"
#: Attention projections of the diffusers UNet (the seed's "q", "k", "v" do not exist).
UNET_LORA_TARGETS: Final = ("to_q", "to_k", "to_v", "to_out.0")
#: Attention projections of the CLIP text encoders.
TEXT_ENCODER_LORA_TARGETS: Final = ("q_proj", "k_proj", "v_proj", "out_proj")
SUPPORTED_PIPELINES: Final = {
    "StableDiffusionPipeline": SD,
    "StableDiffusionXLPipeline": SDXL,
}
PREDICTION_TYPES: Final = ("epsilon", "v_prediction")
SD2_CROSS_ATTENTION_DIM: Final = 1024


@dataclass(frozen=True)
class BaseModelInfo:
    """What the base model's config files say about it."""

    model_id: str
    kind: str  # SD or SDXL
    pipeline_class: str
    prediction_type: str
    native_resolution: int
    vae_scale_factor: int
    #: Width of the text embedding the UNet attends to: 768 for SD 1.x (CLIP ViT-L),
    #: 1024 for SD 2.x (OpenCLIP ViT-H); 0 when unknown.
    cross_attention_dim: int = 0

    @property
    def is_sd2(self) -> bool:
        """An SD 2.x model: its LoRAs do not fit SD 1.x (and A1111 tells them apart)."""
        return self.kind == SD and self.cross_attention_dim == SD2_CROSS_ATTENTION_DIM


@dataclass
class LoadedModel:
    """The base pipeline's parts, placed for training."""

    info: BaseModelInfo
    pipeline: Any  # StableDiffusionPipeline or StableDiffusionXLPipeline
    device: torch.device
    weight_dtype: torch.dtype
    noise_scheduler: Any  # DDPMScheduler from the model's scheduler config
    text_encoders: list[Any] = field(default_factory=list)
    tokenizers: list[Any] = field(default_factory=list)

    @property
    def unet(self) -> Any:
        return self.pipeline.unet

    @property
    def vae(self) -> Any:
        return self.pipeline.vae

    @property
    def kind(self) -> str:
        return self.info.kind


def resolve_precision(requested: str, device: torch.device) -> tuple[str, torch.dtype]:
    """(accelerate mixed_precision, dtype of frozen weights) for ``requested`` on ``device``.

    ``auto`` is pure bf16 (bf16 frozen weights without autocast) where the GPU
    supports bf16, fp16 autocast (with loss scaling) on older GPUs, and fp32 on
    the CPU, where half precision is slow and fp16 autocast is unsupported.
    """
    if requested == "auto":
        if device.type != "cuda":
            requested = "no"
        elif torch.cuda.is_bf16_supported():
            # Measured on an H200 (docs/trainer.md): 18% more samples/s than bf16
            # autocast, with the same loss curve; LoRA weights stay fp32 either way.
            requested = "bf16-pure"
        else:
            requested = "fp16"
    if requested == "fp16" and device.type != "cuda":
        raise ModelLoadError("fp16 mixed precision needs a CUDA GPU")
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
             "bf16-pure": torch.bfloat16}[requested]
    return requested, dtype


def import_libraries() -> None:
    """Import diffusers', transformers' and peft's classes now (several seconds, lazily
    loaded on first use otherwise), so that the job's timings show them as imports
    rather than inside the first phase that touches them."""
    import peft  # noqa: F401
    from diffusers import (  # noqa: F401
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def inspect_base_model(model_id: str, token: str | None = None, *,
                       source: str | None = None) -> BaseModelInfo:
    """Read model_index.json and the unet/scheduler/vae configs of ``model_id``.

    ``token``: Hugging Face token for gated or private hub models (never logged).
    ``source``: a folder holding ``model_id``'s files (a cached snapshot), read
    instead of the hub id; messages still name ``model_id``.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

    where = source or model_id
    try:
        index = DiffusionPipeline.load_config(where, token=token)
        unet_config = UNet2DConditionModel.load_config(where, subfolder="unet", token=token)
        scheduler_config = DDPMScheduler.load_config(where, subfolder="scheduler",
                                                     token=token)
        vae_config = AutoencoderKL.load_config(where, subfolder="vae", token=token)
    except Exception as err:  # noqa: BLE001 - every cause means the same to the user
        # No chained cause: hub-client messages can carry request headers (the token),
        # and a logged traceback would print the cause unredacted.
        raise ModelLoadError(
            f"could not read the base model {model_id!r}: {_first_line(err, token)}"
        ) from None
    class_name = str(index.get("_class_name", ""))
    kind = SUPPORTED_PIPELINES.get(class_name)
    if unet_config.get("addition_embed_type") == "text_time":
        kind = SDXL  # an SDXL UNet whatever the pipeline class is called
    if kind is None:
        raise ModelLoadError(
            f"the base model {model_id!r} is a {class_name or 'unknown pipeline'}; only "
            "Stable Diffusion 1.x/2.x and SDXL base models are supported"
        )
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ModelLoadError(
            f"the base model's scheduler predicts {prediction_type!r}; "
            f"supported: {', '.join(PREDICTION_TYPES)}"
        )
    vae_scale = 2 ** (len(vae_config.get("block_out_channels", (0, 0, 0, 0))) - 1)
    native = int(unet_config.get("sample_size", 64)) * vae_scale
    return BaseModelInfo(
        model_id=model_id,
        kind=kind,
        pipeline_class=class_name,
        prediction_type=prediction_type,
        native_resolution=native,
        vae_scale_factor=vae_scale,
        cross_attention_dim=_cross_attention_dim(unet_config),
    )


def _cross_attention_dim(unet_config: Any) -> int:
    value = unet_config.get("cross_attention_dim")
    if isinstance(value, (list, tuple)):  # per block in some configs: all the same here
        value = value[0] if value else 0
    return int(value or 0)


def load_base_model(config: TrainConfig, device: torch.device | None = None,
                    mixed_precision: str | None = None, *,
                    token: str | None = None, source: str | None = None) -> LoadedModel:
    """Load the pipeline with frozen weights in the training dtype (VAE in fp32).

    ``token`` (Hugging Face, for gated base models) goes to every
    ``from_pretrained``/``load_config`` of the base model; it is never logged.
    ``source``: a local folder with the base model's files (see base_model_cache).
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    device = device or default_device()
    _, weight_dtype = resolve_precision(mixed_precision or config.mixed_precision, device)
    info = inspect_base_model(config.base_model_id, token=token, source=source)
    where = source or config.base_model_id
    # One progress bar in the log is the training's; loading has its own log lines.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        # The VAE only encodes the photos once and decodes the samples: fp32
        # avoids the SDXL VAE's fp16 overflow and costs nothing per step.
        vae = AutoencoderKL.from_pretrained(
            where, subfolder="vae", dtype=torch.float32, token=token
        )
        if info.kind == SDXL:
            pipeline = StableDiffusionXLPipeline.from_pretrained(
                where, vae=vae, dtype=weight_dtype, token=token
            )
        else:
            pipeline = StableDiffusionPipeline.from_pretrained(
                where,
                vae=vae,
                dtype=weight_dtype,
                token=token,
                # The samples are of the user's own face; no NSFW classifier
                # weights are needed for training.
                safety_checker=None,
                requires_safety_checker=False,
            )
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(
            f"could not load the base model {config.base_model_id!r}: "
            f"{_first_line(err, token)}"
        ) from None  # see inspect_base_model: the cause may hold the token
    return prepare_pipeline(pipeline, info, device, weight_dtype)


def info_from_pipeline(pipeline: Any, model_id: str = "<in memory>") -> BaseModelInfo:
    """:class:`BaseModelInfo` of a pipeline built in memory (the benchmark)."""
    unet_config = pipeline.unet.config
    kind = SDXL if unet_config.get("addition_embed_type") == "text_time" else SD
    vae_scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    return BaseModelInfo(
        model_id=model_id,
        kind=kind,
        pipeline_class=type(pipeline).__name__,
        prediction_type=pipeline.scheduler.config.get("prediction_type", "epsilon"),
        native_resolution=int(unet_config.sample_size) * vae_scale,
        vae_scale_factor=vae_scale,
        cross_attention_dim=_cross_attention_dim(unet_config),
    )


def prepare_pipeline(pipeline: Any, info: BaseModelInfo, device: torch.device,
                     weight_dtype: torch.dtype) -> LoadedModel:
    """Freeze everything, move it to ``device`` and use SDPA attention."""
    from diffusers import DDPMScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipeline.unet.requires_grad_(False)
    pipeline.vae.requires_grad_(False)
    text_encoders = [pipeline.text_encoder]
    tokenizers = [pipeline.tokenizer]
    if info.kind == SDXL:
        text_encoders.append(pipeline.text_encoder_2)
        tokenizers.append(pipeline.tokenizer_2)
    for encoder in text_encoders:
        encoder.requires_grad_(False)
        _place(encoder, device, weight_dtype)
    _place(pipeline.unet, device, weight_dtype)
    _place(pipeline.vae, device, torch.float32)
    # torch's fused scaled-dot-product attention (flash / memory-efficient kernels).
    pipeline.unet.set_attn_processor(AttnProcessor2_0())
    if device.type == "cuda":
        # NHWC convolutions are faster on tensor cores (measured ~5% on an H200).
        pipeline.unet.to(memory_format=torch.channels_last)
        # Shapes are fixed for the whole run: let cuDNN pick the fastest kernels.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    pipeline.set_progress_bar_config(disable=True)
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    return LoadedModel(
        info=info,
        pipeline=pipeline,
        device=device,
        weight_dtype=weight_dtype,
        noise_scheduler=noise_scheduler,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
    )


def _place(module: Any, device: torch.device, dtype: torch.dtype) -> None:
    # Cast only when needed: diffusers warns on any dtype cast with .to().
    if module.dtype != dtype:
        module.to(device, dtype=dtype)
    else:
        module.to(device)


def add_lora(model: LoadedModel, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Attach LoRA adapters (fp32 parameters on frozen low-precision weights).

    Returns the trainable parameters.
    """
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    # The gaussian init of lora_A draws from the global RNG: seed it so the
    # same job starts from the same weights on every machine and retry.
    torch.manual_seed(config.seed)
    model.unet.add_adapter(
        LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            init_lora_weights="gaussian",
            target_modules=list(UNET_LORA_TARGETS),
        )
    )
    modules = [model.unet]
    if config.train_text_encoder:
        for encoder in model.text_encoders:
            encoder.add_adapter(
                LoraConfig(
                    r=config.lora_rank,
                    lora_alpha=config.lora_alpha,
                    init_lora_weights="gaussian",
                    target_modules=list(TEXT_ENCODER_LORA_TARGETS),
                )
            )
            modules.append(encoder)
    # Optimiser state and updates of size lr*grad vanish in bf16: keep the
    # small set of trainable weights in fp32.
    cast_training_params(modules, dtype=torch.float32)
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if not params:
        raise ModelLoadError("no LoRA target modules were found in the base model's UNet")
    return params


def lora_modules(model: LoadedModel, config: TrainConfig) -> dict[str, Any]:
    """The modules carrying LoRA adapters, by their pipeline component name."""
    modules = {"unet": model.unet}
    if config.train_text_encoder:
        modules["text_encoder"] = model.text_encoders[0]
        if model.kind == SDXL:
            modules["text_encoder_2"] = model.text_encoders[1]
    return modules


def enable_gradient_checkpointing(model: LoadedModel, config: TrainConfig) -> None:
    model.unet.enable_gradient_checkpointing()
    if config.train_text_encoder:
        for encoder in model.text_encoders:
            encoder.gradient_checkpointing_enable()


def _first_line(err: BaseException, secret: str | None = None) -> str:
    text = str(err).strip()
    if secret:  # the message goes to the job document and the log
        text = text.replace(secret, "***")
    return (text.splitlines()[0] if text else type(err).__name__)[:500]
