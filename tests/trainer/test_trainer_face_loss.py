"""Face-weighted loss and offset noise: the weight maps (pure), the face box carried
through the crop of a real photo, and the maps and offset reaching the training step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from actorgen import faces
from lora_trainer import data, face_loss, models, training
from lora_trainer.__main__ import parse_args
from lora_trainer.config import DEFAULT_FACE_LOSS_WEIGHT, TrainConfig
from lora_trainer.errors import TrainerError

from tests import photos


def _config(base: Path | str = "unused", **kw: object) -> TrainConfig:
    settings: dict[str, object] = dict(learning_rate=1e-3, lora_rank=4, lora_alpha=4,
                                       sample_steps=2, num_class_images=2, train_batch_size=2)
    settings.update(kw)
    return TrainConfig(job_id="j", attempt=1, user_id="u", actor_id="a", instance_name="sks",
                       base_model_id=str(base), **settings)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- pure maps
def test_box_is_mapped_through_the_crop_and_resize() -> None:
    # A 300 px square crop at (100, 50) resized to 60 px: scale 1/5.
    box = face_loss.map_box_through_crop((200, 150, 100, 50), (100, 50, 400, 350), 60)
    assert box == face_loss.PixelBox(20.0, 20.0, 20.0, 10.0)
    # Cut off at the crop's edge; nothing left when the face is outside it.
    assert face_loss.map_box_through_crop((50, 50, 100, 100), (100, 50, 400, 350), 60) == \
        face_loss.PixelBox(0.0, 0.0, 10.0, 20.0)
    assert face_loss.map_box_through_crop((0, 0, 50, 50), (100, 50, 400, 350), 60) is None


def test_weight_map_is_heavier_on_the_face_and_keeps_mean_one() -> None:
    box = face_loss.PixelBox(24, 16, 16, 24)  # in a 64 px photo; latents 8x8
    weights = face_loss.weight_map(box, 64, 8, face_weight=3.0)
    assert weights.shape == (1, 8, 8)
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-5)
    centre, corner = weights[0, 3:5, 3:5], weights[0, 0, 0]
    assert torch.all(centre > 2.5 * corner)  # full weight 3 vs 1 before scaling
    assert corner.item() < 1.0  # the background gives up pull, it is not zeroed
    assert corner.item() > 0.5
    # Soft edges: some cells are partly covered.
    cover = face_loss.face_coverage(box, 64, 8)
    assert ((cover > 0) & (cover < 1)).any()
    # Off, or no face: all ones.
    assert torch.equal(face_loss.weight_map(box, 64, 8, 1.0), torch.ones(1, 8, 8))
    assert torch.equal(face_loss.weight_map(None, 64, 8, 3.0), torch.ones(1, 8, 8))


def test_maps_follow_the_flipped_cache_order() -> None:
    boxes = [face_loss.PixelBox(4, 20, 20, 24), None]
    maps = face_loss.instance_weight_maps(boxes, 64, 8, 2.0, flip=True)
    assert maps is not None and maps.shape == (4, 1, 8, 8)
    # Rows: photo 0, photo 1, mirror of 0, mirror of 1 (encode.encode_images' order).
    assert torch.allclose(maps[2], torch.flip(maps[0], dims=[2]), atol=1e-6)
    assert torch.equal(maps[1], torch.ones(1, 8, 8)) and torch.equal(maps[3], maps[1])
    assert face_loss.instance_weight_maps(boxes, 64, 8, 2.0, flip=False).shape == (2, 1, 8, 8)
    assert face_loss.instance_weight_maps(boxes, 64, 8, 1.0, flip=True) is None
    assert face_loss.instance_weight_maps([None, None], 64, 8, 2.0, flip=True) is None


def test_default_weight_puts_more_of_the_loss_on_the_face() -> None:
    # The head-and-shoulders crop (margin 1): the face box is the middle third.
    box = face_loss.PixelBox(512 / 3, 512 / 3, 512 / 3, 512 / 3)
    plain = face_loss.face_share(torch.ones(1, 1, 64, 64), [box], 512)
    weighted = face_loss.face_share(
        face_loss.weight_map(box, 512, 64, DEFAULT_FACE_LOSS_WEIGHT)[None], [box], 512)
    assert 0.1 < plain < 0.2 and 0.2 < weighted < 0.35, (plain, weighted)


# ------------------------------------------------------------- real photo, real crop
def test_face_box_of_a_real_photo_lands_on_the_face_in_the_crop() -> None:
    photo = photos.portrait(2)
    ref = data.ImageRef("x", "users/u/actors/a/images/x.jpg")
    prepared = data.prepare_photo(photos.jpeg(photo), ref, 96, 1.0)
    assert prepared.image.size == (96, 96) and prepared.face is not None
    box = prepared.face
    # Margin 1: the face is the middle third of the square crop.
    assert box.w == pytest.approx(32, abs=2) and box.h == pytest.approx(32, abs=2)
    assert box.x + box.w / 2 == pytest.approx(48, abs=3)
    # The detector finds the face of the prepared photo where the box says.
    big = data.prepare_photo(photos.jpeg(photo), ref, 384, 1.0)
    found = faces.detect_faces(big.image)[0]
    assert big.face is not None
    assert abs(found.center[0] - (big.face.x + big.face.w / 2)) < 25
    assert abs(found.center[1] - (big.face.y + big.face.h / 2)) < 25


def test_photo_without_a_face_has_no_box() -> None:
    prepared = data.prepare_photo(photos.jpeg(photos.no_face()), data.ImageRef("x", "p/x.jpg"),
                                  64, 1.0)
    assert prepared.face is None


# ------------------------------------------------------------------ in the trainer
def _build(base: Path, pixels: torch.Tensor, boxes: list, **kw: object) -> training.LoraTrainer:
    config = _config(base, **kw)
    model = models.load_base_model(config, torch.device("cpu"))
    return training.build_trainer(model, config, pixels, face_boxes=boxes).trainer


def _centre_boxes(count: int) -> list[face_loss.PixelBox]:
    return [face_loss.PixelBox(64 / 3, 64 / 3, 64 / 3, 64 / 3)] * count


def test_weight_maps_are_cached_once_and_change_the_step_loss(
        tiny_sd: Path, face_pixels: torch.Tensor) -> None:
    count = face_pixels.shape[0]
    weighted = _build(tiny_sd, face_pixels, _centre_boxes(count), face_loss_weight=5.0)
    maps = weighted.data.instance_weights
    assert maps is not None and maps.shape == (2 * count, 1, 8, 8)  # photos + mirrors
    plain = _build(tiny_sd, face_pixels, _centre_boxes(count), face_loss_weight=1.0)
    assert plain.data.instance_weights is None
    # Same seed, same draws: only the weighting differs.
    a, b = weighted.train_step().item(), plain.train_step().item()
    assert a != pytest.approx(b, rel=1e-4)
    assert torch.isfinite(torch.tensor(a))


def test_offset_noise_changes_the_step_only_when_on(tiny_sd: Path,
                                                    face_pixels: torch.Tensor) -> None:
    losses = {}
    for name, offset in (("off", 0.0), ("off-again", 0.0), ("on", 0.1)):
        trainer = _build(tiny_sd, face_pixels, [None] * face_pixels.shape[0],
                         noise_offset=offset)
        losses[name] = [trainer.train_step().item() for _ in range(2)]
    assert losses["off"] == losses["off-again"]  # the default draws exactly as before
    assert losses["on"] != losses["off"]


def test_settings_are_validated_and_reach_the_config() -> None:
    assert _config().face_loss_weight == DEFAULT_FACE_LOSS_WEIGHT > 1.0
    assert _config().noise_offset == 0.0
    with pytest.raises(TrainerError, match="face loss weight"):
        _config(face_loss_weight=0.5)
    with pytest.raises(TrainerError, match="noise offset"):
        _config(noise_offset=-0.1)
    args = parse_args(["--job-id", "j", "--face-loss-weight", "3", "--noise-offset", "0.05"])
    assert args.face_loss_weight == 3.0 and args.noise_offset == 0.05
