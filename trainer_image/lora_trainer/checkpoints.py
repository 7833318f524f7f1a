"""Resumable training: checkpoints in Cloud Storage, written so a kill at any
moment leaves either a complete checkpoint or one that is ignored.

Layout under ``schema.checkpoint_prefix(job_id, attempt)``::

    step-000200/lora_weights.safetensors   LoRA weights (fp32)
    step-000200/training_state.pt          optimiser, LR schedule, loss scaler, RNG, step
    step-000200/COMPLETE                   JSON: step, sizes and sha256 of the files above

The marker is uploaded last; a folder without it (the upload was cut off) is
skipped and later pruned. Files are checked against the marker on load, and a
damaged checkpoint falls back to the next older one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch

log = logging.getLogger(__name__)

MARKER: Final = "COMPLETE"
WEIGHTS_FILE: Final = "lora_weights.safetensors"
STATE_FILE: Final = "training_state.pt"
_STEP_DIR: Final = re.compile(r"^step-(\d{6,})/")


def step_dir(step: int) -> str:
    return f"step-{step:06d}/"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    prefix: str  # storage prefix of the step folder, ending in "/"
    marker: Mapping[str, Any]


@dataclass
class RestoredState:
    step: int
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]
    meta: dict[str, Any]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CheckpointStore:
    """Save, find, load and prune the checkpoints of one job attempt."""

    def __init__(self, bucket: Any, prefix: str, work_dir: Path, *, keep: int = 1) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.work_dir = Path(work_dir)
        self.keep = max(1, keep)

    # --------------------------------------------------------------- listing
    def _step_folders(self) -> dict[int, set[str]]:
        """``{step: {file names}}`` of every folder under the prefix, complete or not."""
        folders: dict[int, set[str]] = {}
        for blob in self.bucket.list_blobs(prefix=self.prefix):
            rest = blob.name[len(self.prefix):]
            match = _STEP_DIR.match(rest)
            if match:
                folders.setdefault(int(match[1]), set()).add(rest[match.end():])
        return folders

    def complete(self) -> list[Checkpoint]:
        """Complete checkpoints, newest first."""
        found = []
        for step, names in sorted(self._step_folders().items(), reverse=True):
            if MARKER not in names:
                continue
            prefix = self.prefix + step_dir(step)
            try:
                marker = json.loads(self.bucket.blob(prefix + MARKER).download_as_bytes())
            except Exception as err:  # noqa: BLE001 - an unreadable marker = incomplete
                log.warning("ignoring checkpoint %s: unreadable marker (%s)", prefix, err)
                continue
            found.append(Checkpoint(step=step, prefix=prefix, marker=marker))
        return found

    # ---------------------------------------------------------------- saving
    def save(self, step: int, weights: Mapping[str, torch.Tensor], state: Mapping[str, Any],
             meta: Mapping[str, Any]) -> Checkpoint:
        """Write a checkpoint (marker last), then prune older ones."""
        from safetensors.torch import save_file

        local = self.work_dir / step_dir(step)
        local.mkdir(parents=True, exist_ok=True)
        try:
            files = {WEIGHTS_FILE: local / WEIGHTS_FILE, STATE_FILE: local / STATE_FILE}
            save_file({k: v.contiguous() for k, v in weights.items()}, str(files[WEIGHTS_FILE]))
            torch.save(dict(state), files[STATE_FILE])
            prefix = self.prefix + step_dir(step)
            entries = {}
            for name, path in files.items():
                self.bucket.blob(prefix + name).upload_from_filename(str(path))
                entries[name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
            marker = {"step": step, "files": entries, "meta": dict(meta)}
            self.bucket.blob(prefix + MARKER).upload_from_string(
                json.dumps(marker, sort_keys=True), content_type="application/json"
            )
        finally:
            shutil.rmtree(local, ignore_errors=True)
        log.info("checkpoint saved at step %d (%s)", step, prefix)
        self.prune()
        return Checkpoint(step=step, prefix=prefix, marker=marker)

    def prune(self) -> None:
        """Delete all but the ``keep`` newest complete checkpoints, and incomplete leftovers."""
        folders = self._step_folders()
        complete = sorted((s for s, names in folders.items() if MARKER in names), reverse=True)
        keep = set(complete[: self.keep])
        newest = complete[0] if complete else -1
        for step, names in folders.items():
            # An incomplete folder newer than the newest complete one may be a
            # save in flight (another process cannot exist, but be safe).
            if step in keep or (MARKER not in names and step > newest):
                continue
            prefix = self.prefix + step_dir(step)
            # Marker first: a prune cut off half-way leaves an ignored folder.
            ordered = sorted(names, key=lambda n: n != MARKER)
            for name in ordered:
                try:
                    self.bucket.blob(prefix + name).delete()
                except Exception as err:  # noqa: BLE001 - pruning is best effort
                    log.warning("could not delete %s%s: %s", prefix, name, err)

    def delete_all(self) -> None:
        """Remove every checkpoint of this attempt (after the model is published)."""
        for blob in list(self.bucket.list_blobs(prefix=self.prefix)):
            try:
                blob.delete()
            except Exception as err:  # noqa: BLE001
                log.warning("could not delete %s: %s", blob.name, err)

    # --------------------------------------------------------------- loading
    def load(self, checkpoint: Checkpoint, device: torch.device) -> RestoredState:
        """Download and verify one checkpoint."""
        from safetensors.torch import load_file

        local = self.work_dir / ("restore-" + step_dir(checkpoint.step))
        local.mkdir(parents=True, exist_ok=True)
        try:
            paths = {}
            for name, expected in checkpoint.marker["files"].items():
                path = local / name
                self.bucket.blob(checkpoint.prefix + name).download_to_filename(str(path))
                if path.stat().st_size != expected["size"] or _sha256(path) != expected["sha256"]:
                    raise ValueError(f"{name} does not match its checksum")
                paths[name] = path
            weights = load_file(str(paths[WEIGHTS_FILE]))
            state = torch.load(paths[STATE_FILE], map_location=device, weights_only=True)
        finally:
            shutil.rmtree(local, ignore_errors=True)
        return RestoredState(step=checkpoint.step, weights=weights, state=state,
                             meta=dict(checkpoint.marker.get("meta", {})))

    def latest(self, device: torch.device,
               fingerprint: Mapping[str, Any] | None = None) -> RestoredState | None:
        """The newest complete, intact checkpoint made with the same settings, if any."""
        for checkpoint in self.complete():
            meta = checkpoint.marker.get("meta", {})
            if fingerprint is not None and meta.get("fingerprint") != dict(fingerprint):
                log.warning("ignoring checkpoint at step %d: made with other settings",
                            checkpoint.step)
                continue
            try:
                return self.load(checkpoint, device)
            except Exception as err:  # noqa: BLE001 - fall back to an older one
                log.warning("ignoring damaged checkpoint at step %d: %s", checkpoint.step, err)
        return None
