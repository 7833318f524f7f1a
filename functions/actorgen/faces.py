"""Face analysis: detection, landmarks, quality and identity, shared by validation and training.

dlib (the ``dlib-bin`` wheel) with the models that ship in the
``face-recognition-models`` package, so it runs offline in the functions, the
trainer and the tests:

- detection: dlib's HOG frontal detector (its five sub-detectors cover faces
  turned and tilted by about 30-40 degrees), with the CNN (MMOD) detector as a
  fallback when HOG finds nothing;
- landmarks: the 5-point shape predictor (eye corners and the base of the nose;
  enough to align a face, at 9 MB against the 68-point model's 100 MB);
- identity: the 128-d ResNet embedding (99.38% on LFW). Two faces whose
  embeddings are closer than :data:`SAME_PERSON_MAX_DISTANCE` are one person.

Detection runs on a copy whose long side is at most :data:`DETECT_MAX_SIDE`;
boxes and landmarks are scaled back to the pixels of the image given. The
models are loaded on first use, once per process (about 60 MB resident), and
every dlib call holds one lock: the functions handle one request at a time and
the trainer analyses from one thread, so the lock only guards odd concurrency.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

#: Detection runs on a copy whose long side is at most this; boxes are scaled back.
DETECT_MAX_SIDE: Final = 800
#: HOG upsampling of the detection copy: 1 finds faces down to about 40 pixels there.
HOG_UPSAMPLE: Final = 1
#: Least HOG detection score that counts as a face. dlib's default (0) let through a
#: mission patch on the astronaut's suit (0.12); the faintest real face measured, a
#: half-turned face in a group photo, scored 0.51 (docs/faces.md).
MIN_HOG_SCORE: Final = 0.3
#: Least CNN (MMOD) confidence that counts as a face (the fallback detector).
MIN_CNN_CONFIDENCE: Final = 0.3
#: The CNN fallback runs on a copy at most this long (it costs ~10x HOG per pixel).
CNN_MAX_SIDE: Final = 640
#: Faces smaller than this share of the image's short side are ignored as noise.
MIN_FACE_FRACTION: Final = 0.08
#: Euclidean distance between two 128-d embeddings below which they are one person:
#: dlib's own threshold (99.38% on LFW). docs/faces.md has the distances measured here.
SAME_PERSON_MAX_DISTANCE: Final = 0.6
#: Length of :attr:`FaceAnalysis.embedding`.
EMBEDDING_SIZE: Final = 128
#: Side of the aligned face chip the embedding is computed on (dlib's default).
CHIP_SIZE: Final = 150

_MODELS_PACKAGE: Final = "face_recognition_models"
_SHAPE_MODEL: Final = "shape_predictor_5_face_landmarks.dat"
_EMBEDDING_MODEL: Final = "dlib_face_recognition_resnet_model_v1.dat"
_CNN_MODEL: Final = "mmod_human_face_detector.dat"


@dataclass(frozen=True)
class FaceBox:
    x: int
    y: int
    w: int
    h: int

    @property
    def area(self) -> int:
        return self.w * self.h

    @property
    def center(self) -> tuple[float, float]:
        return (self.x + self.w / 2, self.y + self.h / 2)

    def as_dict(self) -> dict[str, int]:
        return {"x": self.x, "y": self.y, "w": self.w, "h": self.h}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> FaceBox:
        return cls(*(int(value[k]) for k in ("x", "y", "w", "h")))


class QualityProblem:
    """Codes of :meth:`FaceQuality.problems`."""

    CUT_OFF = "cut-off"
    PROFILE = "profile"
    DARK = "dark"
    BLOWN_OUT = "blown-out"
    BLURRY = "blurry"


@dataclass(frozen=True)
class QualityLimits:
    """Where a face stops being usable; the figures behind them are in docs/faces.md."""

    #: Laplacian variance of the 128-px face: the astronaut measures 151, blurred with a
    #: 1-px Gaussian 19, 2 px 4.3; soft but usable faces in a real group photo 13-42.
    min_sharpness: float = 8.0
    #: Mean grey of the face (0-255): real photos measured 108-175.
    min_brightness: float = 40.0
    #: Share of face pixels at 250 or more.
    max_clipped: float = 0.25
    #: Nose offset in eye distances: 0.02-0.13 frontal, 0.37 for a face turned about 50
    #: degrees (still fine); 0.55 is about 60 degrees, where one eye starts to hide.
    max_yaw: float = 0.55
    #: Share of the face box outside the photo: the real cropped copies measure 0.23-0.24.
    max_cut_off: float = 0.10


@dataclass(frozen=True)
class FaceQuality:
    """Measurements of one face that tell whether it is usable for training.

    ``sharpness``: variance of the Laplacian of the face, resized to 128 px grey
    (blur is judged on the face, not on a sharp background). ``brightness``: mean
    grey level (0-255) of the face; ``clipped``: share of its pixels at 250 or
    above (blown out). ``yaw``: how far the nose sits from the middle of the eyes,
    in eye distances (0 frontal, about 0.5 and more in profile). ``cut_off``:
    share of the detected face box outside the photo.
    """

    sharpness: float
    brightness: float
    clipped: float
    yaw: float
    cut_off: float

    def problems(self, limits: QualityLimits | None = None) -> list[str]:
        """What is wrong with the face for training (QualityProblem codes), worst first."""
        limits = limits or QualityLimits()
        found = []
        if self.cut_off > limits.max_cut_off:
            found.append(QualityProblem.CUT_OFF)
        if self.yaw > limits.max_yaw:
            found.append(QualityProblem.PROFILE)
        if self.brightness < limits.min_brightness:
            found.append(QualityProblem.DARK)
        if self.clipped > limits.max_clipped:
            found.append(QualityProblem.BLOWN_OUT)
        if self.sharpness < limits.min_sharpness:
            found.append(QualityProblem.BLURRY)
        return found

    def as_dict(self) -> dict[str, float]:
        return {
            "sharpness": round(self.sharpness, 1),
            "brightness": round(self.brightness, 1),
            "clipped": round(self.clipped, 3),
            "yaw": round(self.yaw, 3),
            "cutOff": round(self.cut_off, 3),
        }


@dataclass(frozen=True)
class FaceAnalysis:
    """One face: where it is (in the pixels of the image analysed) and who it is."""

    box: FaceBox
    landmarks: list[tuple[float, float]]  # 5 points: right eye 2, left eye 2, nose base
    embedding: list[float]  # 128-d, unit-ish length
    quality: FaceQuality
    detector: str = "hog"  # "hog" or "cnn"

    def __hash__(self) -> int:  # lists are not hashable; the box identifies a face
        return hash((self.box, self.detector))

    def rescaled(self, factor: float) -> FaceAnalysis:
        """The same face in an image ``factor`` times as large (box and landmarks)."""
        if factor == 1.0:
            return self
        b = self.box
        box = FaceBox(round(b.x * factor), round(b.y * factor), round(b.w * factor),
                      round(b.h * factor))
        points = [(x * factor, y * factor) for x, y in self.landmarks]
        return FaceAnalysis(box, points, self.embedding, self.quality, self.detector)

    def as_record(self) -> dict[str, Any]:
        """The image record's face keys (``schema.ImageField``): box, landmarks, embedding."""
        from actorgen.schema import ImageField

        return {
            ImageField.FACE: self.box.as_dict(),
            # Firestore has no nested arrays: points are maps.
            ImageField.LANDMARKS: [{"x": round(x, 1), "y": round(y, 1)} for x, y in self.landmarks],
            ImageField.EMBEDDING: [round(v, 6) for v in self.embedding],
            ImageField.FACE_QUALITY: self.quality.as_dict(),
        }


def embedding_from_record(record: Mapping[str, Any]) -> list[float] | None:
    """The stored embedding of an image record, or None when it has none (or a bad one)."""
    from actorgen.schema import ImageField

    value = record.get(ImageField.EMBEDDING)
    if not isinstance(value, Sequence) or len(value) != EMBEDDING_SIZE:
        return None
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None


def embedding_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """Euclidean distance between two face embeddings (0 = identical)."""
    if len(a) != len(b):
        raise ValueError(f"embeddings of different lengths ({len(a)} and {len(b)})")
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))


def same_person(a: Sequence[float], b: Sequence[float]) -> bool:
    return embedding_distance(a, b) < SAME_PERSON_MAX_DISTANCE


# --------------------------------------------------------------------------- models
_lock = threading.Lock()


def _model_file(name: str) -> str:
    import importlib.util
    from pathlib import Path

    # find_spec does not run the package's __init__, which imports pkg_resources.
    spec = importlib.util.find_spec(_MODELS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {_MODELS_PACKAGE} package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    if not path.is_file():
        raise RuntimeError(f"{_MODELS_PACKAGE} lacks its model file {name}")
    return str(path)


@functools.cache
def _hog() -> Any:
    import dlib

    return dlib.get_frontal_face_detector()


@functools.cache
def _cnn() -> Any:
    import dlib

    return dlib.cnn_face_detection_model_v1(_model_file(_CNN_MODEL))


@functools.cache
def _shape_predictor() -> Any:
    import dlib

    return dlib.shape_predictor(_model_file(_SHAPE_MODEL))


@functools.cache
def _embedder() -> Any:
    import dlib

    return dlib.face_recognition_model_v1(_model_file(_EMBEDDING_MODEL))


def load_models() -> None:
    """Load every model now (benchmarks and warm-up); otherwise they load on first use."""
    with _lock:
        _hog(), _shape_predictor(), _embedder(), _cnn()


# --------------------------------------------------------------------------- detection
@dataclass(frozen=True)
class _Detection:
    left: float  # in the detection copy's pixels
    top: float
    right: float
    bottom: float
    detector: str


def _detection_copy(image: Image.Image) -> tuple[np.ndarray, float]:
    """RGB uint8 pixels of ``image`` with the long side at most DETECT_MAX_SIDE, and the scale."""
    import numpy as np
    from PIL import Image as PILImage

    width, height = image.size
    scale = min(1.0, DETECT_MAX_SIDE / max(width, height))
    small = image if scale == 1.0 else image.resize(
        (max(1, round(width * scale)), max(1, round(height * scale))),
        PILImage.Resampling.BILINEAR,
    )
    pixels = np.ascontiguousarray(np.asarray(small.convert("RGB"), dtype=np.uint8))
    return pixels, scale


def _detect(pixels: np.ndarray, min_side: float, *, cnn_fallback: bool) -> list[_Detection]:
    rects, scores, _ = _hog().run(pixels, HOG_UPSAMPLE, MIN_HOG_SCORE)
    found = [
        _Detection(r.left(), r.top(), r.right(), r.bottom(), "hog")
        for r, score in zip(rects, scores, strict=True) if score >= MIN_HOG_SCORE
    ]
    if not found and cnn_fallback:
        # The CNN finds faces HOG misses (stronger turns, odd light) but costs ~10x;
        # only photos HOG calls faceless pay for it.
        found = _detect_cnn(pixels)
    found = [d for d in found if min(d.right - d.left, d.bottom - d.top) >= min_side]
    return sorted(found, key=lambda d: (d.right - d.left) * (d.bottom - d.top), reverse=True)


def _detect_cnn(pixels: np.ndarray) -> list[_Detection]:
    import numpy as np
    from PIL import Image as PILImage

    height, width = pixels.shape[:2]
    shrink = min(1.0, CNN_MAX_SIDE / max(width, height))
    if shrink < 1.0:
        small = PILImage.fromarray(pixels).resize(
            (max(1, round(width * shrink)), max(1, round(height * shrink))),
            PILImage.Resampling.BILINEAR,
        )
        pixels = np.ascontiguousarray(np.asarray(small))
    return [
        _Detection(d.rect.left() / shrink, d.rect.top() / shrink, d.rect.right() / shrink,
                   d.rect.bottom() / shrink, "cnn")
        for d in _cnn()(pixels, 0) if d.confidence >= MIN_CNN_CONFIDENCE
    ]


def _box(d: _Detection, scale: float, size: tuple[int, int]) -> FaceBox:
    """The detection in the original image's pixels, clipped to the image."""
    width, height = size
    left = max(0, round(d.left / scale))
    top = max(0, round(d.top / scale))
    right = min(width, round(d.right / scale))
    bottom = min(height, round(d.bottom / scale))
    return FaceBox(left, top, max(1, right - left), max(1, bottom - top))


def detect_faces(
    image: Image.Image, *, min_face_fraction: float = MIN_FACE_FRACTION,
    cnn_fallback: bool = True,
) -> list[FaceBox]:
    """Faces in ``image`` (an RGB PIL image), largest first, in its pixel coordinates."""
    pixels, scale = _detection_copy(image)
    min_side = max(12.0, min(pixels.shape[:2]) * min_face_fraction)
    with _lock:
        found = _detect(pixels, min_side, cnn_fallback=cnn_fallback)
    boxes = [_box(d, scale, image.size) for d in found]
    return sorted(boxes, key=lambda b: b.area, reverse=True)


def analyze_faces(
    image: Image.Image, *, min_face_fraction: float = MIN_FACE_FRACTION,
    cnn_fallback: bool = True,
) -> list[FaceAnalysis]:
    """Every face in ``image`` (RGB), largest first, with landmarks, embedding and quality."""
    import dlib

    pixels, scale = _detection_copy(image)
    min_side = max(12.0, min(pixels.shape[:2]) * min_face_fraction)
    out = []
    with _lock:
        found = _detect(pixels, min_side, cnn_fallback=cnn_fallback)
        for d in found:
            rect = dlib.rectangle(round(d.left), round(d.top), round(d.right), round(d.bottom))
            shape = _shape_predictor()(pixels, rect)
            embedding = list(_embedder().compute_face_descriptor(pixels, shape))
            points = [(shape.part(i).x, shape.part(i).y) for i in range(shape.num_parts)]
            out.append((d, points, embedding))
    analyses = [
        FaceAnalysis(
            box=_box(d, scale, image.size),
            landmarks=[(x / scale, y / scale) for x, y in points],
            embedding=[float(v) for v in embedding],
            quality=measure_quality(pixels, d, points),
            detector=d.detector,
        )
        for d, points, embedding in out
    ]
    return sorted(analyses, key=lambda a: a.box.area, reverse=True)


# --------------------------------------------------------------------------- quality
#: Side of the grey face patch that sharpness is measured on, so it does not
#: depend on the face's size in pixels.
QUALITY_PATCH: Final = 128


def measure_quality(
    pixels: np.ndarray, d: _Detection, points: Sequence[tuple[float, float]]
) -> FaceQuality:
    """Sharpness, exposure, yaw and cut-off of one detected face (see FaceQuality)."""
    import numpy as np
    from PIL import Image as PILImage

    height, width = pixels.shape[:2]
    box_w, box_h = d.right - d.left, d.bottom - d.top
    inside_w = max(0.0, min(d.right, width) - max(d.left, 0))
    inside_h = max(0.0, min(d.bottom, height) - max(d.top, 0))
    cut_off = 1.0 - (inside_w * inside_h) / max(1.0, box_w * box_h)

    left, top = max(0, int(d.left)), max(0, int(d.top))
    right, bottom = min(width, int(d.right)), min(height, int(d.bottom))
    patch = pixels[top:bottom, left:right]
    if patch.size == 0:
        return FaceQuality(0.0, 0.0, 0.0, _yaw(points), cut_off)
    grey = PILImage.fromarray(patch).convert("L").resize(
        (QUALITY_PATCH, QUALITY_PATCH), PILImage.Resampling.BILINEAR
    )
    g = np.asarray(grey, dtype=np.float32)
    laplacian = (
        g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]
    )
    grey_full = np.asarray(PILImage.fromarray(patch).convert("L"), dtype=np.float32)
    return FaceQuality(
        sharpness=float(laplacian.var()),
        brightness=float(grey_full.mean()),
        clipped=float((grey_full >= 250).mean()),
        yaw=_yaw(points),
        cut_off=float(cut_off),
    )


def _yaw(points: Sequence[tuple[float, float]]) -> float:
    """Offset of the nose base from the eyes' midpoint, in eye distances (5-point model)."""
    if len(points) < 5:
        return 0.0
    right_eye = ((points[0][0] + points[1][0]) / 2, (points[0][1] + points[1][1]) / 2)
    left_eye = ((points[2][0] + points[3][0]) / 2, (points[2][1] + points[3][1]) / 2)
    nose = points[4]
    ex, ey = left_eye[0] - right_eye[0], left_eye[1] - right_eye[1]
    eye_distance = math.hypot(ex, ey) or 1.0
    mid = ((left_eye[0] + right_eye[0]) / 2, (left_eye[1] + right_eye[1]) / 2)
    # Component of (nose - mid) along the eye line: sideways offset, roll-independent.
    along = ((nose[0] - mid[0]) * ex + (nose[1] - mid[1]) * ey) / eye_distance
    return abs(along) / eye_distance


# --------------------------------------------------------------------------- cropping
def face_crop_box(
    face: FaceBox, image_size: tuple[int, int], *, margin: float = 1.0
) -> tuple[int, int, int, int]:
    """A square ``(left, top, right, bottom)`` around ``face`` inside the image.

    ``margin`` is extra room on each side in face widths: 1.0 gives a crop
    three faces wide (head, hair and shoulders), which is what a person LoRA
    should see. Near an edge the square slides inward; it shrinks only when
    the image itself is smaller.
    """
    width, height = image_size
    side = int(round(max(face.w, face.h) * (1 + 2 * margin)))
    side = max(1, min(side, width, height))
    cx, cy = face.center
    left = int(round(cx - side / 2))
    top = int(round(cy - side / 2))
    left = min(max(0, left), width - side)
    top = min(max(0, top), height - side)
    return left, top, left + side, top + side
