"""Fit the step in the GPU's memory, by measuring it.

With gradient checkpointing "auto", the trainer runs one probe step (forward and
backward, no optimiser step, random state restored) before training and reads
the allocator's peak. When that peak plus the optimiser's states does not fit
the budget (the GPU's memory, or ``gpu_memory_gib`` to plan for a smaller GPU
such as a 24 GB L4 while running on a larger one), gradient checkpointing goes
on and the step is measured again, so the log and the job's metrics say what
the run really needs. An 8-bit optimiser would not help here: a LoRA's AdamW
states are tens of MB, the activations are gigabytes.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

import torch

log = logging.getLogger(__name__)

GIB: Final = 1024**3
#: Share of the budget a step may fill: the CUDA context and the allocator's
#: fragmentation live outside the measured peak.
USABLE_SHARE: Final = 0.92


class MemoryMeter(Protocol):
    """Where the peak memory of a step is read (a GPU's caching allocator)."""

    def total_bytes(self) -> int: ...

    def reset_peak(self) -> None: ...

    def peak_bytes(self) -> int: ...

    def release(self) -> None: ...


class CudaMemoryMeter:
    """Peak memory reserved by PyTorch's CUDA caching allocator on one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def total_bytes(self) -> int:
        return int(torch.cuda.get_device_properties(self.device).total_memory)

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_reserved(self.device))

    def release(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class MemoryPlan:
    """What the probe measured and decided (logged, and in the job's metrics)."""

    budget_bytes: int
    #: Measured peak of one step as it will train, plus the optimiser's states;
    #: None when not measured (CPU, or checkpointing set explicitly).
    step_bytes: int | None
    gradient_checkpointing: bool
    #: Peak measured without checkpointing, when checkpointing was then turned on.
    step_bytes_without_checkpointing: int | None = None

    @property
    def fits(self) -> bool | None:
        if self.step_bytes is None:
            return None
        return self.step_bytes <= USABLE_SHARE * self.budget_bytes


def budget_bytes(meter: MemoryMeter, gpu_memory_gib: float) -> int:
    """The memory a run may use: the GPU's, or less when the operator says so."""
    total = meter.total_bytes()
    return total if gpu_memory_gib <= 0 else min(total, int(gpu_memory_gib * GIB))


def optimizer_state_bytes(params: list[torch.nn.Parameter]) -> int:
    """AdamW's two moments per trainable element (not allocated before its first step)."""
    return sum(2 * p.numel() * p.element_size() for p in params)


def measure_step(probe: Callable[[], None], meter: MemoryMeter, extra_bytes: int) -> int | None:
    """Peak bytes of ``probe()`` plus ``extra_bytes``; None when it ran out of memory."""
    meter.release()
    meter.reset_peak()
    try:
        probe()
    except torch.OutOfMemoryError:
        meter.release()
        return None
    peak = meter.peak_bytes()
    meter.release()
    return peak + extra_bytes


def plan_memory(probe: Callable[[], None], enable_checkpointing: Callable[[], None],
                meter: MemoryMeter, *, gpu_memory_gib: float,
                extra_bytes: int = 0) -> MemoryPlan:
    """Measure a step; turn gradient checkpointing on if it does not fit, and measure again.

    ``probe`` runs one forward and backward without leaving a trace;
    ``enable_checkpointing`` switches checkpointing on for the next probe and for
    training; ``extra_bytes`` is memory the probe does not allocate (optimiser states).
    """
    budget = budget_bytes(meter, gpu_memory_gib)
    usable = USABLE_SHARE * budget
    plain = measure_step(probe, meter, extra_bytes)
    if plain is not None and plain <= usable:
        log.info("memory: a step needs %.2f GiB of the %.2f GiB budget; gradient "
                 "checkpointing off", plain / GIB, budget / GIB)
        return MemoryPlan(budget, plain, False)
    enable_checkpointing()
    checkpointed = measure_step(probe, meter, extra_bytes)
    without = "more than the GPU has" if plain is None else f"{plain / GIB:.2f} GiB"
    if checkpointed is None or checkpointed > usable:
        needs = "more than the GPU has" if checkpointed is None else f"{checkpointed / GIB:.2f} GiB"
        log.warning("memory: a step needs %s without and %s with gradient checkpointing, over "
                    "the %.2f GiB budget: lower the batch size or the resolution if it fails",
                    without, needs, budget / GIB)
    else:
        log.info("memory: a step needs %s, over the %.2f GiB budget; with gradient "
                 "checkpointing %.2f GiB", without, budget / GIB, checkpointed / GIB)
    return MemoryPlan(budget, checkpointed, True, plain)
