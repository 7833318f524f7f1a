"""Encoding once what stays fixed during training: photo latents, prompt embeddings
and, for prior preservation, latents of generated class images.

The VAE and (unless their LoRA is trained) the text encoders are frozen, so
running them every step would only burn time; after this step they can leave
the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .models import SDXL, LoadedModel

VAE_BATCH = 4


@dataclass
class PromptEmbeds:
    """Text conditioning for the UNet: ``hidden`` [n, L, D] and SDXL's ``pooled`` [n, P]."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def repeat(self, counts: int) -> PromptEmbeds:
        """Each row ``counts`` times (row order kept: a a b b for counts=2)."""
        pooled = None if self.pooled is None else self.pooled.repeat_interleave(counts, 0)
        return PromptEmbeds(self.hidden.repeat_interleave(counts, 0), pooled)


@dataclass
class LatentStats:
    """The VAE posterior of each image in the UNet's (scaled) latent space.

    A step draws ``mean + std * noise`` like the VAE would, without the VAE.
    Generated class latents have ``std`` zero.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __len__(self) -> int:
        return self.mean.shape[0]

    def to(self, device: torch.device) -> LatentStats:
        return LatentStats(self.mean.to(device), self.std.to(device))


def tokenize(model: LoadedModel, prompts: Sequence[str]) -> list[torch.Tensor]:
    """Token ids ``[n, max_length]`` for each of the model's tokenizers, on its device."""
    ids = []
    for tokenizer in model.tokenizers:
        batch = tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids.append(batch.input_ids.to(model.device))
    return ids


def encode_tokens(model: LoadedModel, token_ids: Sequence[torch.Tensor]) -> PromptEmbeds:
    """Run the text encoder(s) the way the diffusers pipelines do (no clip skip).

    SD: the last hidden state. SDXL: the penultimate hidden states of both
    encoders side by side, and the second encoder's projected pooled output.
    """
    if model.kind != SDXL:
        encoder = model.text_encoders[0]
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = (token_ids[0] != model.tokenizers[0].pad_token_id).long()
        return PromptEmbeds(encoder(token_ids[0], attention_mask=mask)[0])
    hidden, pooled = [], None
    for encoder, ids in zip(model.text_encoders, token_ids, strict=True):
        out = encoder(ids, output_hidden_states=True)
        pooled = out[0]  # text_embeds of CLIPTextModelWithProjection (the last encoder)
        hidden.append(out.hidden_states[-2])
    return PromptEmbeds(torch.cat(hidden, dim=-1), pooled)


@torch.no_grad()
def encode_prompts(model: LoadedModel, prompts: Sequence[str]) -> PromptEmbeds:
    return encode_tokens(model, tokenize(model, prompts))


@torch.no_grad()
def encode_images(model: LoadedModel, pixels: torch.Tensor, *, flip: bool) -> LatentStats:
    """VAE posterior of ``pixels`` ([N,3,H,W] in [-1,1]); with ``flip`` also of their mirrors."""
    vae = model.vae
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    if flip:
        pixels = torch.cat([pixels, torch.flip(pixels, dims=[3])])
    means, stds = [], []
    for start in range(0, pixels.shape[0], VAE_BATCH):
        chunk = pixels[start : start + VAE_BATCH].to(model.device, dtype=vae.dtype)
        dist = vae.encode(chunk).latent_dist
        means.append((dist.mean - shift) * scale)
        stds.append(dist.std * scale)
    return LatentStats(torch.cat(means).float(), torch.cat(stds).float())


@torch.no_grad()
def generate_class_latents(model: LoadedModel, prompt: str, count: int, resolution: int,
                           *, steps: int, guidance_scale: float, seed: int,
                           batch_size: int = 4) -> LatentStats:
    """Latents of ``count`` images of the class drawn by the base model itself.

    Prior preservation trains on these so that "a photo of a person" keeps
    meaning people in general. The pipeline's latent output is already in the
    UNet's space, so there is no decode/encode round trip.
    """
    generator = torch.Generator(model.device).manual_seed(seed)
    latents = []
    for start in range(0, count, batch_size):
        n = min(batch_size, count - start)
        out = model.pipeline(
            prompt=[prompt] * n,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=resolution,
            width=resolution,
            generator=generator,
            output_type="latent",
        )
        latents.append(out.images.float())
    mean = torch.cat(latents)
    return LatentStats(mean, torch.zeros_like(mean))


def sdxl_time_ids(resolution: int, device: torch.device) -> torch.Tensor:
    """SDXL micro-conditioning ``[1, 6]``: original size, crop top-left, target size.

    The photos are cropped and resized by the trainer itself, so the original
    and target size are the training resolution and the crop is at (0, 0).
    """
    return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]],
                        dtype=torch.float32, device=device)


def offload_frozen_encoders(model: LoadedModel, keep_text_encoders: bool) -> None:
    """Move the VAE (and text encoders unless trained) off the GPU after caching."""
    if model.device.type != "cuda":
        return
    model.vae.to("cpu")
    if not keep_text_encoders:
        for encoder in model.text_encoders:
            encoder.to("cpu")
    torch.cuda.empty_cache()


def restore_encoders(model: LoadedModel) -> None:
    """Bring everything back to the device (for rendering samples)."""
    model.vae.to(model.device)
    for encoder in model.text_encoders:
        encoder.to(model.device)
