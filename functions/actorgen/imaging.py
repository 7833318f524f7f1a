"""Decoding of user photos: shared by upload validation and the trainer.

Every failure becomes an :class:`ImageDecodeError` whose message can be shown
to the user as-is. Pillow (and the HEIC plugin) are imported on first use so
that functions which never touch an image do not pay for them at cold start.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from PIL import Image

#: Formats accepted from phones and cameras (Pillow's names). MPO is what
#: some phones call a JPEG with an embedded depth/preview image.
ACCEPTED_FORMATS: Final = frozenset({"JPEG", "MPO", "PNG", "WEBP", "HEIF"})
FORMAT_LABELS: Final = "JPEG, PNG, WebP or HEIC"
#: Decompression-bomb guard: larger images are refused before any pixel is decoded.
DEFAULT_MAX_PIXELS: Final = 50_000_000


class ImageDecodeError(ValueError):
    """The bytes are not a usable photo; ``str(err)`` is the reason to show."""


@dataclass(frozen=True)
class DecodedImage:
    image: "Image.Image"  # RGB, EXIF orientation applied
    format: str  # Pillow's format name of the file, e.g. "JPEG" or "HEIF"
    stored_size: tuple[int, int]  # width, height as stored, before EXIF rotation


_heif_registered = False


def _pil() -> tuple[object, object]:
    global _heif_registered
    from PIL import Image, ImageOps

    if not _heif_registered:
        try:
            import pillow_heif

            pillow_heif.register_heif_opener()
        except ImportError:  # HEIC then fails with the "not an image" reason
            pass
        _heif_registered = True
    return Image, ImageOps


def open_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode ``data`` fully into an RGB image with EXIF orientation applied.

    Raises :class:`ImageDecodeError` for empty, truncated, oversized, unknown
    or unsupported files.
    """
    Image, ImageOps = _pil()
    if not data:
        raise ImageDecodeError("The file is empty (0 bytes); upload the photo again.")
    try:
        with Image.open(io.BytesIO(data)) as img:  # type: ignore[attr-defined]
            fmt = (img.format or "").upper()
            width, height = img.size
            if fmt not in ACCEPTED_FORMATS:
                raise ImageDecodeError(
                    f"The file is a {fmt or 'unknown'} image; upload a {FORMAT_LABELS} photo."
                )
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"The photo is {width}x{height} ({width * height / 1e6:.0f} megapixels); "
                    f"the maximum is {max_pixels / 1e6:.0f} megapixels. Upload a smaller photo."
                )
            img.load()
            oriented = ImageOps.exif_transpose(img)  # type: ignore[attr-defined]
            rgb = _to_rgb(oriented)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError:  # type: ignore[attr-defined]
        # Pillow refuses far-over-limit images inside open(), before we see the size.
        raise ImageDecodeError(
            f"The photo has far more than {max_pixels / 1e6:.0f} megapixels and cannot be "
            "decoded safely; upload a smaller photo."
        ) from None
    except Image.UnidentifiedImageError:  # type: ignore[attr-defined]
        raise ImageDecodeError(
            f"The file is not an image that can be read; upload a {FORMAT_LABELS} photo."
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        if "truncated" in str(err).lower():
            reason = "The file is incomplete (truncated); upload the photo again."
        else:
            reason = f"The photo could not be decoded ({err}); upload it again or use another."
        raise ImageDecodeError(reason) from None
    return DecodedImage(image=rgb, format=fmt, stored_size=(width, height))


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> "Image.Image":
    """Shorthand for ``open_image(data).image``."""
    return open_image(data, max_pixels=max_pixels).image


def _to_rgb(img: "Image.Image") -> "Image.Image":
    """RGB with transparency flattened onto white (a cut-out portrait stays visible)."""
    Image, _ = _pil()
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))  # type: ignore[attr-defined]
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale PNG: scale to 8 bits instead of clipping to white.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max() or 1.0
        img = Image.fromarray((arr * (255.0 / peak)).astype("uint8"))  # type: ignore[attr-defined]
    return img.convert("RGB")
