"""Fused LoRA projections (fused_lora.py) on tiny SD and SDXL UNets: the same
outputs, gradients, training steps and parameters as peft's separate layers,
with fewer aten ops per forward and backward."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lora_trainer import models, synthetic, training
from lora_trainer.config import TrainConfig
from lora_trainer.fused_lora import FusedLoraAttnProcessor, fuse_lora_projections
from torch.utils._python_dispatch import TorchDispatchMode

CPU = torch.device("cpu")
Inputs = tuple[torch.Tensor, torch.Tensor, dict[str, Any]]


def _config(base: Path, **kw: object) -> TrainConfig:
    # alpha != rank: peft's scaling (2.0) is applied, not skipped as a 1.0 would be.
    settings: dict[str, object] = dict(learning_rate=1e-3, lora_rank=4, lora_alpha=8,
                                       sample_steps=2, num_class_images=2)
    settings.update(kw)
    return TrainConfig(job_id="j", attempt=1, user_id="u", actor_id="a", instance_name="sks",
                       base_model_id=str(base), **settings)  # type: ignore[arg-type]


def _load(base: Path, precision: str = "no") -> tuple[models.LoadedModel, TrainConfig]:
    config = _config(base, mixed_precision=precision)
    return models.load_base_model(config, CPU), config


def _lora_model(base: Path, precision: str = "no") -> models.LoadedModel:
    """A tiny model with the project's LoRA, its B weights made non-zero."""
    model, config = _load(base, precision)
    models.add_lora(model, config)
    _perturb_lora_b(model.unet)
    return model


def _perturb_lora_b(unet: Any) -> None:
    # The gaussian init leaves every lora_B at zero: the LoRA would add nothing.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def _inputs(model: models.LoadedModel, batch: int = 2) -> Inputs:
    unet, dtype = model.unet, model.weight_dtype
    generator = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    sample = torch.randn(batch, 4, size, size, generator=generator).to(dtype)
    hidden = torch.randn(batch, 16, unet.config.cross_attention_dim, generator=generator)
    kwargs: dict[str, Any] = {"encoder_hidden_states": hidden.to(dtype)}
    if model.kind == models.SDXL:
        pooled = (unet.config.projection_class_embeddings_input_dim
                  - 6 * unet.config.addition_time_embed_dim)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=generator).to(dtype),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch).to(dtype),
        }
    timesteps = torch.tensor([10, 700] * batch)[:batch]
    return sample, timesteps, kwargs


def _output(unet: Any, inputs: Inputs) -> torch.Tensor:
    sample, timesteps, kwargs = inputs
    with torch.no_grad():
        return unet(sample, timesteps, return_dict=False, **kwargs)[0]


def _forward_backward(unet: Any, inputs: Inputs, *,
                      autocast: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The output and the gradient of every trainable (LoRA) parameter."""
    sample, timesteps, kwargs = inputs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = unet(sample, timesteps, return_dict=False, **kwargs)[0]
    weight = torch.linspace(-1.0, 1.0, out.numel()).view(out.shape)
    (out.float() * weight).sum().backward()
    grads = {name: param.grad.clone() for name, param in unet.named_parameters()
             if param.requires_grad}
    unet.zero_grad(set_to_none=True)
    return out.detach(), grads


def _lora_attention_modules(unet: Any) -> list[Any]:
    """Attention modules whose q, k and v carry a LoRA, counted without fused_lora."""
    from diffusers.models.attention_processor import Attention
    from peft.tuners.lora import LoraLayer

    return [m for m in unet.modules() if isinstance(m, Attention)
            and all(isinstance(getattr(m, p), LoraLayer) for p in ("to_q", "to_k", "to_v"))]


def _fused_processors(unet: Any) -> list[FusedLoraAttnProcessor]:
    return [p for p in unet.attn_processors.values() if isinstance(p, FusedLoraAttnProcessor)]


def _unfuse(unet: Any) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())


# ------------------------------------------------------------- same maths
# diffusers' Euler scheduler (SDXL pipeline) trips a numpy 2 deprecation in its own code.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize(("base_name", "precision", "variant"), [
    ("tiny_sd", "no", ""),
    ("tiny_sd", "no", "own scales"),
    ("tiny_sd", "no", "scaling 1"),
    ("tiny_sd", "no", "text mask"),
    ("tiny_sd", "no", "gradient checkpointing"),
    ("tiny_sdxl", "no", ""),
    ("tiny_sd", "bf16-pure", ""),
    ("tiny_sdxl", "bf16-pure", ""),
    ("tiny_sd", "bf16", "autocast"),  # CPU autocast as accelerate's bf16 mixed precision
])
def test_fused_output_and_lora_gradients_match_peft(
        base_name: str, precision: str, variant: str, request: pytest.FixtureRequest) -> None:
    model = _lora_model(request.getfixturevalue(base_name), precision)
    unet = model.unet
    if variant == "own scales":  # each projection's own scaling: k and v differ from q
        for module in _lora_attention_modules(unet):
            module.to_k.scaling["default"] = 0.5
            module.to_v.scaling["default"] = 3.0
    if variant == "scaling 1":  # the project's default alpha == rank: no multiply at all
        for module in _lora_attention_modules(unet):
            for name in ("to_q", "to_k", "to_v"):
                getattr(module, name).scaling["default"] = 1.0
    if variant == "gradient checkpointing":  # the backward pass runs the processors again
        unet.enable_gradient_checkpointing()
        unet.train()
        assert unet.is_gradient_checkpointing
    autocast = variant == "autocast"
    inputs = _inputs(model)
    if variant == "text mask":  # cross-attention's attention_mask: the last tokens unseen
        mask = torch.ones(2, 16)
        mask[:, 12:] = 0
        inputs[2]["encoder_attention_mask"] = mask
    expected, expected_grads = _forward_backward(unet, inputs, autocast=autocast)
    assert fuse_lora_projections(unet) == len(_lora_attention_modules(unet)) > 0
    got, grads = _forward_backward(unet, inputs, autocast=autocast)

    assert got.dtype == expected.dtype == model.weight_dtype
    assert grads.keys() == expected_grads.keys() and grads
    assert all(grad.dtype == torch.float32 for grad in grads.values())  # LoRA stays fp32
    if precision == "no":
        # Summing in another order (one matmul for three) moves the last bits only.
        _assert_close_to_scale(got, expected, 2e-5, "output")
        worst = max(_assert_close_to_scale(grads[name], grad, 2e-5, name)
                    for name, grad in expected_grads.items())
        print(f"{base_name} fp32 {variant}: output off by {_relative(got, expected):.1e}, "
              f"gradients by at most {worst:.1e} of their scale")
        return
    # bf16 frozen weights: both paths are a few percent off the exact maths (fp64
    # on the same weights); the fused one must be as close as peft's.
    reference, reference_grads = _exact_reference(unet, inputs)
    plain_off = _relative(expected, reference)
    fused_off = _relative(got, reference)
    plain_worst = max(_relative(g, reference_grads[n]) for n, g in expected_grads.items())
    fused_worst = max(_relative(g, reference_grads[n]) for n, g in grads.items())
    print(f"{base_name} {precision} {variant} vs fp64: output off by {plain_off:.1e} unfused, {fused_off:.1e} "
          f"fused; gradients by at most {plain_worst:.1e} unfused, {fused_worst:.1e} fused")
    assert fused_off <= 2 * plain_off + 1e-3
    assert fused_worst <= 2 * plain_worst
    _assert_close_to_scale(got.float(), expected.float(), 5e-2, "output")
    for name, grad in expected_grads.items():
        _assert_close_to_scale(grads[name], grad, 1e-1, name)


def _exact_reference(unet: Any, inputs: Inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`_forward_backward` of the unfused ``unet`` in fp64 (its weights cast exactly)."""

    def wide(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: wide(v) for k, v in value.items()}
        return value.double() if value.is_floating_point() else value

    _unfuse(unet)
    unet.to(torch.float64)
    sample, timesteps, kwargs = inputs
    return _forward_backward(unet, (wide(sample), timesteps, wide(kwargs)))


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).abs().max() / expected.float().abs().max())


def _assert_close_to_scale(got: torch.Tensor, expected: torch.Tensor, rel: float,
                           what: str) -> float:
    """``max |got - expected| <= rel * max |expected|``; returns the left side's ratio."""
    assert got.shape == expected.shape, what
    assert expected.abs().max() > 0, what
    off = _relative(got, expected)
    assert off <= rel, f"{what}: off by {off:.2e} of its scale"
    return off


def test_counts_every_lora_attention_module_and_skips_unsupported_ones(tiny_sd: Path) -> None:
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = _lora_model(tiny_sd)
    unet = model.unet
    lora_attention = _lora_attention_modules(unet)
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    # Tiny SD: one transformer down, one in the middle, two up; attn1 and attn2 each.
    assert len(blocks) == 4 and len(lora_attention) == 2 * len(blocks) == 8
    odd = blocks[0].attn1
    odd.residual_connection = True  # AttnProcessor2_0 adds the input back: not fused
    assert fuse_lora_projections(unet) == 7
    assert type(odd.processor) is AttnProcessor2_0
    fused = [m for m in lora_attention if isinstance(m.processor, FusedLoraAttnProcessor)]
    assert len(fused) == 7 and odd not in fused
    # Self-attention fuses q, k, v; cross-attention (q from the image, k and v from
    # the text) fuses k and v, or q, k, v when the two widths agree (tiny SD: 32).
    assert all(m.processor.fuse_query for m in fused if m.to_q.in_features == m.to_k.in_features)
    assert fuse_lora_projections(unet) == 7  # again: the same modules, refreshed


@pytest.mark.parametrize("variant", [{"lora_dropout": 0.1}, {"use_dora": True}])
def test_dropout_or_dora_adapters_are_left_alone(tiny_sd: Path,
                                                 variant: dict[str, object]) -> None:
    from peft import LoraConfig

    model, _ = _load(tiny_sd)
    model.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                      target_modules=list(models.UNET_LORA_TARGETS), **variant))
    assert fuse_lora_projections(model.unet) == 0
    assert not _fused_processors(model.unet)


def test_cross_attention_on_wider_text_fuses_k_and_v_only(tiny_sd: Path) -> None:
    """As in the real models (SD 1.5: 320-1280 wide image features, 768 wide text):
    q cannot share a matmul with k and v; k and v still do."""
    torch.manual_seed(0)
    unet = synthetic.build_lora_unet("sd", "tiny", rank=4, alpha=8,
                                     overrides={"cross_attention_dim": 48})
    _perturb_lora_b(unet)
    model = SimpleNamespace(unet=unet, weight_dtype=torch.float32, kind=models.SD)
    inputs = _inputs(model)  # type: ignore[arg-type]
    expected, expected_grads = _forward_backward(unet, inputs)

    assert fuse_lora_projections(unet) == 8
    cross = [m for m in _lora_attention_modules(unet) if m.to_k.in_features == 48]
    assert len(cross) == 4
    for module in cross:
        assert not module.processor.fuse_query
        assert len(module.processor.base.linears) == 2  # k and v
    got, grads = _forward_backward(unet, inputs)
    _assert_close_to_scale(got, expected, 2e-5, "output")
    for name, grad in expected_grads.items():
        _assert_close_to_scale(grads[name], grad, 2e-5, name)


# -------------------------------------------------------- same training
def test_training_steps_end_with_the_same_lora_weights(tiny_sd: Path,
                                                       face_pixels: torch.Tensor) -> None:
    states = []
    for fuse in (False, True):
        config = _config(tiny_sd, max_train_steps=4, fused_lora=fuse)
        model = models.load_base_model(config, CPU)
        prepared = training.build_trainer(model, config, face_pixels)
        trainer = prepared.trainer
        assert prepared.fused_attention == (8 if fuse else 0)
        result = trainer.run(4, report_every_seconds=1e9, progress_bar=False)
        assert result.steps == 4
        states.append(trainer.trainable_state())
    plain, fused = states
    assert plain.keys() == fused.keys()
    moved = 0
    for key, value in plain.items():
        torch.testing.assert_close(fused[key], value, rtol=1e-4, atol=1e-6, msg=key)
        moved += "lora_B" in key and bool(value.abs().max() > 0)
    assert moved  # the steps trained something (B starts at zero)
    worst = max(float((fused[k] - v).abs().max()) for k, v in plain.items())
    print(f"after 4 steps: LoRA weights differ by at most {worst:.1e}")


# ----------------------------------------------- disabled and merged adapters
def test_disabled_or_merged_adapter_gives_the_standard_output(tiny_sd: Path) -> None:
    from peft.tuners.lora import LoraLayer

    model, config = _load(tiny_sd)
    inputs = _inputs(model)
    base_output = _output(model.unet, inputs)
    models.add_lora(model, config)
    _perturb_lora_b(model.unet)
    unet = model.unet
    with_lora = _output(unet, inputs)
    assert not torch.allclose(with_lora, base_output)
    assert fuse_lora_projections(unet) == 8

    unet.disable_adapters()
    assert torch.equal(_output(unet, inputs), base_output)
    unet.enable_adapters()
    torch.testing.assert_close(_output(unet, inputs), with_lora, rtol=1e-5, atol=1e-5)

    lora_layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    for layer in lora_layers:
        layer.merge()  # W += B A, in place: into the fused base weights
    assert not torch.allclose(_output(unet, inputs), base_output)
    for layer in lora_layers:
        layer.unmerge()
    torch.testing.assert_close(_output(unet, inputs), with_lora, rtol=1e-5, atol=1e-5)
    for layer in lora_layers:
        layer.merge()
    fused_merged = _output(unet, inputs)
    _unfuse(unet)
    assert torch.equal(fused_merged, _output(unet, inputs))


# ---------------------------------------------- same parameters, no copies
def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def test_parameters_state_dicts_and_memory_are_unchanged(tiny_sd: Path) -> None:
    from peft.utils import get_peft_model_state_dict

    model = _lora_model(tiny_sd)
    unet = model.unet
    lora_before = {k: v.clone() for k, v in get_peft_model_state_dict(unet).items()}
    state_before = {k: v.clone() for k, v in unet.state_dict().items()}
    params_before = dict(unet.named_parameters())
    bytes_before = _storage_bytes([*unet.parameters(), *unet.buffers()])

    assert fuse_lora_projections(unet) == 8
    lora_after = get_peft_model_state_dict(unet)
    assert list(lora_after) == list(lora_before)
    assert all(torch.equal(lora_after[k], v) for k, v in lora_before.items())
    state_after = unet.state_dict()
    assert list(state_after) == list(state_before)
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())
    params_after = dict(unet.named_parameters())
    assert list(params_after) == list(params_before)
    # The very same Parameter objects: the optimiser's and the checkpoints' tensors.
    assert all(params_after[k] is p for k, p in params_before.items())

    fused_tensors = []
    for processor in _fused_processors(unet):
        weight = processor.base.weight
        fused_tensors.append(weight)
        offset = weight.storage_offset()
        for linear in processor.base.linears:  # consecutive views into the one tensor
            assert linear.weight.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
            assert linear.weight.storage_offset() == offset
            offset += linear.weight.numel()
    assert len(fused_tensors) == 8
    # One concatenation replaces the separate weights: not a byte more.
    assert _storage_bytes([*unet.parameters(), *unet.buffers(), *fused_tensors]) == bytes_before


def test_fused_weights_follow_a_module_cast_after_fusing(tiny_sd: Path) -> None:
    model = _lora_model(tiny_sd)
    unet = model.unet
    fuse_lora_projections(unet)
    unet.to(torch.float64)  # the layers get their own fp64 storage, the fusion is stale
    sample, timesteps, kwargs = _inputs(model)
    inputs = (sample.double(), timesteps,
              {"encoder_hidden_states": kwargs["encoder_hidden_states"].double()})
    fused = _output(unet, inputs)  # rebuilds the concatenations in fp64
    for processor in _fused_processors(unet):
        assert processor.base.weight.dtype == torch.float64
        pointer = processor.base.weight.untyped_storage().data_ptr()
        assert all(linear.weight.untyped_storage().data_ptr() == pointer
                   for linear in processor.base.linears)
    _unfuse(unet)
    torch.testing.assert_close(fused, _output(unet, inputs), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------ fewer ops
class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched, by name; each costs the host a dispatch, and
    each one that is not a view (metadata only) is a kernel launch on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.views = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        self.views += func.is_view or name == "_unsafe_view"
        return func(*args, **(kwargs or {}))


def _count_step_ops(unet: Any, inputs: Inputs) -> _OpCounter:
    with _OpCounter() as counter:
        _forward_backward(unet, inputs)
    return counter


@pytest.mark.parametrize("precision", ["no", "bf16-pure"])
def test_fusion_dispatches_fewer_ops_per_forward_and_backward(tiny_sd: Path,
                                                               precision: str) -> None:
    model = _lora_model(tiny_sd, precision)
    inputs = _inputs(model)
    _forward_backward(model.unet, inputs)  # warm up (lazy inits)
    plain = _count_step_ops(model.unet, inputs)
    fuse_lora_projections(model.unet)
    fused = _count_step_ops(model.unet, inputs)

    def summary(counter: _OpCounter) -> tuple[int, int, int]:
        total = counter.ops.total()
        matmuls = sum(counter.ops[name] for name in ("mm", "addmm", "bmm"))
        return total, total - counter.views, matmuls

    (plain_all, plain_kernels, plain_mm), (fused_all, fused_kernels, fused_mm) = (
        summary(plain), summary(fused))
    print(f"tiny SD {precision} forward+backward aten ops: unfused {plain_all} ({plain_kernels} not views, "
          f"{plain_mm} matmuls), fused {fused_all} ({fused_kernels} not views, "
          f"{fused_mm} matmuls)")
    assert fused_all < plain_all
    assert fused_kernels < plain_kernels
    assert fused_mm < plain_mm


# ------------------------------------------------------------ inference mode
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "regional-compile"])
def test_inference_mode_first_then_training_with_own_scales(tiny_sd: Path,
                                                            compiled: bool) -> None:
    """Rendering under torch.inference_mode() before a training step: nothing the fused
    processors keep from that call (the per-projection scale factors) may be an
    inference tensor, which autograd cannot save for the backward pass; compiled, a
    tensor the graph made and the processor kept is the graph's output (an inference
    tensor here, one the next replay overwrites with CUDA graphs)."""
    from lora_trainer import compilation

    model = _lora_model(tiny_sd)
    unet = model.unet
    for module in _lora_attention_modules(unet):  # own scales: the factor tensor path
        module.to_k.scaling["default"] = 0.5
        module.to_v.scaling["default"] = 3.0
    inputs = _inputs(model)
    expected, expected_grads = _forward_backward(unet, inputs)
    assert fuse_lora_projections(unet) == 8
    if compiled:
        torch._dynamo.reset()
        compilation.compile_unet(unet, "regional", device=CPU, cuda_graphs=False,
                                 backend="aot_eager")
    try:
        with torch.inference_mode():
            rendered = _output(unet, inputs)
        _assert_close_to_scale(rendered, expected, 2e-5, "output under inference_mode")
        got, grads = _forward_backward(unet, inputs)
    finally:
        torch._dynamo.reset()
    _assert_close_to_scale(got, expected, 2e-5, "output")
    for name, grad in expected_grads.items():
        _assert_close_to_scale(grads[name], grad, 2e-5, name)
