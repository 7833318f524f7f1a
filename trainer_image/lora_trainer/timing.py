"""Where a job's time goes: phase timings, and the worker seconds it costs.

One :class:`PhaseTimer` per run measures every phase from the process start
to the final write (``with timer.phase(Phase.STEPS): ...``); the job document's
``timings`` and the benchmark print the same phase names in the same order.
:class:`WorkerMeter` hands out the worker seconds not yet written to the job,
so that every progress, heartbeat and final write adds its share to
``gpuSeconds`` (``estimatedCostUsd`` from the price per hour) and a preempted
attempt's seconds count too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Final

from actorgen import schema

log = logging.getLogger(__name__)


class Phase:
    """Keys of the job's ``timings`` map (seconds), in the order a job runs them."""

    STARTUP = "startupSeconds"  # process start -> the trainer's code runs (interpreter, imports)
    IMPORTS = "importSeconds"  # torch, diffusers, peft
    JOB_START = "jobStartSeconds"  # reading the job and actor, marking it preparing
    PHOTOS = "photosSeconds"  # download, decode, face crop
    MODEL = "modelSeconds"  # base model: bucket snapshot / download / cache hit, then load
    ENCODE = "encodeSeconds"  # VAE latents of the photos, prompt embeddings
    CLASS_IMAGES = "classImagesSeconds"  # prior preservation: generated or from the cache
    SETUP = "setupSeconds"  # LoRA adapters, optimiser, checkpoint restore, first eval loss
    COMPILE = "compileSeconds"  # torch.compile: cache load and the first (compiling) step
    STEPS = "stepsSeconds"  # the optimisation steps (checkpoints excluded)
    CHECKPOINTS = "checkpointSeconds"
    IDENTITY = "identitySeconds"  # identity score: the photos' embeddings, samples, faces
    SAMPLES = "samplesSeconds"  # fixed-seed sample images
    EXPORT = "exportSeconds"  # final eval loss, LoRA files, model card
    UPLOAD = "uploadSeconds"  # artifacts to Cloud Storage (and the Hub)
    FINAL_WRITE = "finalWriteSeconds"  # the completing transaction, cleanup
    TOTAL = "totalSeconds"

    ORDER: Final = (STARTUP, IMPORTS, JOB_START, PHOTOS, MODEL, ENCODE, CLASS_IMAGES, SETUP,
                    COMPILE, STEPS, CHECKPOINTS, IDENTITY, SAMPLES, EXPORT, UPLOAD, FINAL_WRITE)


def process_start_monotonic() -> float:
    """``time.monotonic()`` at the moment this process started (Linux), else at import.

    Interpreter start-up and the first imports happen before any of the
    trainer's code can take the time: the kernel's record of the start sees them.
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            # Field 22 (starttime, clock ticks since boot) follows the ")" of the command name.
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        age = uptime - ticks / os.sysconf("SC_CLK_TCK")
        if 0 <= age < 86400:
            return time.monotonic() - age
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORTED_AT


_IMPORTED_AT: Final = time.monotonic()


class PhaseTimer:
    """Wall-clock seconds per :class:`Phase`; a phase entered twice adds up.

    Phases nest exclusively: time spent in an inner phase (a checkpoint inside
    the steps, samples inside the export) counts for the inner one only, so
    the phases add up to the total.
    """

    def __init__(self, started: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started = clock() if started is None else started
        self.values: dict[str, float] = {}
        self._lock = threading.Lock()
        self._open: list[list[float]] = []  # [inner seconds] of each open phase

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.values[name] = self.values.get(name, 0.0) + max(0.0, seconds)

    def move(self, source: str, target: str, seconds: float) -> None:
        """Re-attribute ``seconds`` (at most what ``source`` has) from ``source`` to ``target``."""
        with self._lock:
            seconds = max(0.0, min(seconds, self.values.get(source, 0.0)))
            self.values[source] = self.values.get(source, 0.0) - seconds
            self.values[target] = self.values.get(target, 0.0) + seconds

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self.clock()
        inner = [0.0]
        self._open.append(inner)
        try:
            yield
        finally:
            elapsed = self.clock() - start
            self._open.pop()
            self.add(name, elapsed - inner[0])
            if self._open:
                self._open[-1][0] += elapsed

    def mark_since_start(self, name: str) -> None:
        """Record everything from the start until now as ``name`` (start-up)."""
        self.add(name, self.clock() - self.started)

    def total(self) -> dict[str, float]:
        """The phases (rounded to ms) and ``totalSeconds`` since the start."""
        with self._lock:
            out = {k: round(v, 3) for k, v in self.values.items()}
        out[Phase.TOTAL] = round(self.clock() - self.started, 3)
        return out


def format_table(timings: Mapping[str, float | None]) -> str:
    """A fixed-width table of the phases in job order, with each one's share of the total."""
    total = timings.get(Phase.TOTAL) or sum(v or 0.0 for v in timings.values())
    names = [n for n in Phase.ORDER if n in timings]
    names += sorted(n for n in timings if n not in Phase.ORDER and n != Phase.TOTAL)
    lines = [f"{'phase':<20} {'seconds':>10} {'share':>7}"]
    for name in names:
        value = timings[name]
        if value is None:
            lines.append(f"{name:<20} {'-':>10} {'-':>7}")
            continue
        share = 100 * value / total if total else 0.0
        lines.append(f"{name:<20} {value:>10.2f} {share:>6.1f}%")
    accounted = sum(timings[n] or 0.0 for n in names)
    lines.append(f"{'(other)':<20} {max(0.0, total - accounted):>10.2f}")
    lines.append(f"{Phase.TOTAL:<20} {total:>10.2f}")
    return "\n".join(lines)


def price_per_hour(environ: Mapping[str, str] | None = None) -> float | None:
    """USD per hour of this worker from ``ACTORGEN_GPU_PRICE_PER_HOUR``; None when unset.

    A value that is not a non-negative number is ignored with a warning: a
    missing cost estimate must not stop a paid training run.
    """
    raw = (os.environ if environ is None else environ).get(schema.ENV_GPU_PRICE_PER_HOUR, "")
    if not raw.strip():
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        log.warning("ignoring %s=%r: not a price in USD per hour", schema.ENV_GPU_PRICE_PER_HOUR,
                    raw[:20])
        return None
    return value


class WorkerMeter:
    """Worker seconds not yet added to the job, handed out once each.

    :meth:`take` returns the seconds since the last take (the first from the
    process start); a write that did not go through gives them back with
    :meth:`give_back`, so the next write carries them. Thread-safe: the
    heartbeat thread writes too.
    """

    def __init__(self, started: float | None = None, *, price_per_hour: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.price_per_hour = price_per_hour
        self._last = clock() if started is None else started
        self._pending = 0.0
        self.written = 0.0  # seconds confirmed written (logs, tests)
        self._lock = threading.Lock()

    def take(self) -> float:
        with self._lock:
            now = self.clock()
            seconds = self._pending + max(0.0, now - self._last)
            self._last, self._pending = now, 0.0
            return seconds

    def give_back(self, seconds: float) -> None:
        with self._lock:
            self._pending += seconds

    def confirm(self, seconds: float) -> None:
        with self._lock:
            self.written += seconds

    def cost(self, seconds: float) -> float | None:
        if self.price_per_hour is None:
            return None
        return seconds * self.price_per_hour / 3600.0

    @contextlib.contextmanager
    def charge(self) -> Iterator[dict[str, float]]:
        """The seconds (and cost) to add with one write; given back if the write fails.

        ``with meter.charge() as amounts: write(..., increments built from amounts)``
        """
        seconds = self.take()
        amounts = {schema.Field.GPU_SECONDS: round(seconds, 3)}
        cost = self.cost(seconds)
        if cost is not None:
            amounts[schema.Field.ESTIMATED_COST_USD] = round(cost, 6)
        try:
            yield amounts
        except BaseException:
            self.give_back(seconds)
            raise
        self.confirm(seconds)


def increments(amounts: Mapping[str, float]) -> dict[str, object]:
    """Firestore ``Increment`` transforms of ``amounts`` (empty stays empty)."""
    if not amounts:
        return {}
    from google.cloud import firestore

    return {name: firestore.Increment(value) for name, value in amounts.items()}
