"""actorgen.imaging with hostile files: every failure is a reason of ours, never a library's."""

from __future__ import annotations

import io
import random
import re

import pytest
from actorgen import imaging
from actorgen.imaging import ImageDecodeError
from PIL import Image

from tests import photos

#: Every reason open_image may give: ours, whole sentences, no library text.
OUR_REASONS = [
    re.escape(imaging.TRUNCATED_REASON),
    re.escape(imaging.NOT_AN_IMAGE_REASON),
    r"The photo is a damaged (JPEG|PNG|WebP|HEIC) file that cannot be decoded; save or export "
    r"it again from the phone or camera and upload that, or use another photo\.",
    r"The file is a [A-Z0-9]+ image; upload a JPEG, PNG, WebP or HEIC photo\.",
    r"The photo is \d+x\d+, [\d,]+ pixels; at most 50,000,000 \(50 megapixels\) can be used\. "
    r"Upload a smaller photo\.",
    r"The photo is \d+x\d+, [\d,]+ pixels; a WebP photo can have at most 25,000,000 \(25 "
    r"megapixels\)\. Upload a smaller photo, or save it as JPEG\.",
    r"The photo has far more than 50 megapixels and cannot be decoded safely; upload a smaller "
    r"photo\.",
]


def reason_of(data: bytes) -> str | None:
    try:
        imaging.open_image(data, working_pixels=4_000_000)
    except ImageDecodeError as err:
        return str(err)
    return None


def encodings() -> dict[str, bytes]:
    image = photos.portrait(0)
    return {
        "JPEG": photos.jpeg(image),
        "progressive JPEG": photos.encode(image, "JPEG", progressive=True),
        "PNG": photos.encode(image, "PNG"),
        "WebP": photos.encode(image, "WEBP", quality=80),
        "HEIC": photos.heic(image),
    }


@pytest.mark.parametrize("keep", [0.05, 0.3, 0.6, 0.95])
def test_truncated_uploads_of_every_format_say_truncated(keep: float) -> None:
    for kind, data in encodings().items():
        assert reason_of(photos.truncated(data, keep)) == imaging.TRUNCATED_REASON, kind


@pytest.mark.parametrize("damage", ["header", "pixels"])
def test_a_damaged_png_is_called_damaged_not_asked_to_be_a_png(damage: str) -> None:
    data = bytearray(photos.encode(photos.portrait(0), "PNG"))
    if damage == "header":
        data[20] ^= 0xFF  # the IHDR chunk's height: its checksum no longer matches
    else:
        start = data.index(b"IDAT") + 200
        data[start:start + 2000] = bytes(random.Random(7).randrange(256) for _ in range(2000))
    reason = reason_of(bytes(data))
    assert reason is not None and reason.startswith("The photo is a damaged PNG file")
    assert "upload a JPEG, PNG" not in reason


def test_fuzzed_files_get_only_our_reasons() -> None:
    rng = random.Random(2026)
    seen: dict[str, int] = {}
    for kind, original in encodings().items():
        for _ in range(25):
            data = bytearray(original)
            for _ in range(rng.choice([1, 4, 16, 64])):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if rng.random() < 0.3:
                data = data[: rng.randrange(16, len(data))]
            reason = reason_of(bytes(data))  # never anything but ImageDecodeError
            if reason is None:
                continue  # the damage missed everything that matters
            assert "\n" not in reason
            assert any(re.fullmatch(p, reason) for p in OUR_REASONS), (kind, reason)
            seen[reason[:30]] = seen.get(reason[:30], 0) + 1
    assert len(seen) >= 2  # the fuzz reached more than one kind of failure


def test_fifty_megapixels_and_a_bit_is_not_called_fifty_of_fifty() -> None:
    reason = reason_of(photos.decompression_bomb(7072, 7072))  # 50,013,184 pixels
    assert reason == (
        "The photo is 7072x7072, 50,013,184 pixels; at most 50,000,000 (50 megapixels) can be "
        "used. Upload a smaller photo."
    )


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    import numpy as np

    ramp = np.tile(np.linspace(0, 4095, 600, dtype=np.uint16), (520, 1))
    decoded = imaging.open_image(_png(Image.fromarray(ramp)))  # mode I;16
    pixels = np.asarray(decoded.image)
    assert decoded.image.mode == "RGB" and decoded.size == (600, 520)
    assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255
    assert 120 <= pixels[0, 300, 0] <= 135  # middle grey, not white


def test_transparent_and_palette_photos_are_flattened_onto_white() -> None:
    rgba = Image.new("RGBA", (600, 520), (0, 0, 0, 0))
    assert imaging.open_image(_png(rgba)).image.getpixel((5, 5)) == (255, 255, 255)
    palette = photos.portrait(0).convert("P")
    palette.info["transparency"] = palette.getpixel((0, 0))
    decoded = imaging.open_image(_png(palette), working_pixels=100_000)
    assert decoded.image.mode == "RGB" and decoded.size == photos.PHOTO_SIZE


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_large_photos_are_reduced_for_analysis_with_their_full_size_kept(fmt: str) -> None:
    big = photos.portrait(0).resize((2304, 2880))  # 6.6 megapixels
    decoded = imaging.open_image(photos.encode(big, fmt), working_pixels=2_000_000)
    assert decoded.size == (2304, 2880) and decoded.stored_size == (2304, 2880)
    assert decoded.image.width * decoded.image.height <= 2_000_000
    assert decoded.scale == pytest.approx(decoded.image.width / 2304)
    full = imaging.open_image(photos.encode(big, fmt))
    assert full.image.size == (2304, 2880) and full.scale == 1.0


def test_exif_rotation_with_reduction() -> None:
    big = photos.portrait(0).resize((1536, 1920))
    decoded = imaging.open_image(photos.with_exif_rotation(big, "JPEG"), working_pixels=1_000_000)
    assert decoded.stored_size == (1920, 1536) and decoded.size == (1536, 1920)
    assert decoded.image.width < decoded.image.height  # upright


def test_webp_has_its_own_lower_pixel_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow's WebP decoder needs ~15 bytes a pixel; the limit is lowered here to
    # exercise it on a small file.
    monkeypatch.setitem(imaging.FORMAT_MAX_PIXELS, "WEBP", 500_000)
    webp = photos.encode(photos.portrait(0), "WEBP", quality=80)
    assert reason_of(webp) == (
        "The photo is 768x960, 737,280 pixels; a WebP photo can have at most 500,000 (0.5 "
        "megapixels). Upload a smaller photo, or save it as JPEG."
    )
    assert reason_of(photos.jpeg(photos.portrait(0))) is None
