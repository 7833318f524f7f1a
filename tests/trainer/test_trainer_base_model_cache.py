"""The base-model cache: local folder, local Hugging Face cache, bucket snapshot (copied
or through the /gcs mount), and the Hub as the last resort; against the Storage emulator.

The Hub itself cannot be reached here, so its local cache is laid out as
huggingface_hub writes it (``models--org--name/refs/main`` + ``snapshots/<commit>/``).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from lora_trainer.base_model_cache import (
    BUCKET,
    GCS_MOUNT,
    HF_CACHE,
    HUB,
    LATEST,
    LOCAL,
    ModelSource,
    SnapshotStore,
    repo_folder,
    resolve_base_model,
    save_snapshot,
)
from lora_trainer.config import TrainConfig


def _hf_cache(root: Path, model_id: str, model: Path, commit: str) -> Path:
    repo = root / f"models--{repo_folder(model_id)}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model, repo / "snapshots" / commit)
    return root


@pytest.fixture
def model_id() -> str:
    return f"org/tiny-{uuid.uuid4().hex[:8]}"  # a fresh cache entry per test


def test_a_local_folder_is_used_in_place_with_a_content_revision(tiny_sd: Path,
                                                                 tmp_path: Path) -> None:
    model = shutil.copytree(tiny_sd, tmp_path / "model")
    first = resolve_base_model(str(model), None, tmp_path / "work")
    assert first.origin == LOCAL and first.path == str(model)
    assert resolve_base_model(str(model), None, tmp_path / "work").revision == first.revision
    (model / "unet" / "config.json").write_text(
        (model / "unet" / "config.json").read_text() + " ")
    assert resolve_base_model(str(model), None, tmp_path / "work").revision != first.revision


def test_snapshot_survives_the_worker(emulators: Any, bucket: Any, tiny_sd: Path,
                                      tmp_path: Path, model_id: str) -> None:
    from lora_trainer import models

    store = SnapshotStore(bucket, mount_root=None)
    commit = "a" * 40
    hf = _hf_cache(tmp_path / "hf", model_id, tiny_sd, commit)
    # Worker 1 downloaded the model from the Hub: its local cache has it.
    found = resolve_base_model(model_id, store, tmp_path / "w1", hf_cache_dir=hf)
    assert found.origin == HF_CACHE and found.revision == commit
    saved = save_snapshot(ModelSource(model_id, None, HUB), store, model_id, hf_cache_dir=hf)
    assert saved.revision == commit
    assert not store.save(model_id, commit, Path(found.path))  # already complete: no rewrite

    # Worker 2: empty disk, offline. The bucket's snapshot is copied and loads.
    empty = tmp_path / "hf-empty"
    empty.mkdir()
    copied = resolve_base_model(model_id, store, tmp_path / "w2", hf_cache_dir=empty)
    assert copied.origin == BUCKET and copied.revision == commit
    assert Path(copied.path).is_relative_to(tmp_path / "w2")
    config = TrainConfig(job_id="j", attempt=1, user_id="u", actor_id="a", instance_name="ohwx",
                         base_model_id=model_id)
    loaded = models.load_base_model(config, torch.device("cpu"), source=copied.path)
    assert loaded.kind == "sd" and loaded.info.model_id == model_id
    # Again on the same disk (a restarted container): nothing to copy, same folder.
    assert resolve_base_model(model_id, store, tmp_path / "w2",
                              hf_cache_dir=empty).path == copied.path

    # Worker 3 on Vertex: the bucket is mounted under /gcs; read in place, nothing copied.
    mount = tmp_path / "gcs"
    shutil.copytree(copied.path, mount / bucket.name / "cache" / "models" /
                    repo_folder(model_id) / commit / "files")
    mounted = resolve_base_model(model_id, SnapshotStore(bucket, mount_root=mount),
                                 tmp_path / "w3", hf_cache_dir=empty)
    assert mounted.origin == GCS_MOUNT and not (tmp_path / "w3").exists()


def test_damaged_snapshots_fall_back_to_the_hub(emulators: Any, bucket: Any, tiny_sd: Path,
                                                tmp_path: Path, model_id: str) -> None:
    store = SnapshotStore(bucket, mount_root=None)
    commit = "b" * 40
    hf = _hf_cache(tmp_path / "hf", model_id, tiny_sd, commit)
    save_snapshot(ModelSource(model_id, None, HUB), store, model_id, hf_cache_dir=hf)
    empty = tmp_path / "hf-empty"
    empty.mkdir()
    root = f"cache/models/{repo_folder(model_id)}/"
    manifest = json.loads(bucket.blob(f"{root}{commit}/MANIFEST.json").download_as_bytes())
    weights = next(rel for rel in manifest["files"] if rel.startswith("unet/") and
                   rel.endswith(".safetensors"))
    blob = bucket.blob(f"{root}{commit}/files/{weights}")
    good = blob.download_as_bytes()
    blob.upload_from_string(good[: len(good) // 2])  # a truncated upload

    found = resolve_base_model(model_id, store, tmp_path / "w", hf_cache_dir=empty)
    assert found == ModelSource(model_id, None, HUB)
    assert not (tmp_path / "w" / repo_folder(model_id) / commit).exists()  # nothing half-copied

    # A mount with a short file is not used either.
    mount = tmp_path / "gcs"
    files = mount / bucket.name / root / commit / "files"
    shutil.copytree(tiny_sd, files)
    (files / weights).write_bytes(b"short")
    assert resolve_base_model(model_id, SnapshotStore(bucket, mount_root=mount),
                              tmp_path / "w", hf_cache_dir=empty).origin == HUB

    # An unreadable LATEST pointer: no snapshot.
    bucket.blob(root + LATEST).upload_from_string(b"not json")
    assert resolve_base_model(model_id, store, tmp_path / "w",
                              hf_cache_dir=empty).origin == HUB


def test_a_local_cache_without_weights_is_not_used(tiny_sd: Path, tmp_path: Path,
                                                   model_id: str) -> None:
    hf = _hf_cache(tmp_path / "hf", model_id, tiny_sd, "c" * 40)
    for weights in (hf / f"models--{repo_folder(model_id)}").rglob("*.safetensors"):
        if weights.parent.name == "unet":
            weights.unlink()  # configs read by an earlier run, weights never downloaded
    found = resolve_base_model(model_id, None, tmp_path / "w", hf_cache_dir=hf)
    assert found.origin == HUB and found.path == model_id
