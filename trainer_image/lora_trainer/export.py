"""Exporting the trained LoRA: diffusers and kohya safetensors, samples, model
card and training config, uploaded under ``schema.model_prefix``.
"""

from __future__ import annotations

import json
import logging
import mimetypes
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from actorgen import schema

from .config import TrainConfig
from .encode import restore_encoders
from .models import SDXL, BaseModelInfo, LoadedModel, lora_modules

log = logging.getLogger(__name__)
A = schema.ArtifactName
SDXL_KOHYA_BASE_VERSION = "sdxl_base_v1-0"


def _peft_state(module: Any) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    state = {k: v.detach().float().cpu().contiguous()
             for k, v in get_peft_model_state_dict(module).items()}
    if _is_flat_clip(module):
        # transformers 5 dropped CLIPTextModel's ``text_model`` level; files in
        # the wild (and A1111/ComfyUI, and transformers 4) name it. Write the
        # canonical names; transformers 5 maps them back when loading.
        state = {f"text_model.{k}": v for k, v in state.items()}
    return state


def _is_flat_clip(module: Any) -> bool:
    return type(module).__name__.startswith("CLIPText") and not hasattr(module, "text_model")


def save_diffusers_lora(model: LoadedModel, config: TrainConfig, out_dir: Path) -> Path:
    """diffusers/PEFT format with the adapter metadata (so alpha != rank survives loading)."""
    from diffusers.training_utils import _collate_lora_metadata
    from diffusers.utils import convert_state_dict_to_diffusers

    modules = lora_modules(model, config)
    layers = {
        f"{name}_lora_layers": convert_state_dict_to_diffusers(_peft_state(module))
        for name, module in modules.items()
    }
    metadata = _collate_lora_metadata(modules)
    type(model.pipeline).save_lora_weights(
        out_dir, weight_name=A.LORA_DIFFUSERS, safe_serialization=True, **layers, **metadata
    )
    return out_dir / A.LORA_DIFFUSERS


def kohya_state_dict(model: LoadedModel, config: TrainConfig) -> dict[str, torch.Tensor]:
    """The LoRA in kohya-ss naming (``lora_unet_...``, ``lora_te_...``; SDXL: ``lora_te1_``/``lora_te2_``)
    as A1111/ComfyUI read it.

    diffusers' converter writes ``alpha = rank`` for every module; the real
    alpha is written instead, or the LoRA would load at the wrong strength.
    """
    from diffusers.utils import convert_state_dict_to_kohya

    peft: dict[str, torch.Tensor] = {}
    for name, module in lora_modules(model, config).items():
        peft.update({f"{name}.{k}": v for k, v in _peft_state(module).items()})
    kohya = convert_state_dict_to_kohya(peft)
    if model.kind != SDXL:
        # diffusers names the one text encoder lora_te1_ (SDXL's first of two); kohya-ss
        # and A1111 name SD 1.x/2.x's lora_te_, and A1111 maps only that onto SD 2.
        kohya = {("lora_te_" + key[len("lora_te1_"):] if key.startswith("lora_te1_") else key):
                 value for key, value in kohya.items()}
    alpha = torch.tensor(float(config.lora_alpha))
    return {
        key: (alpha.clone() if key.endswith(".alpha") else value.to(torch.float16)).contiguous()
        for key, value in kohya.items()
    }


def save_kohya_lora(model: LoadedModel, config: TrainConfig, out_dir: Path) -> Path:
    from safetensors.torch import save_file

    path = out_dir / A.LORA_KOHYA
    save_file(kohya_state_dict(model, config), str(path),
              metadata=kohya_metadata(model.info, config))
    return path


def kohya_metadata(info: BaseModelInfo, config: TrainConfig) -> dict[str, str]:
    """The ``ss_*`` metadata of the kohya file, as kohya-ss's train_network writes it.

    AUTOMATIC1111 files a LoRA as SD 2 only when ``ss_v2`` is "True" (and as SDXL
    when ``ss_base_model_version`` starts with "sdxl_"); a mislabelled one is hidden
    on the checkpoints it belongs to.
    """
    v_pred = info.prediction_type == "v_prediction"
    if info.kind == SDXL:
        version = SDXL_KOHYA_BASE_VERSION
    else:  # kohya-ss: sd_v1 / sd_v2, "_v" added for v-prediction
        version = ("sd_v2" if info.is_sd2 else "sd_v1") + ("_v" if v_pred else "")
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.lora_rank),
        "ss_network_alpha": str(config.lora_alpha),
        "ss_base_model_version": version,
        "ss_v2": str(info.is_sd2),
        "ss_v_parameterization": str(v_pred),
        "ss_sd_model_name": config.base_model_id,
        "ss_output_name": config.instance_name,
        "ss_tag_frequency": json.dumps({config.instance_name: {config.trigger: 1}}),
        "ss_resolution": str(config.resolution or info.native_resolution),
        "ss_training_comment": f"trigger words: {config.trigger}",
    }


@torch.no_grad()
def render_samples(model: LoadedModel, config: TrainConfig, resolution: int,
                   out_dir: Path) -> list[Path]:
    """A few images with the LoRA, one fixed seed per prompt (comparable across versions)."""
    restore_encoders(model)
    model.unet.eval()
    paths = []
    sample_dir = out_dir / A.SAMPLES_DIR
    sample_dir.mkdir(parents=True, exist_ok=True)
    for index, prompt in enumerate(config.sample_prompts()):
        image = render_image(model, prompt, config.seed + index, resolution,
                             steps=config.sample_steps, guidance_scale=config.guidance_scale)
        path = sample_dir / f"sample-{index:02d}.png"
        image.save(path, pnginfo=_png_text({"prompt": prompt, "seed": str(config.seed + index)}))
        paths.append(path)
    return paths


@torch.no_grad()
def render_image(model: LoadedModel, prompt: str, seed: int, resolution: int, *, steps: int,
                 guidance_scale: float) -> Any:
    """One image (PIL) of ``prompt`` drawn from ``seed`` with the model as it is now.

    The VAE and text encoders must be on the model's device (``restore_encoders``).
    """
    pipeline = model.pipeline
    scale = model.vae.config.scaling_factor
    shift = getattr(model.vae.config, "shift_factor", None) or 0.0
    generator = torch.Generator(model.device).manual_seed(seed)
    latents = pipeline(
        prompt=prompt,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        height=resolution,
        width=resolution,
        generator=generator,
        output_type="latent",
    ).images
    # Decode in the VAE's fp32 ourselves (the pipelines' own decode
    # expects the VAE in the UNet's dtype).
    decoded = model.vae.decode(latents.to(model.vae.dtype) / scale + shift).sample
    return pipeline.image_processor.postprocess(decoded, output_type="pil")[0]


def _png_text(items: Mapping[str, str]) -> Any:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in items.items():
        info.add_text(key, value)
    return info


def model_card(model: LoadedModel, config: TrainConfig, metrics: Mapping[str, Any],
               samples: list[Path], copies: Sequence[str] = ()) -> str:
    """README.md in the Hugging Face model card format.

    ``copies`` says where the files were put (one markdown line each): a face LoRA's
    owner must be able to see every place it went.
    """
    family = "stable-diffusion-xl" if model.kind == SDXL else "stable-diffusion"
    hyper = "\n".join(f"| {k} | {v} |" for k, v in config.hyperparameters().items())
    from .identity import card_section

    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in metrics.items()
                     if not isinstance(v, Mapping))
    sample_list = "\n".join(
        f"- `{A.SAMPLES_DIR}{p.name}`: \"{prompt}\" (seed {config.seed + i})"
        for i, (p, prompt) in enumerate(zip(samples, config.sample_prompts(), strict=False))
    )
    pipeline_class = type(model.pipeline).__name__
    return f"""---
base_model: {config.base_model_id}
library_name: diffusers
tags:
- text-to-image
- {family}
- lora
- diffusers
- dreambooth
instance_prompt: {config.trigger}
---

# {config.instance_name}: a person LoRA for {config.base_model_id}

Trigger words: **`{config.trigger}`**, e.g. "{config.sample_prompts()[0]}".

A rank-{config.lora_rank} LoRA (alpha {config.lora_alpha}) on the UNet attention
projections{" and the text encoders" if config.train_text_encoder else ""}, trained with
DreamBooth-LoRA on {config.resolution or model.info.native_resolution} px face-centred crops
of the person's photos{_training_extras(config)}.

## Where copies are kept

{chr(10).join(f"- {line}" for line in copies) or "- (not recorded)"}

## Files

- `{A.LORA_DIFFUSERS}`: diffusers/PEFT format, with the adapter metadata (alpha).
- `{A.LORA_KOHYA}`: kohya format for AUTOMATIC1111 and ComfyUI
  (`<lora:{Path(A.LORA_KOHYA).stem}:1>` plus the trigger words).
- `{A.TRAINING_CONFIG}`: every setting of the run.

## Use with diffusers

```python
import torch
from diffusers import {pipeline_class}

pipe = {pipeline_class}.from_pretrained("{config.base_model_id}", torch_dtype=torch.float16)
pipe.load_lora_weights(".", weight_name="{A.LORA_DIFFUSERS}")
image = pipe("{config.sample_prompts()[0]}").images[0]
```

## Hyper-parameters

| setting | value |
| --- | --- |
{hyper}

## Metrics

| metric | value |
| --- | --- |
{rows}

{card_section(metrics.get("identity"))}
## Samples

{sample_list or "(none rendered)"}
"""


def _training_extras(config: TrainConfig) -> str:
    extras = []
    if config.face_loss_weight != 1.0:
        extras.append(f"the loss on the face weighted {config.face_loss_weight:g} times the "
                      "background's")
    if config.noise_offset > 0:
        extras.append(f"offset noise {config.noise_offset:g}")
    return (", with " + " and ".join(extras)) if extras else ""


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def training_config_json(model: LoadedModel, config: TrainConfig,
                         metrics: Mapping[str, Any], extra: Mapping[str, Any]) -> str:
    import accelerate
    import diffusers
    import peft
    import transformers

    return json.dumps({
        "schemaVersion": schema.SCHEMA_VERSION,
        "config": config.to_dict(),
        "hyperparameters": config.hyperparameters(),
        "baseModel": asdict(model.info),
        "metrics": dict(metrics),
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
        },
        **extra,
    }, indent=2, sort_keys=True, default=str)


def upload_artifacts(bucket: Any, prefix: str, out_dir: Path) -> dict[str, str]:
    """Upload every file under ``out_dir`` to ``prefix``; ``{relative name: object path}``."""
    artifacts = {}
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file()):
        name = path.relative_to(out_dir).as_posix()
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if path.suffix == ".md":
            content_type = "text/markdown"
        blob = bucket.blob(prefix + name)
        blob.upload_from_filename(str(path), content_type=content_type)
        artifacts[name] = prefix + name
    return artifacts
