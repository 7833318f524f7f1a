"""Test photos, from real photos of people that ship in packages: nothing committed.

The distinct valid photos of one person (:func:`portrait`) are three real photos
of one man from face_recognition's test images, and three more made from them
by a strong perspective turn, a mirror and other colours: their faces are 0.30 or
more apart (distinct real photos of him measure 0.32-0.45, copies at most 0.22),
so the upload validator's copy check (0.25) does not call them copies of one
another, while they stay one person (under 0.6). docs/faces.md has the figures.
Other people and special cases come from scikit-image's astronaut and insightface's
group photo (see REAL_PHOTOS). bin/setup installs them into .venv.

Used by the local demo (``tools.demo``) and, through ``tests.photos``, by the
functions tests, the end-to-end test and the trainer tests. Every builder is
deterministic and returns a PIL image or encoded bytes. Needs the dev venv
(scikit-image, Pillow); nothing deployed imports it.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from PIL import Image

__all__ = [
    "BACKGROUNDS",
    "HEAD_BOX",
    "MAX_VALID_PHOTOS",
    "PHOTO_SIZE",
    "other_person",
    "astronaut",
    "background",
    "compose",
    "decompression_bomb",
    "encode",
    "head",
    "heic",
    "jpeg",
    "no_face",
    "portrait",
    "small_face",
    "text_as_jpg",
    "too_small",
    "truncated",
    "two_people",
    "with_exif_rotation",
    "REAL_PHOTOS",
    "real_photo",
    "real_photo_bytes",
    "real_photos_missing",
    "friends",
]

#: Sample images without a detectable face, used as backdrops.
BACKGROUNDS = (
    "coffee",
    "rocket",
    "camera",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "colorwheel",
    "chelsea",  # the cat's face is not a (frontal human) face to the cascade
)
#: Head-and-shoulders box of the astronaut (left, top, right, bottom); her face is
#: at about (175, 76, 90, 90) in the 512x512 original.
HEAD_BOX = (110, 0, 350, 260)
#: Size of a valid photo: short side above the default 512-pixel minimum.
PHOTO_SIZE = (768, 960)
#: (real photo, mirrored, perspective turn, crop box in the turned photo, colour,
#: brightness) of each distinct valid photo of one person. The first three are the
#: real photos as they are (cropped to PHOTO_SIZE's shape); a turn of 0.3 squeezes one
#: side of the photo by 30% top and bottom, as if the camera moved round the head.
_LAYOUTS = (
    ("obama", False, 0.0, (62, 0, 910, 1060), 1.0, 1.0),
    ("obama2", False, 0.0, (0, 100, 626, 882), 1.0, 1.0),
    ("obama3", False, 0.0, (262, 0, 1314, 1315), 1.0, 1.0),
    ("obama", True, 0.3, (102, 82, 733, 871), 1.3, 0.9),
    ("obama2", False, -0.3, (0, 210, 626, 992), 0.7, 0.95),
    ("obama3", True, 0.3, (279, 267, 1004, 1174), 1.3, 1.0),
)
MAX_VALID_PHOTOS = len(_LAYOUTS)


@functools.cache
def _sample(name: str) -> Image.Image:
    from PIL import Image
    from skimage import data

    pixels = getattr(data, name)()
    image = Image.fromarray(pixels)
    return image.convert("RGB")


def astronaut() -> Image.Image:
    """The original 512x512 portrait (one face; exactly the minimum short side)."""
    return _sample("astronaut").copy()


def head() -> Image.Image:
    """The astronaut's head and shoulders (240x260)."""
    return _sample("astronaut").crop(HEAD_BOX)


def background(name: str, size: tuple[int, int] = PHOTO_SIZE) -> Image.Image:
    """A face-free sample image stretched to ``size``."""
    from PIL import Image

    return _sample(name).resize(size, Image.Resampling.BICUBIC)


def compose(
    backdrop: str,
    heads: list[tuple[float, tuple[float, float]]],
    size: tuple[int, int] = PHOTO_SIZE,
) -> Image.Image:
    """``backdrop`` with the head pasted once per (scale, (cx, cy)) entry."""
    from PIL import Image

    canvas = background(backdrop, size)
    for scale, (cx, cy) in heads:
        piece = head()
        piece = piece.resize(
            (round(piece.width * scale), round(piece.height * scale)), Image.Resampling.LANCZOS
        )
        left = round(cx * size[0] - piece.width / 2)
        top = round(cy * size[1] - piece.height / 2)
        canvas.paste(piece, (left, top))
    return canvas


def portrait(index: int = 0) -> Image.Image:
    """Distinct valid photo ``index`` (0 .. MAX_VALID_PHOTOS-1) of one person."""
    from PIL import Image, ImageEnhance, ImageOps

    name, mirrored, turn, box, colour, brightness = _LAYOUTS[index]
    image = real_photo(name)
    if mirrored:
        image = ImageOps.mirror(image)
    if turn:
        image = _turn(image, turn)
    image = image.crop(box).resize(PHOTO_SIZE, Image.Resampling.LANCZOS)
    if colour != 1.0:
        image = ImageEnhance.Color(image).enhance(colour)
    if brightness != 1.0:
        image = ImageEnhance.Brightness(image).enhance(brightness)
    return image


def _turn(image: Image.Image, amount: float) -> Image.Image:
    """A perspective turn: one side (right when ``amount`` > 0) shrinks by ``amount``."""
    from PIL import Image

    w, h = image.size
    k = abs(amount)
    if amount > 0:
        quad = (0, 0, 0, h, w, h + h * k, w, -h * k)
    else:
        quad = (0, -h * k, 0, h + h * k, w, h, w, 0)
    return image.transform((w, h), Image.Transform.QUAD, quad, Image.Resampling.BICUBIC)


def other_person(index: int = 0) -> Image.Image:
    """A valid photo of someone else than :func:`portrait`'s person (0: the astronaut)."""
    from PIL import Image

    if index == 0:
        return astronaut().resize((640, 640), Image.Resampling.LANCZOS)
    if index == 1:
        image = real_photo("biden")
        return image.crop((100, 0, 970, 1088)).resize(PHOTO_SIZE, Image.Resampling.LANCZOS)
    raise IndexError(index)


def two_people() -> Image.Image:
    """A real photo of two people side by side (cropped from insightface's group photo)."""
    from PIL import Image

    return friends().crop((380, 200, 900, 616)).resize((832, 666), Image.Resampling.LANCZOS)


def no_face() -> Image.Image:
    """A coffee cup, no person (768x640, landscape)."""
    return background("coffee", (768, 640))


def small_face() -> Image.Image:
    """One face, far too small for training (a distant person)."""
    return compose("coffee", [(0.8, (0.5, 0.5))], size=(1600, 1200))


def too_small() -> Image.Image:
    """One clear face but only 320x400 pixels."""
    from PIL import Image

    return portrait(0).resize((320, 400), Image.Resampling.LANCZOS)


# --------------------------------------------------------------------------- encodings
def encode(image: Image.Image, fmt: str = "JPEG", **options: object) -> bytes:
    """``image`` saved as ``fmt`` (JPEG quality 92 unless given)."""
    if fmt == "JPEG":
        options.setdefault("quality", 92)
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def jpeg(image: Image.Image, quality: int = 92) -> bytes:
    """``image`` as JPEG bytes."""
    return encode(image, "JPEG", quality=quality)


def heic(image: Image.Image) -> bytes:
    """``image`` as HEIC, the way phones save photos (needs pillow-heif)."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    return encode(image, "HEIF", quality=85)


def with_exif_rotation(image: Image.Image, fmt: str = "PNG") -> bytes:
    """Pixels stored on their side plus EXIF Orientation=6, as a phone held upright saves them.

    Decoded without EXIF the face lies sideways (the cascade misses it); with the
    orientation applied it is ``image`` again.
    """
    from PIL import Image

    stored = image.transpose(Image.Transpose.ROTATE_90)  # 90 deg counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    return encode(stored, fmt, exif=exif.tobytes())


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    """The first part of an encoded file, as an interrupted upload leaves it."""
    return data[: max(1, int(len(data) * keep))]


def decompression_bomb(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (1.6 gigapixels)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\0" * (width + 1) * 4)  # a few rows; the rest is "missing"
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def text_as_jpg() -> bytes:
    """Not an image at all, but would be uploaded as notes.jpg."""
    return b"These are my notes, not a photo.\n" * 40


# --------------------------------------------------------------------------- real photos
#: Real photos of people that ship in packages (installed into .venv by bin/setup, never
#: committed): name -> (source, file). Sources: "face_recognition" (the face_recognition
#: source archive's test images, unpacked into .venv/share/actorgen-test-photos),
#: "insightface" (its wheel's data/images).
REAL_PHOTOS = {
    # One person, three distinct photos (different days, poses, light, expressions).
    "obama": ("face_recognition", "obama.jpg"),  # arms crossed, smiling, 910x1137
    "obama2": ("face_recognition", "obama2.jpg"),  # speaking at a lectern, 626x1200
    "obama3": ("face_recognition", "obama3.jpg"),  # standing, whole body, 1434x2333
    # Copies that the files ship as: obama2 re-encoded as RGBA PNG, obama cropped so the
    # face is cut by the left / right edge.
    "obama2-rgba": ("face_recognition", "32bit.png"),
    "obama-cut-left": ("face_recognition", "obama_partial_face.jpg"),
    "obama-cut-right": ("face_recognition", "obama_partial_face2.jpg"),
    # Other people.
    "biden": ("face_recognition", "biden.jpg"),  # 970x2204, standing
    "friends": ("insightface", "t1.jpg"),  # six people at a table, several turned, 1280x886
    "hanks": ("insightface", "Tom_Hanks_54745.png"),  # an aligned 112x112 face crop
}


def _real_photo_dir(source: str) -> "Path":
    import importlib.util
    import sys
    from pathlib import Path

    if source == "face_recognition":
        return Path(sys.prefix) / "share" / "actorgen-test-photos" / "face_recognition"
    spec = importlib.util.find_spec(source)  # the package's data, without importing it
    if spec is None or not spec.submodule_search_locations:
        return Path("/nonexistent") / source
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "images"


def real_photos_missing() -> str | None:
    """Why the real photos cannot be read (run bin/setup), or None when they are there."""
    for name, (source, file_name) in REAL_PHOTOS.items():
        if not (_real_photo_dir(source) / file_name).is_file():
            return f"real test photo {name!r} ({source}/{file_name}) is missing: run bin/setup"
    return None


def real_photo_bytes(name: str) -> bytes:
    """The file of real photo ``name`` (see REAL_PHOTOS), as shipped."""
    source, file_name = REAL_PHOTOS[name]
    path = _real_photo_dir(source) / file_name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: bin/setup installs the real test photos")
    return path.read_bytes()


@functools.cache
def _real(name: str) -> "Image.Image":
    from PIL import Image

    with Image.open(io.BytesIO(real_photo_bytes(name))) as img:
        return img.convert("RGB")


def real_photo(name: str) -> "Image.Image":
    """Real photo ``name`` (see REAL_PHOTOS) as an RGB image."""
    return _real(name).copy()


def friends() -> "Image.Image":
    """A real group photo: six people around a table, several turned or looking down."""
    return real_photo("friends")
