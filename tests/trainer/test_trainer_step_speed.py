"""The GPU speed paths of the step, checked on the CPU: no host reads in a step,
regional compilation that shares one graph between blocks of one shape, CUDA
graph options, and the op count the fused LoRA projections save.

These assert behaviour (what is compiled, what the step dispatches, that the
maths is unchanged), not speed: the speed goes to ``python -m lora_trainer.bench``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_trainer import compilation, models, training
from lora_trainer.bench import AtenOpCounter
from lora_trainer.config import TrainConfig


def _prepared(base: Path, pixels: torch.Tensor, **kw: object) -> training.PreparedTraining:
    settings: dict[str, object] = dict(learning_rate=1e-3, lora_rank=4, lora_alpha=4,
                                       max_train_steps=4, sample_steps=2, num_class_images=2)
    settings.update(kw)
    config = TrainConfig(job_id="j", attempt=1, user_id="u", actor_id="a", instance_name="sks",
                         base_model_id=str(base), **settings)  # type: ignore[arg-type]
    model = models.load_base_model(config, torch.device("cpu"))
    return training.build_trainer(model, config, pixels)


@pytest.mark.parametrize("settings", [
    {},
    {"prior_preservation": True},
    {"fused_lora": False, "face_loss_weight": 1.0},
], ids=["default", "prior-preservation", "unfused-no-face-weights"])
def test_a_training_step_never_reads_a_tensor_on_the_host(
        tiny_sd: Path, face_pixels: torch.Tensor, settings: dict[str, object]) -> None:
    """``.item()`` and friends dispatch ``_local_scalar_dense``: on a GPU, a sync."""
    trainer = _prepared(tiny_sd, face_pixels, **settings).trainer
    trainer.train_step()  # first step: the optimiser's lazy state
    with AtenOpCounter() as counter:
        for _ in range(2):
            trainer.train_step()
    assert counter.total > 0
    assert counter.host_reads == 0, counter.counts.most_common(5)


def test_the_counter_sees_a_host_read() -> None:
    with AtenOpCounter() as counter:
        value = (torch.ones(3) * 2).sum().item()
    assert value == 6 and counter.host_reads == 1


def test_fused_projections_dispatch_fewer_ops_per_step(tiny_sd: Path,
                                                       face_pixels: torch.Tensor) -> None:
    counts = {}
    for fused in (True, False):
        prepared = _prepared(tiny_sd, face_pixels, fused_lora=fused)
        assert (prepared.fused_attention > 0) is fused
        prepared.trainer.train_step()
        with AtenOpCounter() as counter:
            prepared.trainer.train_step()
        counts[fused] = counter.total
    print(f"aten ops per step, tiny SD: fused {counts[True]}, unfused {counts[False]}")
    assert counts[True] < counts[False]


def test_no_cuda_graphs_under_gradient_checkpointing() -> None:
    assert compilation.want_cuda_graphs(True, gradient_checkpointing=False)
    assert not compilation.want_cuda_graphs(True, gradient_checkpointing=True)
    assert not compilation.want_cuda_graphs(False, gradient_checkpointing=False)


def test_cuda_graphs_only_where_there_is_a_gpu() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert compilation.compile_mode_options(cuda, True) == {"mode": "reduce-overhead"}
    assert compilation.compile_mode_options(cuda, False) == {}
    assert compilation.compile_mode_options(cpu, True) == {}
    assert compilation.uses_cuda_graphs("regional", cuda, True)
    assert not compilation.uses_cuda_graphs("off", cuda, True)
    assert not compilation.uses_cuda_graphs("full", cpu, True)


def test_regional_compilation_shares_graphs_between_blocks_and_keeps_the_maths(
        tiny_sd: Path, face_pixels: torch.Tensor) -> None:
    """Dynamo and AOTAutograd as in production ("aot_eager": no kernels generated)."""
    from torch._dynamo.utils import counters

    compiled = _prepared(tiny_sd, face_pixels)
    eager = _prepared(tiny_sd, face_pixels)
    unet = compiled.trainer.unet
    blocks = [m for m in unet.modules() if type(m).__name__ in compilation.REPEATED_BLOCKS]
    torch._dynamo.reset()
    counters.clear()
    regions = compilation.compile_unet(unet, "regional", device=torch.device("cpu"),
                                       cuda_graphs=True, backend="aot_eager")
    assert regions == len(blocks) > 4
    names = {n for n, _ in unet.named_parameters()}
    assert names == {n for n, _ in eager.trainer.unet.named_parameters()}  # exports unchanged
    for _ in range(2):
        torch.testing.assert_close(compiled.trainer.train_step(), eager.trainer.train_step(),
                                   rtol=1e-4, atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    print(f"regional compile: {regions} blocks, {graphs} graphs, {breaks} graph breaks")
    assert 0 < graphs < regions  # blocks of one class and shape reuse one graph
    assert breaks == 0, dict(counters["graph_break"])
    for key, value in eager.trainer.trainable_state().items():
        torch.testing.assert_close(compiled.trainer.trainable_state()[key], value,
                                   rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


def test_full_compilation_is_one_region(tiny_sd: Path, face_pixels: torch.Tensor) -> None:
    unet = _prepared(tiny_sd, face_pixels).trainer.unet
    assert compilation.compile_unet(unet, "full", device=torch.device("cpu"),
                                    cuda_graphs=False, backend="aot_eager") == 1
    assert compilation.compile_unet(unet, "off", device=torch.device("cpu"),
                                    cuda_graphs=False) == 0
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_the_meta_device_op_count_sees_the_fusion(kind: str) -> None:
    from lora_trainer.bench import count_unet_step_ops

    fused = count_unet_step_ops(kind, "tiny", fused=True, batch=2, rank=4)
    unfused = count_unet_step_ops(kind, "tiny", fused=False, batch=2, rank=4)
    assert 0 < fused < unfused


def test_regional_compilation_compiles_every_block_of_an_sd15_shaped_unet() -> None:
    """SD 1.5's block structure (narrow channels, 128 px): a dozen ResNet block shapes
    (parameter shapes are static, so one graph each), and the UNet runs in several ways
    in a job (the evaluation loss before training under no_grad, the training steps,
    eval-mode samples). Dynamo keeps at most ``recompile_limit`` graphs per code object
    (8 by default) and runs every block past that eagerly, without an error: here it
    raises instead. (Eval-mode samples would add more graphs; two ways suffice to
    show it, and cost a minute of compiling on a CPU.)"""
    from lora_trainer import synthetic
    from lora_trainer.fused_lora import fuse_lora_projections

    torch.manual_seed(0)
    unet = synthetic.build_lora_unet("sd", "full", rank=4, alpha=4, overrides={
        "block_out_channels": (32, 64, 128, 128), "norm_num_groups": 8,
        "cross_attention_dim": 32, "sample_size": 16})
    fuse_lora_projections(unet)
    unet.train()

    def run(batch: int) -> torch.Tensor:
        return unet(torch.randn(batch, 4, 16, 16), torch.randint(0, 1000, (batch,)),
                    encoder_hidden_states=torch.randn(batch, 7, 32), return_dict=False)[0]

    torch._dynamo.reset()
    # The default limit, whatever an earlier test left; restored on leaving.
    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
        regions = compilation.compile_unet(unet, "regional", device=torch.device("cpu"),
                                           cuda_graphs=True, backend="aot_eager")
        assert regions == 38  # as in SD 1.5: 22 ResNet and 16 transformer blocks
        with torch.no_grad():  # run.py: the evaluation loss before the first step
            run(3)
        run(2).float().square().mean().backward()  # a training step
    torch._dynamo.reset()
