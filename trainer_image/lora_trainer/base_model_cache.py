"""Where the base model's files come from, fastest first, and keeping them for the next worker.

A fresh Vertex worker has an empty disk: without help every job would download
gigabytes from the Hugging Face Hub. :func:`resolve_base_model` looks, in order:

1. a local folder named by the job (tests, the demo, a baked-in model);
2. the local Hugging Face cache (a restarted container on the same disk, offline runs);
3. a snapshot in the bucket under ``schema.model_cache_prefix()``: read in place
   through Vertex's Cloud Storage FUSE mount (``/gcs/<bucket>/...``) when it is
   there, else copied to local disk with every file's size and SHA-256 checked;
4. the Hub itself (``from_pretrained`` downloads into the local cache), after
   which :func:`save_snapshot` copies the downloaded files to the bucket.

A snapshot is ``<prefix><repo>/<revision>/files/...`` plus a ``MANIFEST.json``
(files, sizes, checksums) written last with ``if_generation_match=0``, and a
``LATEST.json`` naming the revision to use. A snapshot with a missing or
damaged file is ignored (the Hub is asked instead). Offline runs
(``HF_HUB_OFFLINE=1``) keep working: steps 1-3 need no Hub.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

log = logging.getLogger(__name__)

MANIFEST: Final = "MANIFEST.json"
LATEST: Final = "LATEST.json"
#: Where Vertex AI mounts the project's buckets in custom-job containers.
GCS_MOUNT_ROOT: Final = Path("/gcs")

LOCAL, HF_CACHE, BUCKET, GCS_MOUNT, HUB = "local", "hf-cache", "bucket", "gcs-mount", "hub"


@dataclass(frozen=True)
class ModelSource:
    """What ``from_pretrained`` reads (a folder, or the hub id) and where it came from."""

    path: str
    revision: str | None  # hub commit or folder fingerprint; None until a hub download
    origin: str  # LOCAL, HF_CACHE, BUCKET, GCS_MOUNT or HUB


def repo_folder(model_id: str) -> str:
    """``org/name`` -> ``org--name`` (one path segment, as the Hugging Face cache names it)."""
    return model_id.replace("/", "--")


def folder_fingerprint(folder: Path) -> str:
    """A revision for a local model folder: its files' names, sizes and modification times."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return "local-" + digest.hexdigest()[:32]


def hf_cached_snapshot(model_id: str, cache_dir: Path | None = None) -> Path | None:
    """The local Hugging Face cache's snapshot folder of ``model_id`` (its name is the commit)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model_id, "model_index.json",
                                       cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as err:  # noqa: BLE001 - an odd id or cache: not cached
        log.debug("no local cache entry for %s: %s", model_id, err)
        return None
    if not isinstance(found, str):
        return None
    folder = Path(found).parent
    if not looks_complete(folder):  # e.g. configs read, weights never downloaded
        log.info("the local cache of %s lacks weights; not using it", model_id)
        return None
    return folder


#: Pipeline components whose folder must hold weights for ``from_pretrained`` to work.
_WEIGHTED = ("unet", "vae", "text_encoder", "text_encoder_2")


def looks_complete(folder: Path) -> bool:
    """Every weighted component that model_index.json names has a weights file."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    for name in _WEIGHTED:
        value = index.get(name)
        if not isinstance(value, list) or value[0] is None:
            continue  # not part of this pipeline
        sub = folder / name
        if not any(p.suffix in (".safetensors", ".bin") for p in sub.glob("*")):
            return False
    return True


class SnapshotStore:
    """Base-model snapshots in the bucket (and its ``/gcs`` mount, when present)."""

    def __init__(self, bucket: Any, *, mount_root: Path | None = GCS_MOUNT_ROOT) -> None:
        from actorgen import schema

        self.bucket = bucket
        self.prefix = schema.model_cache_prefix()
        self.mount_root = mount_root

    def _root(self, model_id: str) -> str:
        return f"{self.prefix}{repo_folder(model_id)}/"

    def latest_revision(self, model_id: str) -> str | None:
        try:
            raw = self.bucket.blob(self._root(model_id) + LATEST).download_as_bytes()
            revision = json.loads(raw)["revision"]
        except Exception as err:  # noqa: BLE001 - none, unreadable or unreachable: no snapshot
            log.info("no base-model snapshot of %s in the bucket (%s)", model_id,
                     type(err).__name__)
            return None
        return revision if isinstance(revision, str) and "/" not in revision else None

    def manifest(self, model_id: str, revision: str) -> dict[str, Any] | None:
        name = f"{self._root(model_id)}{revision}/{MANIFEST}"
        try:
            manifest = json.loads(self.bucket.blob(name).download_as_bytes())
            files = manifest["files"]
            if not isinstance(files, dict) or not files:
                raise ValueError("no files")
            for rel, meta in files.items():
                if rel.startswith("/") or ".." in Path(rel).parts:
                    raise ValueError(f"bad file name {rel[:80]!r}")
                int(meta["size"]), str(meta["sha256"])
            return manifest
        except Exception as err:  # noqa: BLE001
            log.warning("ignoring the base-model snapshot %s: %s", name, err)
            return None

    def mounted(self, model_id: str, revision: str, manifest: dict[str, Any]) -> Path | None:
        """The snapshot's folder on the ``/gcs`` mount when every file is there at its size."""
        if self.mount_root is None:
            return None
        folder = self.mount_root / self.bucket.name / f"{self._root(model_id)}{revision}/files"
        try:
            if not folder.is_dir():
                return None
            for rel, meta in manifest["files"].items():
                if (folder / rel).stat().st_size != int(meta["size"]):
                    log.warning("the mounted snapshot's %s has the wrong size", rel)
                    return None
        except OSError:
            return None
        return folder

    def download(self, model_id: str, revision: str, manifest: dict[str, Any],
                 dest_root: Path) -> Path | None:
        """Copy the snapshot to ``dest_root``, checking every file; None when it is damaged."""
        dest = dest_root / repo_folder(model_id) / revision
        remote = f"{self._root(model_id)}{revision}/files/"
        try:
            for rel, meta in sorted(manifest["files"].items()):
                path = dest / rel
                if path.is_file() and path.stat().st_size == int(meta["size"]) and \
                        _sha256(path) == meta["sha256"]:
                    continue  # an earlier attempt on this disk copied it already
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_name(path.name + ".partial")
                self.bucket.blob(remote + rel).download_to_filename(str(partial))
                if partial.stat().st_size != int(meta["size"]) or \
                        _sha256(partial) != meta["sha256"]:
                    partial.unlink(missing_ok=True)
                    raise ValueError(f"{rel} does not match the snapshot's manifest")
                os.replace(partial, path)
        except Exception as err:  # noqa: BLE001 - damaged or unreachable: use the Hub
            log.warning("ignoring the base-model snapshot of %s at %s: %s", model_id, revision,
                        err)
            shutil.rmtree(dest, ignore_errors=True)
            return None
        return dest

    def save(self, model_id: str, revision: str, folder: Path) -> bool:
        """Upload ``folder`` as the snapshot of ``model_id`` at ``revision``.

        Returns False when a complete snapshot of that revision exists already
        (another worker was first). Files are written before the manifest, so a
        reader never trusts a half-uploaded snapshot.
        """
        root = f"{self._root(model_id)}{revision}/"
        if self.manifest(model_id, revision) is not None:
            return False
        files = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            if rel.startswith(".") or rel.endswith(".partial"):
                continue
            # Same revision, same bytes: a concurrent writer's overwrite changes nothing.
            self.bucket.blob(root + "files/" + rel).upload_from_filename(str(path.resolve()))
            files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        manifest = {"modelId": model_id, "revision": revision, "files": files,
                    "createdAt": datetime.now(UTC).isoformat()}
        try:
            self.bucket.blob(root + MANIFEST).upload_from_string(
                json.dumps(manifest, sort_keys=True), content_type="application/json",
                if_generation_match=0)
        except Exception as err:
            if getattr(err, "code", None) != 412:
                raise
            return False
        self.bucket.blob(self._root(model_id) + LATEST).upload_from_string(
            json.dumps({"revision": revision}), content_type="application/json")
        log.info("saved the base model %s at %s to the bucket (%d files)", model_id, revision,
                 len(files))
        return True


def resolve_base_model(model_id: str, store: SnapshotStore | None, work_root: Path, *,
                       hf_cache_dir: Path | None = None) -> ModelSource:
    """Where to load ``model_id`` from (see the module's docstring for the order)."""
    if Path(model_id).is_dir():
        return ModelSource(model_id, folder_fingerprint(Path(model_id)), LOCAL)
    cached = hf_cached_snapshot(model_id, hf_cache_dir)
    if cached is not None:
        return ModelSource(str(cached), cached.name, HF_CACHE)
    if store is not None:
        revision = store.latest_revision(model_id)
        manifest = store.manifest(model_id, revision) if revision else None
        if revision and manifest:
            mounted = store.mounted(model_id, revision, manifest)
            if mounted is not None:
                return ModelSource(str(mounted), revision, GCS_MOUNT)
            local = store.download(model_id, revision, manifest, work_root)
            if local is not None:
                return ModelSource(str(local), revision, BUCKET)
    return ModelSource(model_id, None, HUB)


def save_snapshot(source: ModelSource, store: SnapshotStore | None, model_id: str, *,
                  hf_cache_dir: Path | None = None) -> ModelSource:
    """After a Hub download: the source with its revision, its files saved to the bucket.

    Never raises: the job has its model; only the next worker would miss the copy.
    """
    if source.origin != HUB:
        return source
    snapshot = hf_cached_snapshot(model_id, hf_cache_dir)
    if snapshot is None:
        return source
    if store is not None:
        try:
            store.save(model_id, snapshot.name, snapshot)
        except Exception as err:  # noqa: BLE001
            log.warning("could not save the base model's snapshot to the bucket: %s", err)
    return ModelSource(source.path, snapshot.name, HUB)


def save_in_background(source: ModelSource, store: SnapshotStore | None,
                       model_id: str) -> tuple[ModelSource, threading.Thread | None]:
    """After a Hub download: the source with its revision, and a thread saving the snapshot.

    The upload (gigabytes) overlaps training instead of delaying it; join the
    thread before the process ends.
    """
    if source.origin != HUB:
        return source, None
    snapshot = hf_cached_snapshot(model_id)
    if snapshot is None:
        return source, None
    thread = threading.Thread(target=save_snapshot, args=(source, store, model_id),
                              name="snapshot-upload", daemon=True)
    thread.start()
    return ModelSource(source.path, snapshot.name, HUB), thread


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
