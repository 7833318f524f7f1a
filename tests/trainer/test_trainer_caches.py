"""The trainer's caches against the Storage emulator: hit, miss, damaged entries,
concurrent writers, and the class-image cache with a real (tiny) base model."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from actorgen import schema
from lora_trainer.caches import MANIFEST, BlobCache, ClassImageCache, cache_key
from lora_trainer.config import TrainConfig


@pytest.fixture
def cache(emulators: Any, bucket: Any) -> BlobCache:
    return BlobCache(bucket, f"{schema.CACHE_PREFIX}test-{uuid.uuid4().hex[:8]}/")


def _names(bucket: Any, cache: BlobCache, key: str) -> list[str]:
    folder = f"{cache.prefix}{key}/"
    return sorted(b.name.removeprefix(folder) for b in bucket.list_blobs(prefix=folder))


def test_miss_then_hit_with_the_settings(cache: BlobCache, bucket: Any) -> None:
    key = cache_key({"model": "m", "seed": 1})
    assert key == cache_key({"seed": 1, "model": "m"}) != cache_key({"model": "m", "seed": 2})
    assert cache.get(key).entry is None
    made = []

    def make() -> tuple[bytes, dict[str, Any]]:
        made.append(1)
        return b"latents" * 1000, {"seed": 1}

    entry, hit = cache.get_or_make(key, make)
    assert not hit and entry.payload == b"latents" * 1000
    entry, hit = cache.get_or_make(key, make)
    assert hit and entry.payload == b"latents" * 1000 and entry.settings == {"seed": 1}
    assert made == [1]
    names = _names(bucket, cache, key)
    assert len(names) == 2 and MANIFEST in names  # one payload, one manifest


def _damage_payload(bucket: Any, cache: BlobCache, key: str) -> None:
    folder = f"{cache.prefix}{key}/"
    manifest = json.loads(bucket.blob(folder + MANIFEST).download_as_bytes())
    bucket.blob(folder + manifest["payload"]).upload_from_string(b"trunc")


def _drop_payload(bucket: Any, cache: BlobCache, key: str) -> None:
    folder = f"{cache.prefix}{key}/"
    manifest = json.loads(bucket.blob(folder + MANIFEST).download_as_bytes())
    bucket.blob(folder + manifest["payload"]).delete()


def _garble_manifest(bucket: Any, cache: BlobCache, key: str) -> None:
    bucket.blob(f"{cache.prefix}{key}/{MANIFEST}").upload_from_string(b'{"payload": ')


@pytest.mark.parametrize("damage", [_damage_payload, _drop_payload, _garble_manifest],
                         ids=["truncated-payload", "missing-payload", "garbled-manifest"])
def test_damaged_entries_are_ignored_and_rebuilt(cache: BlobCache, bucket: Any,
                                                 damage: Any) -> None:
    key = cache_key({"k": damage.__name__})
    assert cache.put(key, b"good" * 100, {"v": 1})
    damage(bucket, cache, key)
    lookup = cache.get(key)
    assert lookup.entry is None and lookup.problem and lookup.replace_generation > 0
    entry, hit = cache.get_or_make(key, lambda: (b"rebuilt" * 50, {"v": 2}))
    assert not hit and entry.payload == b"rebuilt" * 50
    again = cache.get(key)
    assert again.entry is not None and again.entry.payload == b"rebuilt" * 50
    assert again.entry.settings == {"v": 2}
    # A payload that failed its checksum is deleted; a garbled manifest names none.
    expected = 3 if damage is _garble_manifest else 2
    assert len(_names(bucket, cache, key)) == expected


def test_a_writer_that_died_before_its_manifest_leaves_a_miss(cache: BlobCache,
                                                              bucket: Any) -> None:
    key = cache_key({"k": "partial"})
    bucket.blob(f"{cache.prefix}{key}/orphan.bin").upload_from_string(b"half")
    assert cache.get(key).entry is None
    entry, hit = cache.get_or_make(key, lambda: (b"whole", {}))
    assert not hit and cache.get(key).entry == entry


def test_content_that_does_not_fit_is_rebuilt(cache: BlobCache) -> None:
    key = cache_key({"k": "shape"})
    cache.put(key, b"old format", {})
    entry, hit = cache.get_or_make(key, lambda: (b"new format", {}),
                                   valid=lambda e: e.payload.startswith(b"new"))
    assert not hit and cache.get(key).entry.payload == b"new format"  # type: ignore[union-attr]


def test_concurrent_writers_leave_exactly_one_entry(cache: BlobCache, bucket: Any) -> None:
    key = cache_key({"k": "race"})
    writers = 4
    barrier = threading.Barrier(writers)
    won: list[bool] = []
    lock = threading.Lock()

    def write(index: int) -> None:
        # Each writer made its own payload (a different worker, a different seed of luck).
        clone = BlobCache(bucket, cache.prefix)
        barrier.wait()
        result = clone.put(key, f"payload-{index}".encode() * 100, {"writer": index})
        with lock:
            won.append(result)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    # Cloud Storage refuses all manifests but the first (if_generation_match=0): one
    # winner. The Storage emulator ignores preconditions, so there the writers that read
    # back another's manifest know they lost; earlier ones may keep an unused payload.
    assert len(won) == writers and won.count(True) >= 1
    entry = cache.get(key).entry
    assert entry is not None  # whoever won, the entry is whole and consistent
    winner = entry.settings["writer"]
    assert entry.payload == f"payload-{winner}".encode() * 100
    names = _names(bucket, cache, key)
    assert len(names) == 1 + won.count(True)  # every loser deleted its payload


def _class_config(base: Path, **overrides: Any) -> TrainConfig:
    values: dict[str, Any] = dict(
        job_id="j", attempt=1, user_id="u", actor_id="a", instance_name="ohwx",
        base_model_id=str(base), prior_preservation=True, num_class_images=3,
        sample_steps=2, seed=7, resolution=64)
    values.update(overrides)
    return TrainConfig(**values)


def test_class_images_are_drawn_once_per_settings(emulators: Any, bucket: Any,
                                                  tiny_sd: Path) -> None:
    from lora_trainer import models
    from lora_trainer.encode import generate_class_latents

    config = _class_config(tiny_sd)
    model = models.load_base_model(config, torch.device("cpu"))
    revision = f"rev-{uuid.uuid4().hex[:8]}"  # a fresh cache for this test
    drawn: list[int] = []

    def drawer(cfg: TrainConfig) -> Any:
        def draw() -> Any:
            drawn.append(cfg.seed)
            return generate_class_latents(model, cfg.class_prompt, cfg.num_class_images, 64,
                                          steps=cfg.sample_steps,
                                          guidance_scale=cfg.guidance_scale, seed=cfg.seed)
        return draw

    first = ClassImageCache(bucket, config.base_model_id, revision)
    made = first(model, config, 64, drawer(config))
    assert first.hit is False and drawn == [7]
    assert made.mean.shape == (3, 4, 8, 8) and float(made.std.abs().sum()) == 0

    # Another job (another worker) asking the same: the very same latents, nothing drawn.
    second = ClassImageCache(bucket, config.base_model_id, revision)
    again = second(model, config, 64, drawer(config))
    assert second.hit is True and drawn == [7]
    assert torch.equal(again.mean, made.mean)

    # Another seed, count or revision is another entry.
    other_seed = _class_config(tiny_sd, seed=8)
    third = ClassImageCache(bucket, config.base_model_id, revision)
    third(model, other_seed, 64, drawer(other_seed))
    assert third.hit is False and drawn == [7, 8]
    fewer = _class_config(tiny_sd, num_class_images=2)
    fourth = ClassImageCache(bucket, config.base_model_id, revision)
    assert fourth(model, fewer, 64, drawer(fewer)).mean.shape[0] == 2 and fourth.hit is False
    new_weights = ClassImageCache(bucket, config.base_model_id, revision + "-b")
    new_weights(model, config, 64, drawer(config))
    assert new_weights.hit is False


def test_class_latents_of_the_wrong_shape_are_rebuilt(emulators: Any, bucket: Any,
                                                      tiny_sd: Path) -> None:
    from lora_trainer import models
    from lora_trainer.encode import LatentStats
    from safetensors.torch import save

    config = _class_config(tiny_sd, num_class_images=2)
    model = models.load_base_model(config, torch.device("cpu"))
    source = ClassImageCache(bucket, config.base_model_id, f"rev-{uuid.uuid4().hex[:8]}")
    key = cache_key(source.settings(model, config, 64))
    # An intact entry (checksum fine) whose latents are not what this job needs.
    source.cache.put(key, save({"latents": torch.zeros(5, 4, 8, 8)}), {})
    fresh = torch.randn(2, 4, 8, 8)
    out = source(model, config, 64, lambda: LatentStats(fresh, torch.zeros_like(fresh)))
    assert source.hit is False and torch.equal(out.mean, fresh)
    entry = source.cache.get(key).entry
    assert entry is not None and entry.settings["count"] == 2


def _run(job: Any, emulators: Any, work: Path) -> int:
    from lora_trainer.run import RunOptions, run_job

    from tests.trainer.seed import TOY_SETTINGS

    return run_job(RunOptions(
        job_id=job.job_id, attempt=1, project=emulators.project, bucket=emulators.bucket,
        work_dir=work, max_steps_override=2, device="cpu", push_to_hub=False,
        progress_bar=False, settings={**TOY_SETTINGS, "num_class_images": 2}))


def test_jobs_share_class_images_through_the_cache(emulators: Any, db: Any, bucket: Any,
                                                   tiny_sd: Path, tmp_path: Path) -> None:
    from lora_trainer.run import EXIT_OK
    from lora_trainer.timing import Phase

    from tests.trainer.seed import seed_job

    F = schema.Field
    model = shutil.copytree(tiny_sd, tmp_path / "model")  # a revision no other test used
    results = []
    for index in range(2):
        job = seed_job(db, bucket, model, images=2, **{F.PRIOR_PRESERVATION: True})
        assert _run(job, emulators, tmp_path / f"work-{index}") == EXIT_OK
        doc = job.job(db)
        assert doc[F.STATUS] == schema.JobStatus.COMPLETED, doc.get(F.ERROR)
        results.append(doc)
    first, second = (doc[F.METRICS] for doc in results)
    assert first["classImageCache"] == "miss" and second["classImageCache"] == "hit"
    assert first["baseModelSource"] == second["baseModelSource"] == "local"
    assert first["compileCache"] is None  # compile is off by default
    assert all(Phase.CLASS_IMAGES in doc[F.TIMINGS] for doc in results)
    entries = {b.name.split("/")[2] for b in bucket.list_blobs(
        prefix=schema.class_image_cache_prefix())}
    assert len(entries) == 1  # one entry, shared


#: One "worker": compile a small training step with a fresh local compile cache, using
#: the bucket's artifacts when there are some; print what happened as JSON.
_COMPILE_WORKER = """
import json, sys, torch
from torch._dynamo.utils import counters
from actorgen import clients
from lora_trainer.caches import CompileCache
torch.set_num_threads(1)
cache = CompileCache(clients.storage_bucket(sys.argv[1]), {"shape": [4, 8]},
                     torch.device("cpu"))
loaded = cache.load()
w = torch.randn(8, 8, requires_grad=True)
step = torch.compile(lambda x: torch.relu(x @ w).sin().sum())
step(torch.randn(4, 8)).backward()
saved = cache.save()
print(json.dumps({"loaded": loaded, "saved": saved,
                  "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"]}))
"""


def test_compile_artifacts_travel_between_workers(emulators: Any, bucket: Any,
                                                  tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.trainer.seed import REPO_ROOT, trainer_env

    def worker(name: str) -> dict[str, Any]:
        env = trainer_env({**emulators.env, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / name)})
        done = subprocess.run([sys.executable, "-c", _COMPILE_WORKER, emulators.bucket],
                              env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = worker("first")  # nothing in the bucket: compiles, then saves
    assert first["loaded"] is False and first["saved"] is True
    assert first["misses"] > 0 and first["hits"] == 0
    second = worker("second")  # an empty local cache, but the bucket has the artifacts
    assert second["loaded"] is True and second["saved"] is False
    assert second["hits"] > 0 and second["misses"] == 0
    assert list(bucket.list_blobs(prefix=schema.compile_cache_prefix()))


def test_the_compile_cache_key_tells_apart_what_compiles_differently() -> None:
    """A loaded entry is never replaced (CompileCache.save), so settings that change
    the compiled program must change the key. The memory budget does: gradient
    checkpointing "auto" turns on or off by what the probe step measures against it."""
    from types import SimpleNamespace

    from lora_trainer.run import _compile_shapes

    model = SimpleNamespace(unet=SimpleNamespace(config={"sample_size": 64}))
    config = TrainConfig(job_id="j", attempt=1, user_id="u", actor_id="a",
                         instance_name="sks", base_model_id="m", compile_mode="regional")
    shapes = _compile_shapes(model, config, 512)
    for change in ({"gpu_memory_gib": 24.0}, {"fused_lora": False}, {"cuda_graphs": False},
                   {"compile_mode": "full"}, {"gradient_checkpointing": "on"}):
        other = _compile_shapes(model, dataclasses.replace(config, **change), 512)
        assert other != shapes, change
