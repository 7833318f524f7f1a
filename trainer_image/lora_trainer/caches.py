"""Work that repeats across jobs and attempts, kept in Cloud Storage.

:class:`BlobCache` is the storage discipline every cache here shares. An entry
is a folder ``<prefix><key>/`` holding one payload under a unique name and a
small ``MANIFEST.json`` naming it, with its size, SHA-256 and the settings that
made it. The manifest is written last, with ``if_generation_match=0``: of two
workers filling the same entry at once, exactly one manifest is created and the
other writer deletes its payload. A reader trusts nothing but a manifest whose
payload has the recorded size and checksum; anything else (a half-written
entry, a truncated upload, bytes that do not parse) counts as a miss, and the
entry is rebuilt and its manifest replaced under a precondition on the damaged
manifest's generation.

Built on it:

- :class:`ClassImageCache` -- latents of the class images of prior
  preservation, keyed by base model, revision, class prompt, resolution, count,
  seed and the sampler settings;
- :class:`CompileCache` -- torch.compile's portable cache artifacts, keyed by
  GPU type, torch version and the training shapes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

log = logging.getLogger(__name__)

MANIFEST: Final = "MANIFEST.json"
#: Bumped when the payload format of a cache changes: old entries become misses.
FORMAT: Final = 1


def cache_key(parts: Mapping[str, Any]) -> str:
    """A stable name for an entry made from ``parts`` (JSON-serialisable values)."""
    text = json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:40]


@dataclass(frozen=True)
class Entry:
    payload: bytes
    settings: dict[str, Any]


@dataclass(frozen=True)
class Lookup:
    """What :meth:`BlobCache.get` found: an intact entry, or the manifest to replace."""

    entry: Entry | None
    #: Generation of a damaged manifest (a rebuild replaces exactly that one), 0 when absent.
    replace_generation: int = 0
    problem: str | None = None
    #: The payload a damaged manifest names (deleted once the entry is rebuilt).
    stale_payload: str | None = None


def _is_precondition_failure(err: BaseException) -> bool:
    from google.api_core import exceptions as gexc

    return isinstance(err, gexc.PreconditionFailed) or getattr(err, "code", None) == 412


def _is_not_found(err: BaseException) -> bool:
    from google.api_core import exceptions as gexc

    return isinstance(err, gexc.NotFound) or getattr(err, "code", None) == 404


class BlobCache:
    """Entries under ``prefix`` in ``bucket``; safe for concurrent writers."""

    def __init__(self, bucket: Any, prefix: str) -> None:
        self.bucket = bucket
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"

    def _folder(self, key: str) -> str:
        return f"{self.prefix}{key}/"

    def get(self, key: str) -> Lookup:
        """The intact entry for ``key``, or why there is none. Never raises for bad data."""
        folder = self._folder(key)
        manifest_blob = self.bucket.blob(folder + MANIFEST)
        try:
            raw = manifest_blob.download_as_bytes()
        except Exception as err:
            if _is_not_found(err):
                return Lookup(None)
            raise
        generation = int(manifest_blob.generation or 0)
        try:
            manifest = json.loads(raw)
            name, size, digest = manifest["payload"], int(manifest["size"]), manifest["sha256"]
            if not isinstance(name, str) or "/" in name or name == MANIFEST:
                raise ValueError("bad payload name")
            settings = dict(manifest.get("settings") or {})
        except (ValueError, KeyError, TypeError) as err:
            return self._damaged(folder, generation, f"unreadable manifest ({err})")
        try:
            payload = self.bucket.blob(folder + name).download_as_bytes()
        except Exception as err:
            if _is_not_found(err):
                return self._damaged(folder, generation, "payload missing")
            raise
        if len(payload) != size or hashlib.sha256(payload).hexdigest() != digest:
            return self._damaged(folder, generation,
                                 f"payload of {len(payload)} bytes does not match its manifest",
                                 stale=name)
        return Lookup(Entry(payload, settings), generation)

    @staticmethod
    def _damaged(folder: str, generation: int, problem: str, stale: str | None = None) -> Lookup:
        log.warning("ignoring the damaged cache entry %s: %s", folder, problem)
        return Lookup(None, replace_generation=generation or 0, problem=problem,
                      stale_payload=stale)

    def put(self, key: str, payload: bytes, settings: Mapping[str, Any], *,
            replace_generation: int = 0, stale_payload: str | None = None) -> bool:
        """Store ``payload``; returns whether this writer's entry is the one kept.

        ``replace_generation``: the damaged manifest that :meth:`get` reported
        (0: the entry must not exist yet); ``stale_payload`` is deleted once
        the entry is replaced. Losing the race to another writer is not an
        error: its entry is as good as this one.
        """
        folder = self._folder(key)
        name = f"{uuid.uuid4().hex}.bin"
        self.bucket.blob(folder + name).upload_from_string(
            payload, content_type="application/octet-stream", if_generation_match=0)
        manifest = {
            "payload": name,
            "size": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
            "settings": dict(settings),
            "createdAt": datetime.now(UTC).isoformat(),
        }
        try:
            self.bucket.blob(folder + MANIFEST).upload_from_string(
                json.dumps(manifest, sort_keys=True, default=str),
                content_type="application/json", if_generation_match=replace_generation)
        except Exception as err:
            if not _is_precondition_failure(err):
                self._delete_quietly(folder + name)
                raise
            log.info("another worker filled the cache entry %s first; using theirs", folder)
            self._delete_quietly(folder + name)
            return False
        # Cloud Storage enforces the precondition; a store that does not (the Storage
        # emulator lets every writer overwrite) is caught by reading the manifest
        # back: a writer that sees another's payload named there lost and cleans up.
        # The last manifest written always names an existing payload.
        try:
            current = json.loads(self.bucket.blob(folder + MANIFEST).download_as_bytes())
            ours = current.get("payload") == name
        except Exception:  # noqa: BLE001 - unsure: keep the payload (garbage at worst)
            ours = True
        if not ours:
            self._delete_quietly(folder + name)
            return False
        if stale_payload and stale_payload != name:
            self._delete_quietly(folder + stale_payload)
        return True

    def get_or_make(self, key: str, make: Callable[[], tuple[bytes, Mapping[str, Any]]],
                    *, valid: Callable[[Entry], bool] | None = None) -> tuple[Entry, bool]:
        """``(entry, hit)``: the cached entry, else ``make()``'s, stored for the next job.

        ``valid`` checks a hit's content (shapes, settings); an entry it rejects
        is rebuilt like a damaged one. Storage errors never fail the caller:
        the cache is an optimisation.
        """
        lookup = Lookup(None)
        try:
            lookup = self.get(key)
        except Exception as err:  # noqa: BLE001 - a cache that cannot be read is a miss
            log.warning("could not read the cache entry %s: %s", self._folder(key), err)
        if lookup.entry is not None:
            if valid is None or valid(lookup.entry):
                return lookup.entry, True
            log.warning("ignoring the cache entry %s: its content does not fit",
                        self._folder(key))
        payload, settings = make()
        try:
            self.put(key, payload, settings, replace_generation=lookup.replace_generation,
                     stale_payload=lookup.stale_payload)
        except Exception as err:  # noqa: BLE001 - the next job simply misses again
            log.warning("could not store the cache entry %s: %s", self._folder(key), err)
        return Entry(payload, dict(settings)), False

    def _delete_quietly(self, name: str) -> None:
        try:
            self.bucket.blob(name).delete()
        except Exception as err:  # noqa: BLE001 - garbage at worst
            log.warning("could not delete %s: %s", name, err)


# --------------------------------------------------------------------------
# Class images (prior preservation)
# --------------------------------------------------------------------------
class ClassImageCache:
    """Latents of generated class images, shared by every job that asks for the same.

    Used as the ``class_latents_source`` of :func:`lora_trainer.training.build_trainer`.
    ``revision`` pins the base model's weights (a hub commit, or a fingerprint of a
    local folder): other weights draw other images. ``hit`` says what the last call did.
    """

    def __init__(self, bucket: Any, base_model_id: str, revision: str) -> None:
        from actorgen import schema

        self.cache = BlobCache(bucket, schema.class_image_cache_prefix())
        self.base_model_id = base_model_id
        self.revision = revision
        self.hit: bool | None = None

    def settings(self, model: Any, config: Any, resolution: int) -> dict[str, Any]:
        """What decides the class latents: the cache key's parts."""
        return {
            "baseModelId": self.base_model_id,
            "revision": self.revision,
            "classPrompt": config.class_prompt,
            "resolution": resolution,
            "count": config.num_class_images,
            "seed": config.seed,
            "steps": config.sample_steps,
            "guidanceScale": config.guidance_scale,
            # bf16 on a GPU and fp32 on the CPU draw visibly different images.
            "dtype": str(model.weight_dtype).removeprefix("torch."),
            "device": model.device.type,
        }

    def __call__(self, model: Any, config: Any, resolution: int,
                 draw: Callable[[], Any]) -> Any:
        import torch
        from safetensors.torch import load, save

        from .encode import LatentStats

        settings = self.settings(model, config, resolution)
        side = resolution // model.info.vae_scale_factor
        channels = int(model.unet.config.in_channels)
        expected = (config.num_class_images, channels, side, side)

        def parse(entry: Entry) -> torch.Tensor | None:
            try:
                latents = load(entry.payload)["latents"]
            except Exception:  # noqa: BLE001 - not safetensors: damaged
                return None
            if tuple(latents.shape) != expected or not torch.isfinite(latents).all():
                return None
            return latents

        def make() -> tuple[bytes, dict[str, Any]]:
            stats = draw()
            return save({"latents": stats.mean.detach().to("cpu").contiguous()}), settings

        entry, self.hit = self.cache.get_or_make(
            cache_key(settings), make, valid=lambda e: parse(e) is not None)
        latents = parse(entry)
        if latents is None:  # cannot happen for make()'s own bytes
            raise RuntimeError("class latents do not have the expected shape")
        log.info("class images: %s (%d at %d px)", "from the cache" if self.hit else "generated",
                 config.num_class_images, resolution)
        latents = latents.to(model.device)
        return LatentStats(latents, torch.zeros_like(latents))


# --------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------
class CompileCache:
    """torch.compile's portable cache artifacts, loaded before and saved after compiling.

    Keyed by GPU type, torch (and triton) version and the training shapes: an
    artifact of another GPU or torch build is useless. Loading only pre-fills
    the caches that compilation consults; a stale or foreign artifact costs a
    normal compilation, never a wrong result.
    """

    def __init__(self, bucket: Any, shapes: Mapping[str, Any], device: Any) -> None:
        from actorgen import schema

        self.cache = BlobCache(bucket, schema.compile_cache_prefix())
        self.parts = {**compile_environment(device), **dict(shapes)}
        self.key = cache_key(self.parts)
        self.loaded = False

    def load(self) -> bool:
        """Pre-fill torch's compile caches from the bucket; whether there was an entry."""
        import torch

        try:
            lookup = self.cache.get(self.key)
        except Exception as err:  # noqa: BLE001
            log.warning("could not read the compile cache: %s", err)
            return False
        if lookup.entry is None:
            log.info("compile cache: no entry for %s", self.key)
            return False
        try:
            torch.compiler.load_cache_artifacts(lookup.entry.payload)
        except Exception as err:  # noqa: BLE001 - a bad artifact: compile from scratch
            log.warning("could not load the compile cache artifacts: %s", err)
            return False
        self.loaded = True
        log.info("compile cache: loaded %d bytes", len(lookup.entry.payload))
        return True

    def save(self) -> bool:
        """Store what torch compiled in this process, unless the entry was loaded."""
        import torch

        if self.loaded:
            return False
        try:
            artifacts = torch.compiler.save_cache_artifacts()
        except Exception as err:  # noqa: BLE001
            log.warning("could not collect the compile cache artifacts: %s", err)
            return False
        if not artifacts:
            return False
        payload = artifacts[0]
        try:
            return self.cache.put(self.key, payload, self.parts)
        except Exception as err:  # noqa: BLE001
            log.warning("could not store the compile cache: %s", err)
            return False


def compile_environment(device: Any) -> dict[str, Any]:
    """What a compiled artifact depends on besides the shapes."""
    import torch

    env: dict[str, Any] = {"torch": torch.__version__, "device": device.type}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = list(torch.cuda.get_device_capability(device))
        env["cuda"] = torch.version.cuda
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    return env
