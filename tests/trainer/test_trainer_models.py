"""Base-model inspection and LoRA placement on diffusers UNets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from lora_trainer import models, synthetic
from lora_trainer.config import TrainConfig
from lora_trainer.errors import ModelLoadError


def _config(base: Path, **kw: object) -> TrainConfig:
    return TrainConfig(job_id="j", attempt=1, user_id="u", actor_id="a", instance_name="sks",
                       base_model_id=str(base), **kw)


@pytest.mark.parametrize(("kind", "size"), [("sd", "full"), ("sdxl", "full"), ("sd", "tiny")])
def test_lora_targets_exist_on_the_diffusers_unet(kind: str, size: str) -> None:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # full-size shapes without allocating 10 GB
        unet = UNet2DConditionModel(**synthetic.unet_config(kind, size))
    names = {name.rsplit(".", 1)[-1] if not name.endswith("to_out.0") else "to_out.0"
             for name, _ in unet.named_modules()}
    for target in models.UNET_LORA_TARGETS:
        assert target in names, f"{target} is not a module of the {kind} UNet"
    # The seed notebook's targets do not exist: a LoRA on them trains nothing.
    assert not {"q", "k", "v"} & names


def test_full_size_unet_has_the_real_parameter_count() -> None:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        sd = UNet2DConditionModel(**synthetic.unet_config("sd", "full"))
        xl = UNet2DConditionModel(**synthetic.unet_config("sdxl", "full"))
    assert sum(p.numel() for p in sd.parameters()) == pytest.approx(859.5e6, rel=1e-3)
    assert sum(p.numel() for p in xl.parameters()) == pytest.approx(2567.5e6, rel=1e-3)


def test_inspect_detects_family_prediction_and_resolution(tiny_sd: Path, tiny_sdxl: Path,
                                                          tiny_sd_vpred: Path) -> None:
    sd = models.inspect_base_model(str(tiny_sd))
    assert (sd.kind, sd.prediction_type, sd.native_resolution) == ("sd", "epsilon", 64)
    xl = models.inspect_base_model(str(tiny_sdxl))
    assert (xl.kind, xl.pipeline_class) == ("sdxl", "StableDiffusionXLPipeline")
    assert models.inspect_base_model(str(tiny_sd_vpred)).prediction_type == "v_prediction"


def test_unsupported_or_missing_base_model_is_a_clear_error(tiny_sd: Path,
                                                            tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="could not read the base model"):
        models.inspect_base_model(str(tmp_path / "nowhere"))
    other = tmp_path / "flux"
    shutil.copytree(tiny_sd, other)
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelLoadError, match="FluxPipeline"):
        models.inspect_base_model(str(other))


def test_lora_is_fp32_on_frozen_weights_and_starts_as_identity(tiny_sd: Path) -> None:
    config = _config(tiny_sd, lora_rank=4, lora_alpha=8, train_text_encoder=True)
    model = models.load_base_model(config, torch.device("cpu"))
    x = torch.randn(1, 4, 8, 8)
    hidden = torch.randn(1, 77, 32)
    with torch.no_grad():
        before = model.unet(x, 10, encoder_hidden_states=hidden).sample
    params = models.add_lora(model, config)
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    trainable = {n for n, p in model.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("to_out.0.lora_A" in n for n in trainable)
    assert any(p.requires_grad for p in model.text_encoders[0].parameters())
    with torch.no_grad():  # gaussian init: B is zero, so the output is unchanged
        after = model.unet(x, 10, encoder_hidden_states=hidden).sample
    assert torch.equal(before, after)


def test_precision_choice() -> None:
    assert models.resolve_precision("auto", torch.device("cpu")) == ("no", torch.float32)
    assert models.resolve_precision("bf16", torch.device("cpu"))[1] == torch.bfloat16
    with pytest.raises(ModelLoadError):
        models.resolve_precision("fp16", torch.device("cpu"))
