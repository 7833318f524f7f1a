"""Stable Diffusion shaped pipelines with random weights, built from configs.

No weights can be downloaded where this project is tested, and the GPU
benchmark machine has no network either. This module builds SD 1.x- and
SDXL-shaped pipelines from their configs, either tiny (for tests and the local
demo: a CPU trains them in seconds) or full-size (for the benchmark: the same
layer shapes and FLOPs as the real models). Saved with ``save_pretrained``
they load through exactly the ``from_pretrained`` path that production uses.

Usage: ``python -m lora_trainer.synthetic --kind sd --size tiny OUT_DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import torch

KINDS: Final = ("sd", "sdxl")
SIZES: Final = ("tiny", "full")
CLIP_MAX_LENGTH: Final = 77
BOS_TOKEN: Final = "<|startoftext|>"
EOS_TOKEN: Final = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte -> printable character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def byte_level_vocab() -> dict[str, int]:
    """A 514-token CLIP vocabulary: every byte, every byte ending a word, BOS, EOS.

    With no merges every word is spelled out byte by byte; that is enough for a
    model with random weights and keeps every id below 514.
    """
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab


def make_tokenizer() -> Any:
    """A CLIPTokenizer over :func:`byte_level_vocab` (ids as the real one pads and ends)."""
    from transformers import CLIPTokenizer

    # transformers does not restore model_max_length from tokenizer.json; the
    # pipelines pad to it, so it must be set (and it is saved in tokenizer_config.json).
    return CLIPTokenizer(byte_level_vocab(), [], model_max_length=CLIP_MAX_LENGTH)


def _clip_config(size: str, *, hidden: int, layers: int, heads: int, projection: int,
                 act: str = "quick_gelu") -> Any:
    from transformers import CLIPTextConfig

    vocab = byte_level_vocab()
    if size == "tiny":
        hidden, layers, heads, projection = 32, 2, 4, 32
    return CLIPTextConfig(
        # Full-size encoders keep CLIP's real vocabulary size (embedding shapes
        # and memory); the byte-level tokenizer only ever uses the first 514 ids.
        vocab_size=len(vocab) if size == "tiny" else 49408,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection,
        hidden_act=act,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
    )


def unet_config(kind: str, size: str) -> dict[str, Any]:
    """UNet2DConditionModel config of SD 1.5 / SDXL base, or a tiny one of the same family."""
    if kind == "sd" and size == "full":
        return dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
    if kind == "sd":
        return dict(
            sample_size=8,  # 64 px through the 8x VAE
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        )
    if size == "full":
        return dict(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,  # 768 (CLIP-L) + 1280 (OpenCLIP bigG)
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,  # 6 * 256 + 1280
        )
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1),
        attention_head_dim=(2, 4),
        cross_attention_dim=64,  # 32 + 32
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=8,
    )


def vae_config(kind: str, size: str) -> dict[str, Any]:
    channels = (128, 256, 512, 512) if size == "full" else (8, 16, 16, 16)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 4 blocks: 8x downsampling
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels,
        layers_per_block=2 if size == "full" else 1,
        latent_channels=4,
        norm_num_groups=32 if size == "full" else 8,
        sample_size=1024 if kind == "sdxl" else 512,
        scaling_factor=0.13025 if kind == "sdxl" else 0.18215,
        force_upcast=kind == "sdxl",
    )


def scheduler_config(kind: str, prediction_type: str = "epsilon") -> dict[str, Any]:
    common = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        prediction_type=prediction_type,
    )
    if kind == "sdxl":
        return dict(common, timestep_spacing="leading")
    return dict(common, skip_prk_steps=True, set_alpha_to_one=False)


@contextlib.contextmanager
def _default_device(device: torch.device | str | None) -> Iterator[None]:
    # Constructing directly on the GPU makes random init of a 2.6B UNet take
    # seconds instead of minutes on the host.
    if device is None:
        yield
    else:
        with torch.device(device):
            yield


def build_pipeline(
    kind: str = "sd",
    size: str = "tiny",
    *,
    prediction_type: str = "epsilon",
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Any:
    """A StableDiffusion(XL)Pipeline with random weights (fp32) shaped like ``kind``/``size``."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if kind not in KINDS or size not in SIZES:
        raise ValueError(f"kind must be one of {KINDS} and size one of {SIZES}")
    torch.manual_seed(seed)
    with _default_device(device):
        unet = UNet2DConditionModel(**unet_config(kind, size))
        vae = AutoencoderKL(**vae_config(kind, size))
        text_encoder = CLIPTextModel(
            _clip_config(size, hidden=768, layers=12, heads=12, projection=768)
        )
        if kind == "sdxl":
            text_encoder_2 = CLIPTextModelWithProjection(
                _clip_config(size, hidden=1280, layers=32, heads=20, projection=1280, act="gelu")
            )
    # Schedulers hold small tables that belong on the host.
    if kind == "sd":
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=make_tokenizer(),
            unet=unet,
            scheduler=PNDMScheduler(**scheduler_config(kind, prediction_type)),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    scheduler = EulerDiscreteScheduler(**scheduler_config(kind, prediction_type))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=make_tokenizer(),
        tokenizer_2=make_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )


def build_lora_unet(kind: str, size: str, *, rank: int, alpha: int,
                    overrides: dict[str, Any] | None = None,
                    dtype: torch.dtype = torch.float32) -> Any:
    """A random-weight UNet of this family with the trainer's LoRA adapter.

    Frozen base weights in ``dtype``, fp32 LoRA weights, diffusers' SDPA processor:
    the UNet alone, for op counts and processor tests. ``overrides`` change the config.
    Builds on the current default device (e.g. inside ``with torch.device("meta")``).
    """
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from peft import LoraConfig

    from .models import UNET_LORA_TARGETS

    unet = UNet2DConditionModel(**{**unet_config(kind, size), **(overrides or {})}).to(dtype)
    unet.requires_grad_(False)
    unet.set_attn_processor(AttnProcessor2_0())
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=list(UNET_LORA_TARGETS)))
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return unet


def save_synthetic_model(
    path: str | Path,
    kind: str = "sd",
    size: str = "tiny",
    *,
    prediction_type: str = "epsilon",
    seed: int = 0,
) -> Path:
    """Build a pipeline and ``save_pretrained`` it to ``path``; returns the folder."""
    path = Path(path)
    pipeline = build_pipeline(kind, size, prediction_type=prediction_type, seed=seed)
    pipeline.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--kind", choices=KINDS, default="sd")
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                        default="epsilon")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = save_synthetic_model(args.out_dir, args.kind, args.size,
                               prediction_type=args.prediction_type, seed=args.seed)
    print(out)


if __name__ == "__main__":
    main()
