"""Fused LoRA projections for the UNet's attention modules.

Why: on a fast GPU the eager training step is bound by the host launching
thousands of small kernels, and peft runs every LoRA projection as its own
base matmul, down matmul, up matmul, scale and add. In an attention module
the projections that read the same input can share them: self-attention
computes q, k and v with one base matmul (over the three frozen weights
concatenated), one LoRA down matmul (the three ``lora_A`` weights
concatenated) and one batched up matmul (the ``lora_B`` weights stacked);
cross-attention does the same for k and v (from the text embeddings), q goes
through its own peft layer.

Same maths, same parameters: the sums are those of peft's ``Linear.forward``
and diffusers' ``AttnProcessor2_0`` (input cast to the LoRA weights' dtype,
each projection's own ``scaling``, the result cast back to the base output's
dtype), so outputs and gradients match the unfused model to rounding. peft's
``lora_A``/``lora_B`` weights stay the trainable leaf parameters (optimiser,
checkpoints and ``get_peft_model_state_dict`` exports are unchanged); they
are concatenated afresh on every call. The frozen base weights of a group are
concatenated once and the base layers' ``weight`` become views into that one
tensor (no second copy); a cheap check on every call rebuilds it if the
module was moved or cast since.

Usage: ``fuse_lora_projections(unet)`` after the LoRA adapter is added. With
the adapter disabled, merged, switched or replaced, a fused module computes
exactly what ``AttnProcessor2_0`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: The projections an Attention module may fuse, in the order they are concatenated.
_PROJECTIONS = ("to_q", "to_k", "to_v")


def _lora_linear_type() -> type:
    from peft.tuners.lora.layer import Linear

    return Linear


def _plain_adapter(layer: Any) -> str | None:
    """The single active adapter of a plain peft LoRA ``Linear``, or None if not fusable.

    Plain: exactly one active adapter, no dropout, no DoRA or other variant, no
    LoRA bias, not merged, an ``nn.Linear`` base with frozen weights.
    """
    if type(layer) is not _lora_linear_type():
        return None
    base = layer.base_layer
    if type(base) is not nn.Linear or base.weight.requires_grad:
        return None
    if base.bias is not None and base.bias.requires_grad:
        return None
    if layer.merged or layer.fan_in_fan_out or len(layer.active_adapters) != 1:
        return None
    adapter = layer.active_adapters[0]
    if adapter not in layer.lora_A or adapter not in layer.lora_B:
        return None
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear or lora_b.bias is not None:
        return None
    if not isinstance(layer.lora_dropout[adapter], nn.Identity):
        return None
    if adapter in layer.lora_variant or layer.use_dora.get(adapter, False):
        return None
    if adapter in layer.lora_magnitude_vector:
        return None
    return adapter


def _unsupported_feature(attn: Any) -> str | None:
    """The first feature of ``attn`` that :class:`FusedLoraAttnProcessor` does not implement."""
    for name in ("spatial_norm", "group_norm", "norm_q", "norm_k"):
        if getattr(attn, name, None) is not None:
            return name
    for name in ("norm_cross", "residual_connection"):
        if getattr(attn, name, False):
            return name
    return None


class _FusedBase:
    """Frozen ``nn.Linear`` weights (and biases) concatenated along their outputs.

    The layers' ``weight``/``bias`` are views into the concatenation, so it costs
    no memory. Moving or casting the module gives them their own storage again;
    :meth:`tensors` notices (data pointer, device, dtype) and concatenates anew,
    letting the old concatenation go (it is held here until then).
    """

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        self.linears = list(linears)
        self.weight = torch.empty(0)
        self.bias: torch.Tensor | None = None
        self._pointers: tuple[int, ...] = ()
        self._build()

    def _build(self) -> None:
        # Not an inference tensor even if first called under inference_mode: the
        # training step's autograd saves these weights for the input's gradient.
        with torch.inference_mode(False), torch.no_grad():
            self.weight = torch.cat([lin.weight for lin in self.linears])
            has_bias = self.linears[0].bias is not None
            self.bias = torch.cat([lin.bias for lin in self.linears]) if has_bias else None
            start = 0
            for lin in self.linears:
                stop = start + lin.out_features
                # .data: the same Parameter objects, now views into the concatenation.
                lin.weight.data = self.weight[start:stop]
                if self.bias is not None:
                    lin.bias.data = self.bias[start:stop]
                start = stop
        self._pointers = self._current_pointers()

    def _current_pointers(self) -> tuple[int, ...]:
        pointers = [lin.weight.data_ptr() for lin in self.linears]
        if self.bias is not None:
            pointers += [lin.bias.data_ptr() for lin in self.linears]
        return tuple(pointers)

    def _is_current(self) -> bool:
        weight = self.weight
        for lin in self.linears:
            own = lin.weight
            if own.device != weight.device or own.dtype != weight.dtype:
                return False
            if (lin.bias is None) != (self.bias is None):
                return False
        # The concatenation is held here, so its addresses cannot be reused by another
        # tensor: equal pointers mean the layers still view it.
        return self._current_pointers() == self._pointers

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The concatenated weight and bias (rebuilt first if the layers moved)."""
        if not torch.compiler.is_compiling() and not self._is_current():
            self._build()
        return self.weight, self.bias


def _uniform(layers: Sequence[Any], adapters: Sequence[str]) -> bool:
    """Whether ``layers`` can share one matmul per stage: same sizes, rank and dtypes."""
    first = layers[0]
    lora_a, lora_b = first.lora_A[adapters[0]], first.lora_B[adapters[0]]
    for layer, adapter in zip(layers, adapters, strict=True):
        if layer.in_features != first.in_features or layer.out_features != first.out_features:
            return False
        if layer.lora_A[adapter].out_features != lora_a.out_features:
            return False
        if (layer.lora_A[adapter].weight.dtype != lora_a.weight.dtype
                or layer.lora_B[adapter].weight.dtype != lora_b.weight.dtype):
            return False
        if (layer.base_layer.bias is None) != (first.base_layer.bias is None):
            return False
    return True


class FusedLoraAttnProcessor:
    """``AttnProcessor2_0`` with the q/k/v (or k/v) LoRA projections fused.

    Made by :func:`fuse_lora_projections`, one per Attention module (it holds
    that module's concatenated base weights).
    """

    def __init__(self, attn: Any, adapters: Sequence[str], fuse_query: bool) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.layers = [getattr(attn, name) for name in _PROJECTIONS]
        self.adapters = list(adapters)
        #: q is concatenated with k and v (same input size, output size and rank).
        self.fuse_query = fuse_query
        fused = self.layers if fuse_query else self.layers[1:]
        self.base = _FusedBase([layer.base_layer for layer in fused])
        self.plain = AttnProcessor2_0()
        self._scales: tuple[tuple[Any, ...], torch.Tensor] | None = None

    # ------------------------------------------------------------------ checks
    def _fusable_now(self, attn: Any) -> bool:
        """Whether the adapters are still the plain, active, unmerged ones fused at set-up."""
        for name, layer, adapter in zip(_PROJECTIONS, self.layers, self.adapters, strict=True):
            if getattr(attn, name) is not layer:
                return False
            if layer.disable_adapters or layer.merged or layer.active_adapters != [adapter]:
                return False
            base = layer.base_layer  # unfrozen since: its gradient must reach the layer's own
            if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
                return False
            if not getattr(layer, "cast_input_dtype_enabled", True):
                return False
        return True

    # ------------------------------------------------------------- projections
    def _scale(self, up: torch.Tensor, scales: list[float]) -> torch.Tensor:
        """``up[g] * scales[g]`` as peft multiplies each projection by its own scaling."""
        if all(s == scales[0] for s in scales):
            # x * 1.0 is x: skip the kernel (peft's usual alpha == rank).
            return up if scales[0] == 1.0 else up * scales[0]
        if torch.compiler.is_compiling():
            # A constant of the graph, never kept here: a tensor a compiled graph makes
            # is its output (under inference_mode an inference tensor, which autograd
            # cannot save; with CUDA graphs one the next replay overwrites).
            factor = torch.tensor(scales, dtype=torch.float32, device=up.device).view(-1, 1, 1)
            return (up * factor).to(up.dtype)
        key = (up.device, *scales)
        if self._scales is None or self._scales[0] != key:  # the last one: no copy per step
            # Kept for later calls: not an inference tensor even if made under
            # inference_mode (sample rendering), as autograd saves it in training steps.
            with torch.inference_mode(False):
                factor = torch.tensor(scales, dtype=torch.float32, device=up.device)
                self._scales = (key, factor.view(-1, 1, 1))
        factor = self._scales[1]
        # peft multiplies by a Python float: computed in fp32, rounded to up's dtype.
        return (up * factor).to(up.dtype)

    def _project(self, x: torch.Tensor, with_query: bool) -> list[torch.Tensor]:
        """The projections of ``x`` (q, k, v or k, v): one matmul per stage for all."""
        layers = self.layers if with_query else self.layers[1:]
        adapters = self.adapters if with_query else self.adapters[1:]
        weight, bias = self.base.tensors()
        if self.fuse_query and not with_query:  # the k, v rows of the q, k, v weight
            skip = self.layers[0].out_features
            weight = weight[skip:]
            bias = None if bias is None else bias[skip:]
        groups = len(layers)
        out_features = layers[0].out_features
        # peft: result = base_layer(x); x = x.to(lora_A.weight.dtype);
        # result = result + lora_B(lora_A(x)) * scaling; result.to(result's dtype).
        base = F.linear(x, weight, bias)  # [..., groups * out]
        lora_a = torch.cat([layer.lora_A[a].weight for layer, a in zip(layers, adapters)])
        lora_b = torch.stack([layer.lora_B[a].weight for layer, a in zip(layers, adapters)])
        rank = lora_b.shape[-1]
        if x.dtype != lora_a.dtype:
            x = x.to(lora_a.dtype)
        down = F.linear(x, lora_a)  # [..., groups * rank]
        rows = down.numel() // (groups * rank)
        # B @ down^T ([groups, out, rows]) rather than down @ B^T: autograd then
        # computes each lora_B's gradient in the parameter's own layout (no copies).
        up = torch.bmm(lora_b, down.reshape(rows, groups, rank).permute(1, 2, 0))
        up = self._scale(up, [layer.scaling[a] for layer, a in zip(layers, adapters)])
        # [rows, groups, out] in the base output's layout: q, k and v are strided views
        # of one tensor, and their gradients stack back into that layout without copies.
        result = base.reshape(rows, groups, out_features) + up.permute(2, 0, 1)
        result = result.to(base.dtype)
        shape = (*base.shape[:-1], out_features)
        return [part.view(shape) for part in result.unbind(1)]

    # ---------------------------------------------------------------- forward
    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if args or kwargs.get("scale") is not None or not self._fusable_now(attn):
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask,
                              temb, *args, **kwargs)
        # From here on: AttnProcessor2_0 without the features fuse_lora_projections
        # leaves unfused (spatial_norm, group_norm, norm_cross, norm_q/k, residual).
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length,
                                                         batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1,
                                                 attention_mask.shape[-1])
        if encoder_hidden_states is None and self.fuse_query:
            query, key, value = self._project(hidden_states, with_query=True)
        else:
            query = attn.to_q(hidden_states)
            source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            key, value = self._project(source, with_query=False)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1,
                                                              attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height,
                                                                    width)
        if attn.rescale_output_factor != 1.0:  # x / 1.0 is x: skip the kernel
            hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


def _fusable(attn: Any) -> tuple[list[str], bool] | None:
    """(adapter of q, k, v; whether q fuses too) for an Attention module, or None.

    None when the module has a feature the fused processor does not implement,
    a processor other than ``AttnProcessor2_0`` (or an earlier fused one), or
    q/k/v that are not all plain peft LoRA layers whose k and v can share matmuls.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    if type(attn.processor) not in (AttnProcessor2_0, FusedLoraAttnProcessor):
        return None
    if _unsupported_feature(attn) is not None:
        return None
    layers = [getattr(attn, name, None) for name in _PROJECTIONS]
    adapters = [_plain_adapter(layer) for layer in layers]
    if any(adapter is None for adapter in adapters):
        return None
    names: list[str] = [a for a in adapters if a is not None]
    if not _uniform(layers[1:], names[1:]):
        return None
    return names, _uniform(layers, names)


def fuse_lora_projections(unet: nn.Module) -> int:
    """Give every supported Attention module of ``unet`` a :class:`FusedLoraAttnProcessor`.

    Call it after the LoRA adapter is added (``add_lora``); parameters and their
    names do not change. Modules that are not supported (see
    :func:`_fusable`) keep their processor. Calling it again refreshes
    the fused modules. Returns how many modules are fused.
    """
    from diffusers.models.attention_processor import Attention

    fused = 0
    for module in unet.modules():
        if not isinstance(module, Attention):
            continue
        found = _fusable(module)
        if found is None:
            continue
        adapters, fuse_query = found
        module.set_processor(FusedLoraAttnProcessor(module, adapters, fuse_query))
        fused += 1
    return fused
