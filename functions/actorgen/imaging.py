"""Decoding of user photos: shared by upload validation and the trainer.

Every failure becomes an :class:`ImageDecodeError` whose message can be shown
to the user as-is: it says what is wrong and what to do, and never carries a
library's own text. Pillow (and the HEIC plugin) are imported on first use so
that functions which never touch an image do not pay for them at cold start.

Memory stays bounded by the pixel count whatever the file's mode: a photo is
decoded in its own mode (1 to 4 bytes a pixel), reduced to ``working_pixels``
when asked (JPEG decodes at 1/2, 1/4 or 1/8 scale directly), and only then
converted to RGB a band of rows at a time (16-bit greyscale scaled to 8 bits).
``python -m tools.validator_bench`` measures the peak per megapixel.
"""

from __future__ import annotations

import io
import math
import struct
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
#: Lower pixel limits of formats whose decoder needs more memory a pixel: Pillow's
#: WebP decoder peaks at about 15 bytes a pixel (measured, docs/faces.md), so 50
#: megapixels of WebP would need about 760 MB on top of the function itself.
FORMAT_MAX_PIXELS: Final = {"WEBP": 25_000_000}
#: Rows of a 16-bit image scaled to 8 bits at once (bounds the temporary arrays).
_BAND_ROWS: Final = 256
#: EXIF Orientation tag and the transposition that shows each value upright.
_ORIENTATION_TAG: Final = 0x0112

#: How formats are named to users.
_LABELS: Final = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WebP", "HEIF": "HEIC"}

TRUNCATED_REASON: Final = "The file is incomplete (truncated); upload the photo again."
NOT_AN_IMAGE_REASON: Final = (
    f"The file is not an image that can be read; upload a {FORMAT_LABELS} photo."
)


class ImageDecodeError(ValueError):
    """The bytes are not a usable photo; ``str(err)`` is the reason to show."""


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied; reduced when working_pixels asked
    format: str  # Pillow's format name of the file, e.g. "JPEG" or "HEIF"
    stored_size: tuple[int, int]  # width, height as stored, before EXIF rotation
    #: Width, height of the whole photo after EXIF rotation (``image`` may be smaller).
    size: tuple[int, int] = (0, 0)

    @property
    def scale(self) -> float:
        """``image``'s pixels per pixel of the whole photo (1.0 when not reduced)."""
        return self.image.width / self.size[0] if self.size[0] else 1.0


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


def open_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, working_pixels: int | None = None
) -> DecodedImage:
    """Decode ``data`` into an RGB image with EXIF orientation applied.

    ``working_pixels``: reduce larger photos to about this many pixels while
    decoding (analysis needs no more; ``DecodedImage.size`` keeps the full size).
    Raises :class:`ImageDecodeError` for empty, truncated, oversized, unknown,
    damaged or unsupported files.
    """
    Image, _ = _pil()
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
            limit = min(max_pixels, FORMAT_MAX_PIXELS.get(fmt, max_pixels))
            if width * height > limit:
                raise ImageDecodeError(_too_many_pixels(width, height, limit, fmt))
            factor = _reduce_factor(width, height, working_pixels)
            if factor > 1 and fmt in ("JPEG", "MPO"):
                # The JPEG decoder scales by 1/2, 1/4 or 1/8 itself: the full size is
                # never in memory.
                img.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
                factor = _reduce_factor(*img.size, working_pixels)
            img.load()
            # Only after load(): PNG's getexif() loads the pixels itself, and a failure
            # there would be swallowed as "no orientation".
            orientation = _orientation(img)
            rgb = _to_rgb(img, factor)
    except ImageDecodeError:
        raise
    except MemoryError:
        raise  # not the file's fault: the caller records it as unprocessable
    except Image.DecompressionBombError:  # type: ignore[attr-defined]
        # Pillow refuses far-over-limit images inside open(), before we see the size.
        raise ImageDecodeError(
            f"The photo has far more than {max_pixels / 1e6:.0f} megapixels and cannot be "
            "decoded safely; upload a smaller photo."
        ) from None
    except Exception:  # noqa: BLE001 - any decoder failure is a reason, never its text
        raise ImageDecodeError(_failure_reason(data)) from None
    rgb = _orient(rgb, orientation)
    oriented = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    return DecodedImage(image=rgb, format=fmt, stored_size=(width, height), size=oriented)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Shorthand for ``open_image(data).image`` (full size)."""
    return open_image(data, max_pixels=max_pixels).image


def _too_many_pixels(width: int, height: int, max_pixels: int, fmt: str) -> str:
    # Exact counts: rounded megapixels would read "(50 megapixels); the maximum is 50".
    if fmt in FORMAT_MAX_PIXELS and max_pixels == FORMAT_MAX_PIXELS[fmt]:
        return (
            f"The photo is {width}x{height}, {width * height:,} pixels; a {_LABELS.get(fmt, fmt)} photo "
            f"can have at most {max_pixels:,} ({max_pixels / 1e6:g} megapixels). Upload a "
            "smaller photo, or save it as JPEG."
        )
    return (
        f"The photo is {width}x{height}, {width * height:,} pixels; at most {max_pixels:,} "
        f"({max_pixels / 1e6:g} megapixels) can be used. Upload a smaller photo."
    )


def _reduce_factor(width: int, height: int, working_pixels: int | None) -> int:
    if not working_pixels or width * height <= working_pixels:
        return 1
    return math.ceil(math.sqrt(width * height / working_pixels))


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken photo
        return 1
    return value if 1 <= value <= 8 else 1


def _orient(img: Image.Image, orientation: int) -> Image.Image:
    Image, _ = _pil()
    t = Image.Transpose  # type: ignore[attr-defined]
    method = {
        2: t.FLIP_LEFT_RIGHT, 3: t.ROTATE_180, 4: t.FLIP_TOP_BOTTOM, 5: t.TRANSPOSE,
        6: t.ROTATE_270, 7: t.TRANSVERSE, 8: t.ROTATE_90,
    }.get(orientation)
    return img.transpose(method) if method is not None else img


def _to_rgb(img: Image.Image, factor: int = 1) -> Image.Image:
    """RGB, reduced by ``factor``, transparency flattened onto white, memory bounded.

    Works a band of rows at a time, so besides the decoded image (1-4 bytes a pixel
    in its own mode) only the RGB result and one band are ever in memory: converting
    a whole 16-bit, palette or RGBA image at once would hold several full copies
    (Pillow's reduce premultiplies RGBA into another one).
    """
    Image, _ = _pil()
    if img.mode == "RGB" and factor == 1:
        return img.copy()  # a copy: the caller closes the decoded file
    width, height = img.size
    out = Image.new("RGB", (math.ceil(width / factor), math.ceil(height / factor)))  # type: ignore[attr-defined]
    peak = None
    if img.mode in _SIXTEEN_BIT_MODES:
        peak = max(1, int(img.getextrema()[1]))  # type: ignore[index]
    band_rows = max(factor, _BAND_ROWS // factor * factor)
    for top in range(0, height, band_rows):
        band = img.crop((0, top, width, min(height, top + band_rows)))
        band = _band_to_rgb(band, peak, factor)
        out.paste(band, (0, top // factor))
    return out


_SIXTEEN_BIT_MODES: Final = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _band_to_rgb(band: Image.Image, peak: int | None, factor: int) -> Image.Image:
    """One band of rows: 8-bit, reduced, flattened onto white, RGB."""
    Image, _ = _pil()
    if band.mode in _SIXTEEN_BIT_MODES:
        # 16-bit greyscale PNG: scale by the image's peak, do not clip to white.
        import numpy as np

        values = np.clip(np.asarray(band).astype(np.int64), 0, None) * 255 // (peak or 1)
        band = Image.fromarray(values.astype(np.uint8))  # type: ignore[attr-defined]
    elif band.mode in ("P", "PA"):
        has_alpha = band.mode == "PA" or "transparency" in band.info
        band = band.convert("RGBA" if has_alpha else "RGB")
    elif band.mode not in ("L", "LA", "La", "RGB", "RGBA", "RGBa", "CMYK"):
        band = band.convert("RGBA" if "A" in band.mode else "L")
    if factor > 1:
        band = band.reduce(factor)
    if band.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = band if band.mode == "RGBA" else band.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))  # type: ignore[attr-defined]
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return band if band.mode == "RGB" else band.convert("RGB")


# --------------------------------------------------------------------------- failures
def _failure_reason(data: bytes) -> str:
    """The reason for bytes that did not decode, from their own structure."""
    kind = sniff_format(data)
    if kind is None:
        return NOT_AN_IMAGE_REASON
    if is_truncated(data, kind):
        return TRUNCATED_REASON
    label = _LABELS[kind]
    return (
        f"The photo is a damaged {label} file that cannot be decoded; save or export it "
        "again from the phone or camera and upload that, or use another photo."
    )


def sniff_format(data: bytes) -> str | None:
    """The accepted format the bytes start like (JPEG, PNG, WEBP, HEIF), else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp" and data[8:12] in (
        b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif",
    ):
        return "HEIF"
    return None


def is_truncated(data: bytes, kind: str) -> bool:
    """Whether a file of format ``kind`` ends before its own structure says it does."""
    if kind == "JPEG":
        # The end-of-image marker; some cameras pad after it, so look near the end.
        return b"\xff\xd9" not in data[-4096:]
    if kind == "PNG":
        return b"IEND" not in data[-64:]
    if kind == "WEBP":
        declared = struct.unpack("<I", data[4:8])[0] + 8 if len(data) >= 8 else 0
        return len(data) < declared
    if kind == "HEIF":
        return _iso_boxes_truncated(data)
    return False


def _iso_boxes_truncated(data: bytes) -> bool:
    """ISO-BMFF (HEIF): a top-level box whose declared size runs past the end."""
    offset = 0
    while offset + 8 <= len(data):
        size = struct.unpack(">I", data[offset:offset + 4])[0]
        if size == 1:
            if offset + 16 > len(data):
                return True
            size = struct.unpack(">Q", data[offset + 8:offset + 16])[0]
        elif size == 0:  # runs to the end of the file
            return False
        if size < 8:
            return False  # not a box structure we can judge
        offset += size
    return offset > len(data) or 0 < len(data) - offset < 8
