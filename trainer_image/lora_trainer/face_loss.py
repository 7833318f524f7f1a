"""Face-weighted loss: per-pixel weights of the diffusion loss, higher on the face.

A person LoRA is judged by the face, yet in a head-and-shoulders crop the face
is only about a seventh of the pixels, so an unweighted loss spends most of its
pull on hair, clothes and background. Like kohya's and ai-toolkit's masked loss,
the per-pixel squared error is multiplied by a map; unlike a binary mask, the
background keeps a weight (it is not zeroed), so the LoRA still learns to draw
a coherent head, shoulders and backdrop around the face.

The map is built once per photo, next to its cached latents, from the face box
that the crop was made around (mapped through the crop and resize into the
latent grid): an ellipse around the box at weight ``face_weight``, 1 elsewhere,
with soft (area-averaged) edges, then scaled so that its mean is 1. The mean of
1 keeps the loss on the same scale as the unweighted one, so the learning rate
and min-SNR weighting mean the same with or without it; the map only moves the
pull from background to face.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import torch
import torch.nn.functional as F

#: The weighted region is the ellipse inscribed in the face box grown by this factor:
#: detector boxes run from the brows to the chin, and the hairline, ears and jaw are
#: part of the likeness.
FACE_REGION_SCALE: Final = 1.3
#: Supersampling of the latent grid when rasterising the ellipse (soft edges).
SUPERSAMPLE: Final = 4


@dataclass(frozen=True)
class PixelBox:
    """A face box in the pixels of the prepared (cropped and resized) training photo."""

    x: float
    y: float
    w: float
    h: float

    def mirrored(self, width: float) -> PixelBox:
        return PixelBox(width - self.x - self.w, self.y, self.w, self.h)


def map_box_through_crop(box: tuple[float, float, float, float],
                         crop: tuple[int, int, int, int], resolution: int) -> PixelBox | None:
    """``box`` (x, y, w, h in the original photo) in the pixels of the prepared photo.

    ``crop`` is the square ``(left, top, right, bottom)`` cut from the original
    and resized to ``resolution``; the part of the box outside the crop is cut
    off. None when nothing of the face is inside the crop.
    """
    left, top, right, _ = crop
    scale = resolution / max(1, right - left)
    x0 = min(max((box[0] - left) * scale, 0.0), resolution)
    y0 = min(max((box[1] - top) * scale, 0.0), resolution)
    x1 = min(max((box[0] + box[2] - left) * scale, 0.0), resolution)
    y1 = min(max((box[1] + box[3] - top) * scale, 0.0), resolution)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    return PixelBox(x0, y0, x1 - x0, y1 - y0)


def face_coverage(box: PixelBox, resolution: int, latent_size: int) -> torch.Tensor:
    """``[latent_size, latent_size]`` share of each latent cell covered by the face region."""
    n = latent_size * SUPERSAMPLE
    # Centres of the supersampled cells, in training pixels.
    centres = (torch.arange(n, dtype=torch.float32) + 0.5) * (resolution / n)
    cx, cy = box.x + box.w / 2, box.y + box.h / 2
    rx = max(box.w * FACE_REGION_SCALE / 2, 1e-6)
    ry = max(box.h * FACE_REGION_SCALE / 2, 1e-6)
    inside = (((centres[None, :] - cx) / rx) ** 2 + ((centres[:, None] - cy) / ry) ** 2) <= 1.0
    return F.avg_pool2d(inside.float()[None, None], SUPERSAMPLE)[0, 0]


def weight_map(box: PixelBox | None, resolution: int, latent_size: int,
               face_weight: float) -> torch.Tensor:
    """``[1, latent_size, latent_size]`` loss weights with mean 1 (all ones without a face)."""
    if box is None or face_weight == 1.0:
        return torch.ones(1, latent_size, latent_size)
    weights = 1.0 + (face_weight - 1.0) * face_coverage(box, resolution, latent_size)
    return (weights / weights.mean())[None]


def instance_weight_maps(boxes: Sequence[PixelBox | None], resolution: int, latent_size: int,
                         face_weight: float, *, flip: bool) -> torch.Tensor | None:
    """Weight maps ``[N, 1, h, w]`` aligned with the cached instance latents.

    With ``flip`` the cache holds the photos then their mirror images
    (:func:`lora_trainer.encode.encode_images`), so the maps follow in the same
    order with mirrored boxes. None when weighting is off or no photo has a face:
    the step then takes the plain mean.
    """
    if face_weight == 1.0 or not any(box is not None for box in boxes):
        return None
    maps = [weight_map(box, resolution, latent_size, face_weight) for box in boxes]
    if flip:
        maps += [weight_map(None if box is None else box.mirrored(resolution), resolution,
                            latent_size, face_weight) for box in boxes]
    return torch.stack(maps)


def face_share(weights: torch.Tensor, boxes: Sequence[PixelBox | None], resolution: int) -> float:
    """Share of the loss's weight that falls on the face regions (for the log and card)."""
    latent = weights.shape[-1]
    total = face = 0.0
    for index, box in enumerate(boxes):
        if box is None:
            continue
        cover = face_coverage(box, resolution, latent)
        face += float((weights[index, 0] * cover).sum())
        total += float(weights[index, 0].sum())
    return face / total if total else 0.0
