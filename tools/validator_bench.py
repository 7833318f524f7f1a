"""Figures behind the face checks and the upload validator (docs/faces.md).

    .venv/bin/python -m tools.validator_bench [faces] [identity] [memory] [--megapixels 48]

- ``faces``: detector hits, misses and false faces on the real photos, OpenCV's
  Haar cascade (the detector before dlib; needs opencv-python-headless, dev only)
  against dlib HOG and HOG with the CNN fallback;
- ``identity``: embedding distances of one person's distinct photos, of copies of
  a photo, of the test portraits, and of different people;
- ``memory``: time and peak memory of ``uploads.analyse`` per photo kind, cold
  (a fresh process: imports and models included) and warm (a second photo in the
  same process), and the peak above the resting process per megapixel.

Prints tables; asserts nothing (figures, not tests). Needs bin/setup's real photos.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "functions", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

#: Hand-checked face centres (x, y) of the real photos (one per person shown).
FACES = {
    "astronaut": [(220, 121)],
    "camera": [(220, 155)],
    "obama": [(505, 272)],
    "obama2": [(305, 455)],
    "obama3": [(787, 441)],
    "biden": [(596, 400)],
    "friends": [(121, 334), (314, 222), (518, 360), (784, 414), (930, 135), (1169, 334)],
    "hanks": [(51, 69)],
}


def _photo(name: str) -> Any:
    from PIL import Image
    from skimage import data

    from tools import photos

    if name in ("astronaut", "camera"):
        return Image.fromarray(getattr(data, name)()).convert("RGB")
    return photos.real_photo(name)


def _haar(image: Any) -> list[tuple[int, int, int, int]]:
    """The detector validation used before dlib: OpenCV's frontal-face Haar cascade."""
    import cv2
    import numpy as np

    classifier = cv2.CascadeClassifier(
        cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    scale = min(1.0, 640 / max(image.size))
    small = image.resize((round(image.width * scale), round(image.height * scale)))
    grey = cv2.equalizeHist(cv2.cvtColor(np.asarray(small), cv2.COLOR_RGB2GRAY))
    min_side = max(16, int(min(grey.shape) * 0.04))
    found = classifier.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5,
                                        minSize=(min_side, min_side))
    return [tuple(round(v / scale) for v in box) for box in (found if len(found) else [])]


def _score(boxes: list[tuple[int, int, int, int]], centres: list[tuple[int, int]]
           ) -> tuple[int, int, int]:
    """(hits, misses, false faces): a face is hit when a box contains its centre."""
    hits = sum(any(x <= cx <= x + w and y <= cy <= y + h for x, y, w, h in boxes)
               for cx, cy in centres)
    false = sum(not any(x <= cx <= x + w and y <= cy <= y + h for cx, cy in centres)
                for x, y, w, h in boxes)
    return hits, len(centres) - hits, false


def bench_faces() -> None:
    from actorgen import faces

    print("\n## Detection on real photos: hits / misses / false faces\n")
    print("| photo | faces | Haar (before) | dlib HOG | HOG + CNN fallback |")
    print("| --- | --- | --- | --- | --- |")
    totals = {"haar": [0, 0, 0], "hog": [0, 0, 0], "both": [0, 0, 0]}
    for name, centres in FACES.items():
        image = _photo(name)
        found = {
            "haar": _haar(image),
            "hog": [(b.x, b.y, b.w, b.h) for b in faces.detect_faces(
                image, min_face_fraction=0.04, cnn_fallback=False)],
            "both": [(b.x, b.y, b.w, b.h) for b in faces.detect_faces(
                image, min_face_fraction=0.04)],
        }
        cells = []
        for key, boxes in found.items():
            score = _score(boxes, centres)
            totals[key] = [a + b for a, b in zip(totals[key], score, strict=True)]
            cells.append("%d / %d / %d" % score)
        print(f"| {name} | {len(centres)} | " + " | ".join(cells) + " |")
    print("| **all** | %d | " % sum(map(len, FACES.values()))
          + " | ".join("%d / %d / %d" % tuple(t) for t in totals.values()) + " |")


def bench_identity() -> None:
    from PIL import ImageEnhance, ImageOps

    from actorgen import faces
    from tools import photos

    def emb(image: Any) -> list[float]:
        return faces.analyze_faces(image)[0].embedding

    person = {n: emb(photos.real_photo(n)) for n in ("obama", "obama2", "obama3")}
    others = {"astronaut": emb(_photo("astronaut")), "biden": emb(photos.real_photo("biden")),
              "hanks": emb(photos.real_photo("hanks"))}
    for i, face in enumerate(faces.analyze_faces(photos.friends())):
        others[f"friend{i}"] = face.embedding
    d = faces.embedding_distance

    def line(label: str, values: list[float]) -> None:
        print(f"| {label} | {len(values)} | {min(values):.3f} | {statistics.mean(values):.3f} "
              f"| {max(values):.3f} |")

    print("\n## Identity: embedding distances\n")
    print("| pairs | n | min | mean | max |")
    print("| --- | --- | --- | --- | --- |")
    line("one person, distinct real photos",
         [d(a, b) for a, b in itertools.combinations(person.values(), 2)])
    copies = []
    for name in ("obama", "obama2", "obama3"):
        image = photos.real_photo(name)
        w, h = image.size
        out = io.BytesIO()
        image.save(out, "JPEG", quality=40)
        variants = [ImageOps.mirror(image), image.crop((w // 20, h // 20, w - w // 20, h - h // 20)),
                    _reopen(out),
                    image.resize((w // 2, h // 2)), ImageOps.grayscale(image).convert("RGB"),
                    ImageEnhance.Color(image).enhance(1.4), image.rotate(8)]
        copies += [d(person[name], emb(v.convert("RGB"))) for v in variants]
    line("copies (mirror, 5% crop, JPEG q40, half size, grey, colour, 8 deg)", copies)
    portraits = [emb(photos.portrait(i)) for i in range(photos.MAX_VALID_PHOTOS)]
    line("test portraits (tools/photos.portrait)",
         [d(a, b) for a, b in itertools.combinations(portraits, 2)])
    line("different people", [d(a, b) for a, b in itertools.combinations(
        [*others.values(), person["obama"]], 2)] + [
        d(p, o) for p in person.values() for o in others.values()])


def _reopen(buffer: io.BytesIO) -> Any:
    from PIL import Image

    buffer.seek(0)
    return Image.open(buffer)


# --------------------------------------------------------------------------- memory
def _photo_bytes(kind: str, megapixels: float) -> bytes:
    import numpy as np
    from PIL import Image

    from tools import photos

    base = photos.portrait(0)
    side = (megapixels * 1e6 / (base.width * base.height)) ** 0.5
    size = (round(base.width * side), round(base.height * side))
    if kind == "png-16bit-grey":
        # Like the issue's hostile file: a smooth 16-bit frame compresses to little.
        grey = np.asarray(base.convert("L").resize(size), dtype=np.uint16) * 257
        return _save(Image.fromarray(grey), "PNG")
    if kind == "jpeg-no-face":  # HOG finds nothing, so the CNN looks again
        return _save(photos.background("coffee", size), "JPEG", quality=90)
    image = base.resize(size)
    if kind == "jpeg":
        return _save(image, "JPEG", quality=90)
    if kind == "png-rgb":
        return _save(image, "PNG", compress_level=1)
    if kind == "png-rgba":
        return _save(image.convert("RGBA"), "PNG", compress_level=1)
    if kind == "png-palette":
        return _save(image.convert("P"), "PNG", compress_level=1)
    if kind == "webp":
        return _save(image, "WEBP", quality=80)
    if kind == "heic":
        # x265 at its fastest preset: encoding is what is slow here, not decoding.
        import pillow_heif

        pillow_heif.register_heif_opener()
        return _save(image, "HEIF", quality=80, enc_params={"preset": "ultrafast"})
    raise ValueError(kind)


def _save(image: Any, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


_CHILD = r"""
import json, sys, time
sys.path[:0] = [sys.argv[1] + "/functions", sys.argv[1]]

def rss():
    fields = dict(l.split(":", 1) for l in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

data = [open(p, "rb").read() for p in sys.argv[2:4]]
from actorgen import uploads
policy = uploads.UploadPolicy(max_bytes=200 << 20, min_side=512, max_images=30)
out = {}
for label, blob in (("cold", data[0]), ("warm", data[1])):
    before, _ = rss()
    reset_peak()
    t = time.perf_counter()
    facts = uploads.analyse(blob, policy)
    seconds = time.perf_counter() - t
    after, peak = rss()
    out[label] = {"seconds": seconds, "peak_mb": peak, "rest_mb": before,
                  "faces": len(facts.faces), "error": facts.decode_error or facts.analysis_error}
print(json.dumps(out))
"""


def bench_memory(megapixels: float, only: str = "") -> None:
    import tempfile

    print(f"\n## uploads.analyse per photo ({megapixels:g} MP unless noted), fresh process each\n")
    print("| photo | bytes | cold s | warm s | cold peak MB | warm peak MB | resting MB "
          "| peak above rest, MB/MP |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    kinds = ["jpeg", "jpeg-no-face", "png-rgb", "png-16bit-grey", "png-rgba", "png-palette",
             "webp", "heic"]
    kinds = [k for k in kinds if not only or k in only.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            size = min(megapixels, 24.0) if kind == "webp" else megapixels  # WebP's limit: 25
            first = Path(tmp) / f"{kind}-1"
            second = Path(tmp) / f"{kind}-2"
            data = _photo_bytes(kind, size)
            first.write_bytes(data)
            second.write_bytes(_photo_bytes(kind, size * 0.9))
            result = subprocess.run(
                [sys.executable, "-c", _CHILD, str(ROOT), str(first), str(second)],
                capture_output=True, text=True, check=False, timeout=900,
            )
            if result.returncode != 0:
                print(f"| {kind} | failed: {result.stderr.strip().splitlines()[-1:]} |")
                continue
            r = json.loads(result.stdout.strip().splitlines()[-1])
            cold, warm = r["cold"], r["warm"]
            above = (warm["peak_mb"] - warm["rest_mb"]) / (size * 0.9)
            note = f" ({cold['error']})" if cold["error"] else ""
            note += f", {size:g} MP" if size != megapixels else ""
            print(f"| {kind}{note} | {len(data):,} | {cold['seconds']:.2f} | "
                  f"{warm['seconds']:.2f} | {cold['peak_mb']:.0f} | {warm['peak_mb']:.0f} | "
                  f"{warm['rest_mb']:.0f} | {above:.1f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="*", default=["faces", "identity", "memory"],
                        choices=["faces", "identity", "memory"])
    parser.add_argument("--megapixels", type=float, default=48.0,
                        help="size of the photos of the memory benchmark (default 48)")
    parser.add_argument("--kinds", default="",
                        help="memory: comma-separated photo kinds (default all)")
    args = parser.parse_args(argv)
    if "faces" in args.parts:
        bench_faces()
    if "identity" in args.parts:
        bench_identity()
    if "memory" in args.parts:
        bench_memory(args.megapixels, args.kinds)


if __name__ == "__main__":
    main()
