"""The actor's photos: download by object path, decode, crop around the face, resize.

Uses the same decoder and face detector as upload validation
(``actorgen.imaging``, ``actorgen.faces``) so the trainer sees the photos the
way they were judged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from actorgen import schema

from .errors import DataError

if TYPE_CHECKING:
    from PIL import Image

    from .face_loss import PixelBox

log = logging.getLogger(__name__)
IF = schema.ImageField
DOWNLOAD_THREADS = 8


@dataclass(frozen=True)
class ImageRef:
    """One accepted photo: its map key, storage object name, the object generation
    that upload validation judged (None in records without one) and stored face box."""

    image_id: str
    path: str
    face: Mapping[str, int] | None = None
    generation: int | None = None

    @property
    def file_name(self) -> str:
        return PurePosixPath(self.path).name


def accepted_images(actor: Mapping[str, Any]) -> list[ImageRef]:
    """The actor's accepted photos, in a stable order (by object path)."""
    images = actor.get(schema.Field.IMAGES) or {}
    refs = [
        ImageRef(image_id=str(key), path=str(rec[IF.PATH]), face=rec.get(IF.FACE),
                 generation=_generation(rec.get(IF.GENERATION)))
        for key, rec in images.items()
        if isinstance(rec, Mapping) and rec.get(IF.STATUS) == schema.ImageStatus.ACCEPTED
        and rec.get(IF.PATH)
    ]
    if not refs:
        raise DataError(
            "the actor has no accepted photos; upload 5-30 clear photos of the person's face"
        )
    return sorted(refs, key=lambda r: r.path)


def _generation(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _replaced(ref: ImageRef) -> DataError:
    return DataError(
        f"the photo {ref.file_name!r} was replaced or deleted after it was checked "
        f"({ref.path}, generation {ref.generation}); upload it again, wait for its check, "
        "then start the training again"
    )


def download_images(bucket: Any, refs: Sequence[ImageRef], dest: Path) -> list[Path]:
    """Download each photo to ``dest``; a missing object is a :class:`DataError`.

    A photo is read at the generation upload validation judged, when its record
    names one: a file replaced since (a new generation, judged on its own) or
    deleted is a :class:`DataError`, never silently a different photo. Cloud
    Storage answers 404 for a generation that no longer exists; the Storage
    emulator ignores the generation and serves the live object, so the
    generation it reports (``x-goog-generation``) is compared too.
    """
    from google.api_core import exceptions as gexc

    dest.mkdir(parents=True, exist_ok=True)

    def fetch(ref: ImageRef) -> Path:
        # The map key is a hash of the path: a safe, unique local file name.
        target = dest / ref.image_id
        blob = bucket.blob(ref.path, generation=ref.generation)
        try:
            blob.download_to_filename(str(target))
        except gexc.NotFound:
            if ref.generation is not None:
                raise _replaced(ref) from None
            raise DataError(
                f"the photo {ref.file_name!r} is no longer in storage ({ref.path}); "
                "upload it again or delete it from the actor"
            ) from None
        served = _generation(blob.generation)
        if ref.generation is not None and served is not None and served != ref.generation:
            target.unlink(missing_ok=True)
            raise _replaced(ref)
        return target

    with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
        return list(pool.map(fetch, refs))


def crop_box(image: Image.Image, ref: ImageRef, margin: float) -> tuple[int, int, int, int]:
    """A square around the stored face, else the largest detected face, else the centre."""
    return crop_around_face(image, ref, margin)[0]


def _stored_face(ref: ImageRef, image_size: tuple[int, int]) -> Any:
    """The face box upload validation stored for this generation, when it fits the image."""
    from actorgen import faces

    try:
        face = faces.FaceBox(**{k: int(ref.face[k]) for k in ("x", "y", "w", "h")})
    except (TypeError, KeyError, ValueError):
        return None
    width, height = image_size
    inside = (face.w > 0 and face.h > 0 and face.x >= 0 and face.y >= 0
              and face.x + face.w <= width and face.y + face.h <= height)
    return face if inside else None


def crop_around_face(image: Image.Image, ref: ImageRef, margin: float
                     ) -> tuple[tuple[int, int, int, int], Any]:
    """:func:`crop_box` and the face (``actorgen.faces.FaceBox``) it was made around, or None."""
    from actorgen import faces

    # Validation judged this very generation, EXIF-oriented like here: its box is the
    # face; detecting again would cost about a second per photo of GPU-worker time.
    face = _stored_face(ref, image.size) if ref.face else None
    if face is None:
        found = faces.detect_faces(image)
        face = found[0] if found else None
    if face is None:
        log.warning("no face found in %s; using a centre crop", ref.file_name)
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return (left, top, left + side, top + side), None
    return faces.face_crop_box(face, image.size, margin=margin), face


@dataclass(frozen=True)
class PreparedPhoto:
    """A training photo (cropped, resized) and its face box in the photo's pixels."""

    image: Image.Image
    face: PixelBox | None


def prepare_photo(data: bytes, ref: ImageRef, resolution: int, margin: float) -> PreparedPhoto:
    """Decode (EXIF-oriented RGB), crop square around the face and resize."""
    from actorgen import imaging
    from PIL import Image

    from .face_loss import map_box_through_crop

    try:
        image = imaging.decode_image(data)
    except imaging.ImageDecodeError as err:
        raise DataError(f"the photo {ref.file_name!r} cannot be used: {err}") from None
    box, face = crop_around_face(image, ref, margin)
    side = box[2] - box[0]
    if side < resolution:
        log.info("%s: face crop is %d px, upscaled to %d", ref.file_name, side, resolution)
    prepared = image.crop(box).resize((resolution, resolution), Image.Resampling.LANCZOS)
    face_box = None if face is None else map_box_through_crop(
        (face.x, face.y, face.w, face.h), box, resolution)
    return PreparedPhoto(prepared, face_box)


def prepare_image(data: bytes, ref: ImageRef, resolution: int, margin: float) -> Image.Image:
    """The prepared photo alone (see :func:`prepare_photo`)."""
    return prepare_photo(data, ref, resolution, margin).image


def load_training_photos(files: Sequence[Path], refs: Sequence[ImageRef], resolution: int,
                         margin: float) -> list[PreparedPhoto]:
    """Prepare every downloaded photo (see :func:`prepare_photo`)."""
    return [
        prepare_photo(Path(path).read_bytes(), ref, resolution, margin)
        for path, ref in zip(files, refs, strict=True)
    ]


def load_training_images(files: Sequence[Path], refs: Sequence[ImageRef], resolution: int,
                         margin: float) -> list[Image.Image]:
    """The prepared photos alone (see :func:`load_training_photos`)."""
    return [p.image for p in load_training_photos(files, refs, resolution, margin)]


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """``[N, 3, H, W]`` float32 in [-1, 1], as the VAE expects."""
    arrays = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) for img in images])
    tensor = torch.from_numpy(arrays).permute(0, 3, 1, 2)
    return tensor / 127.5 - 1.0
