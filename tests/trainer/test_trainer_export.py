"""Exported LoRA files load into a fresh pipeline and act like the trained adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from actorgen import schema
from lora_trainer import export, models, training
from lora_trainer.config import TrainConfig
from lora_trainer.encode import encode_prompts
from safetensors import safe_open

A = schema.ArtifactName


def _train(base: Path, pixels: torch.Tensor, **kw: object) -> tuple[TrainConfig, object]:
    settings: dict[str, object] = dict(learning_rate=5e-3, max_train_steps=15, num_samples=2,
                                       sample_steps=2)
    settings.update(kw)
    config = TrainConfig(job_id="j", attempt=1, user_id="u", actor_id="a", instance_name="sks",
                         base_model_id=str(base), **settings)  # type: ignore[arg-type]
    model = models.load_base_model(config, torch.device("cpu"))
    trainer = training.build_trainer(model, config, pixels).trainer
    trainer.run(config.max_train_steps, report_every_seconds=1e9, progress_bar=False)
    return config, model


def _unet_output(pipeline: object, prompt: str) -> torch.Tensor:
    """The UNet's prediction for fixed noise, through the pipeline's own text encoders."""
    info = models.info_from_pipeline(pipeline)
    model = models.prepare_pipeline(pipeline, info, torch.device("cpu"), torch.float32)
    embeds = encode_prompts(model, [prompt])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    added = None
    if info.kind == models.SDXL:
        time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])
        added = {"text_embeds": embeds.pooled, "time_ids": time_ids}
    with torch.no_grad():
        return model.unet(x, torch.tensor([500]), encoder_hidden_states=embeds.hidden,
                          added_cond_kwargs=added).sample


@pytest.mark.parametrize(("fixture", "text_encoder"),
                         [("tiny_sd", False), ("tiny_sd", True), ("tiny_sdxl", True)])
def test_both_formats_load_with_load_lora_weights_and_match(
        fixture: str, text_encoder: bool, face_pixels: torch.Tensor,
        request: pytest.FixtureRequest, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    base: Path = request.getfixturevalue(fixture)
    # alpha != rank: a loader that ignored the metadata would scale the LoRA wrongly.
    config, model = _train(base, face_pixels, lora_rank=4, lora_alpha=16,
                           train_text_encoder=text_encoder)
    diffusers_file = export.save_diffusers_lora(model, config, tmp_path)  # type: ignore[arg-type]
    kohya_file = export.save_kohya_lora(model, config, tmp_path)  # type: ignore[arg-type]
    prompt = config.instance_prompt
    trained = _unet_output(model.pipeline, prompt)  # type: ignore[attr-defined]

    plain = _unet_output(DiffusionPipeline.from_pretrained(base), prompt)
    effect = (trained - plain).abs().mean()
    assert effect > 1e-3, "training must have changed the output"

    fresh = DiffusionPipeline.from_pretrained(base)
    fresh.load_lora_weights(str(tmp_path), weight_name=diffusers_file.name)
    torch.testing.assert_close(_unet_output(fresh, prompt), trained, rtol=1e-4, atol=1e-5)

    if text_encoder:
        with safe_open(str(kohya_file), "pt") as f:
            prefixes = {k.split("_text_model")[0] for k in f.keys() if "_text_model" in k}
        assert prefixes == ({"lora_te1", "lora_te2"} if fixture == "tiny_sdxl" else {"lora_te"})
    kohya = DiffusionPipeline.from_pretrained(base)
    kohya.load_lora_weights(str(tmp_path), weight_name=kohya_file.name)
    # fp16 weights in the kohya file: equal up to half precision.
    torch.testing.assert_close(_unet_output(kohya, prompt), trained, rtol=1e-2,
                               atol=2e-3 * float(trained.abs().max()))


def test_kohya_file_carries_the_real_alpha_and_webui_names(
        tiny_sd: Path, face_pixels: torch.Tensor, tmp_path: Path) -> None:
    config, model = _train(tiny_sd, face_pixels, lora_rank=4, lora_alpha=16,
                           train_text_encoder=True, max_train_steps=1)  # type: ignore[arg-type]
    path = export.save_kohya_lora(model, config, tmp_path)  # type: ignore[arg-type]
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
        meta = f.metadata()
    assert alphas == {16.0}
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.")
               for k in keys)
    # kohya-ss names SD 1.x/2.x text-encoder modules lora_te_ (lora_te1_/lora_te2_ is SDXL's
    # pair); A1111 maps only lora_te_ onto an SD 2 text encoder.
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    assert not any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys)
    assert any(k.endswith("to_out_0.lora_up.weight") for k in keys)
    assert meta["ss_network_alpha"] == "16" and meta["ss_network_dim"] == "4"


def test_samples_card_and_config(tiny_sd: Path, face_pixels: torch.Tensor, tmp_path: Path) -> None:
    from PIL import Image

    config, model = _train(tiny_sd, face_pixels)
    samples = export.render_samples(model, config, 64, tmp_path)  # type: ignore[arg-type]
    assert [p.name for p in samples] == ["sample-00.png", "sample-01.png"]
    with Image.open(samples[0]) as image:
        assert image.size == (64, 64) and image.text["prompt"] == config.sample_prompts()[0]
    again = export.render_samples(model, config, 64, tmp_path / "again")  # type: ignore[arg-type]
    assert samples[0].read_bytes() == again[0].read_bytes(), "fixed seed: same sample"
    card = export.model_card(model, config, {"finalLoss": 0.1234}, samples)  # type: ignore[arg-type]
    assert f"base_model: {tiny_sd}" in card and "Trigger words: **`sks person`**" in card
    assert A.LORA_KOHYA in card and "| finalLoss | 0.1234 |" in card
    text = export.training_config_json(model, config, {"x": 1}, {"jobId": "j"})  # type: ignore[arg-type]
    parsed = json.loads(text)
    assert parsed["config"]["lora_rank"] == config.lora_rank
    assert parsed["hyperparameters"][schema.Field.LEARNING_RATE] == config.learning_rate
    assert parsed["versions"]["diffusers"]


def _info(kind: str, prediction_type: str = "epsilon", cross: int = 768) -> models.BaseModelInfo:
    return models.BaseModelInfo(model_id="m", kind=kind, pipeline_class="P",
                                prediction_type=prediction_type, native_resolution=512,
                                vae_scale_factor=8, cross_attention_dim=cross)


@pytest.mark.parametrize(("info", "version", "v2", "v_pred"), [
    (_info(models.SD), "sd_v1", "False", "False"),
    (_info(models.SD, cross=1024), "sd_v2", "True", "False"),  # SD 2.x base, 512 px
    (_info(models.SD, "v_prediction", cross=1024), "sd_v2_v", "True", "True"),  # SD 2.x 768
    (_info(models.SDXL, cross=2048), "sdxl_base_v1-0", "False", "False"),
], ids=["sd1", "sd2-base", "sd2-v", "sdxl"])
def test_kohya_metadata_names_the_model_version_as_kohya_does(
        info: models.BaseModelInfo, version: str, v2: str, v_pred: str) -> None:
    """AUTOMATIC1111 files a LoRA under SD 2 only when ss_v2 is "True" (else it hides it
    on SD 2 checkpoints); kohya-ss writes ss_base_model_version sd_v1 / sd_v2[_v]."""
    config = TrainConfig(job_id="j", attempt=1, user_id="u", actor_id="a", instance_name="sks",
                         base_model_id="m")
    meta = export.kohya_metadata(info, config)
    assert meta["ss_base_model_version"] == version
    assert meta["ss_v2"] == v2 and meta["ss_v_parameterization"] == v_pred


def test_an_sd2_base_model_is_recognised_by_its_text_width(tiny_sd: Path, tmp_path: Path) -> None:
    import shutil

    assert not models.inspect_base_model(str(tiny_sd)).is_sd2
    sd2 = tmp_path / "sd2"  # the tiny model's config files, widened like SD 2.x's
    shutil.copytree(tiny_sd, sd2, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    unet_config = json.loads((sd2 / "unet" / "config.json").read_text())
    unet_config["cross_attention_dim"] = models.SD2_CROSS_ATTENTION_DIM
    (sd2 / "unet" / "config.json").write_text(json.dumps(unet_config))
    assert models.inspect_base_model(str(sd2)).is_sd2
