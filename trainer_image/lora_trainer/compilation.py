"""torch.compile of the UNet: off, its repeated blocks only, or all of it.

The eager step is host-bound on a fast GPU: the GPU waits on thousands of
kernel launches. Compilation fuses the element-wise work between the matmuls,
and on a GPU CUDA graphs (torch.compile's "reduce-overhead" mode) replay each
compiled region with one launch.

*Regional* compilation compiles the UNet's repeated blocks (the transformer and
ResNet blocks) in place. Blocks of one class and shape share one compiled graph,
so it compiles a handful of graphs instead of one graph of the whole UNet, which
cuts the first step (about 110 s for a full SD 1.5 compile on an H200) while the
blocks hold nearly all of the step's work. *Full* compiles the whole UNet in
place. Either way parameter names, and so checkpoints and exports, stay the same.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import torch

log = logging.getLogger(__name__)

#: Classes of the UNet's repeated blocks (diffusers' UNet2DConditionModel, SD 1.x/2.x
#: and SDXL): regional compilation compiles each instance of these.
REPEATED_BLOCKS: Final = ("BasicTransformerBlock", "ResnetBlock2D")

#: Graphs one repeated block may need: the UNet runs in a few ways in a job (training
#: steps, the no_grad evaluation loss, eval-mode samples at another batch size).
#: Regional compilation raises Dynamo's per-code-object limit to this many per block.
GRAPHS_PER_REGION: Final = 4

#: torch.compile's mode that records and replays CUDA graphs.
CUDA_GRAPHS_MODE: Final = "reduce-overhead"


def compile_mode_options(device: torch.device, cuda_graphs: bool) -> dict[str, Any]:
    """torch.compile's keyword arguments for this device.

    CUDA graphs need a GPU; on the CPU the default mode is the only one that helps.
    """
    if cuda_graphs and device.type == "cuda":
        return {"mode": CUDA_GRAPHS_MODE}
    return {}


def compile_unet(unet: torch.nn.Module, mode: str, *, device: torch.device,
                 cuda_graphs: bool, backend: str | None = None) -> int:
    """Compile ``unet`` in place as ``mode`` asks; returns the number of compiled regions.

    0 for "off", 1 for "full", the number of repeated blocks for "regional".
    ``backend`` replaces Inductor (tests trace with "aot_eager": Dynamo and
    AOTAutograd as in production, without generating kernels).
    """
    if mode == "off":
        return 0
    options = compile_mode_options(device, cuda_graphs)
    if backend is not None:
        options = {"backend": backend}
    if mode == "full":
        unet.compile(**options)
        return 1
    if mode != "regional":
        raise ValueError(f"unknown compile mode {mode!r}")
    regions = 0
    for module in unet.modules():
        if type(module).__name__ in REPEATED_BLOCKS:
            module.compile(**options)
            regions += 1
    if regions:
        # All blocks of one class share one code object, and Dynamo keeps at most
        # recompile_limit graphs (8 by default) per code object before it runs every
        # further shape eagerly, silently. SD 1.5 alone has a dozen ResNet block shapes
        # (parameter shapes are static: one graph each), each run in several ways.
        limit = GRAPHS_PER_REGION * regions
        if torch._dynamo.config.recompile_limit < limit:
            torch._dynamo.config.recompile_limit = limit
    if not regions:
        # A UNet of another design: compile all of it rather than nothing.
        log.warning("no repeated blocks (%s) in %s: compiling the whole UNet",
                    ", ".join(REPEATED_BLOCKS), type(unet).__name__)
        unet.compile(**options)
        return 1
    return regions


def uses_cuda_graphs(mode: str, device: torch.device, cuda_graphs: bool) -> bool:
    """Whether a step replays CUDA graphs (and must mark where each step begins)."""
    return mode != "off" and bool(compile_mode_options(device, cuda_graphs))


def want_cuda_graphs(requested: bool, gradient_checkpointing: bool) -> bool:
    """CUDA graphs as asked, except under gradient checkpointing.

    Checkpointing recomputes compiled regions inside ``torch.utils.checkpoint``,
    where CUDA graph trees have failed on freed inputs and can reuse memory still
    in use (pytorch/pytorch#154306). The memory plan turns checkpointing on exactly
    when a step is tight, where the graphs' own memory would not help either.
    Not yet measured on a GPU: tests/trainer/test_trainer_gpu.py says whether the
    combination works and this can go.
    """
    return requested and not gradient_checkpointing


def mark_step_begin() -> None:
    """Tell the CUDA graph trees a new step begins.

    Without it, outputs of the previous step's graphs (still referenced by the
    loss or the optimiser) could be overwritten while in use, and the trees
    would keep recording new graphs instead of replaying.
    """
    torch.compiler.cudagraph_mark_step_begin()
