"""Face detection with OpenCV's bundled frontal-face Haar cascade.

The cascade ships inside the opencv-python-headless wheel, so nothing is
downloaded at run time. Upload validation uses it to require exactly one face;
the trainer uses the same boxes to crop around the face.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from PIL import Image

#: Detection runs on a copy whose long side is at most this; boxes are scaled back.
DETECT_MAX_SIDE: Final = 640
#: Faces smaller than this share of the image's short side are ignored as noise.
MIN_FACE_FRACTION: Final = 0.08
CASCADE_FILE: Final = "haarcascade_frontalface_default.xml"


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


_per_thread = threading.local()


def _cascade() -> Any:
    # One classifier per thread: detectMultiScale on a shared CascadeClassifier is
    # not thread-safe (concurrent calls returned phantom faces).
    classifier = getattr(_per_thread, "classifier", None)
    if classifier is None:
        import cv2

        classifier = cv2.CascadeClassifier(cv2.data.haarcascades + CASCADE_FILE)
        if classifier.empty():  # a broken OpenCV install must not look like "no face"
            raise RuntimeError(f"OpenCV could not load its bundled {CASCADE_FILE}")
        _per_thread.classifier = classifier
    return classifier


def detect_faces(
    image: "Image.Image", *, min_face_fraction: float = MIN_FACE_FRACTION
) -> list[FaceBox]:
    """Faces in ``image`` (an RGB PIL image), largest first, in its pixel coordinates."""
    import cv2
    import numpy as np

    width, height = image.size
    scale = min(1.0, DETECT_MAX_SIDE / max(width, height))
    small = image if scale == 1.0 else image.resize(
        (max(1, round(width * scale)), max(1, round(height * scale)))
    )
    gray = cv2.cvtColor(np.asarray(small.convert("RGB")), cv2.COLOR_RGB2GRAY)
    gray = cv2.equalizeHist(gray)
    min_side = max(16, int(min(gray.shape) * min_face_fraction))
    boxes = _cascade().detectMultiScale(
        gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side)
    )
    faces = [
        FaceBox(round(x / scale), round(y / scale), round(w / scale), round(h / scale))
        for (x, y, w, h) in (boxes if len(boxes) else [])
    ]
    return sorted(faces, key=lambda f: f.area, reverse=True)


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
