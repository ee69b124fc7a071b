"""Quantized Conv2d / Linear and the attention processor that quantizes the attention matmuls.

Each module computes what the exported graph computes:
``x -> Q/DQ(input, per-timestep scale) -> op(W_q) [-> Q/DQ(output, tied scale)] -> + bias``.
The bias is added after the output quantizer because, with per-timestep rescaling, the engine's
integer op runs in a rescaled domain where a constant bias would be wrong.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quest.quantizers import ActivationQuantizer, TiedOutputQuantizer, WeightQuantizer


class SplitActivationQuantizer(nn.Module):
    """Q-Diffusion's shortcut split: separate quantizers for the two halves of a channel concat."""

    def __init__(self, first: ActivationQuantizer, second: ActivationQuantizer, split: int) -> None:
        super().__init__()
        self.parts = nn.ModuleList([first, second])
        self.split = split

    @property
    def enabled(self) -> bool:
        return all(p.enabled for p in self.parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x[:, : self.split], x[:, self.split :]
        return torch.cat([self.parts[0](a), self.parts[1](b)], dim=1)


class _QuantMixin:
    """Shared state of quantized Conv2d/Linear: input, weight and optional output quantizers."""

    input_quantizer: nn.Module | None
    weight_quantizer: WeightQuantizer | None
    output_quantizer: TiedOutputQuantizer | None

    @classmethod
    def from_float(cls, module: nn.Module) -> nn.Module:
        """Convert a float module in place (same parameters, same name in the model), like ModelOpt."""
        module.__class__ = cls
        module._init_quant()  # type: ignore[attr-defined]
        return module

    def _init_quant(self) -> None:
        self.input_quantizer = None
        self.weight_quantizer = None
        self.output_quantizer = None

    def _finish(self, y: torch.Tensor, bias: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
        if self.output_quantizer is not None:
            y = self.output_quantizer(y)
        if bias is not None:
            shape = [1] * y.dim()
            shape[channel_dim] = -1
            y = y + bias.view(shape)
        return y

    def quantized_weight(self) -> torch.Tensor:
        weight = self.weight  # type: ignore[attr-defined]
        return weight if self.weight_quantizer is None else self.weight_quantizer(weight)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` that simulates the engine's quantized convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        y = self._conv_forward(x, self.quantized_weight(), None)
        return self._finish(y, self.bias, channel_dim=1)


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` that simulates the engine's quantized MatMul/Gemm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        y = F.linear(x, self.quantized_weight(), None)
        return self._finish(y, self.bias, channel_dim=-1)


class QuantAttnProcessor(nn.Module):
    """Attention with explicit matmuls whose inputs (q, k, v, softmax probabilities) are quantized.

    A diffusers attention processor (set with ``Attention.set_processor``), so every
    UNet2DConditionModel works without patching diffusers. Layout is kept batch-first so each
    sample uses its own timestep group.
    """

    def __init__(self, q: ActivationQuantizer, k: ActivationQuantizer, v: ActivationQuantizer, probs: ActivationQuantizer) -> None:
        super().__init__()
        self.q_quantizer = q
        self.k_quantizer = k
        self.v_quantizer = v
        self.probs_quantizer = probs

    def forward(  # diffusers calls processors as processor(attn, hidden_states, ...)
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq, hidden_states.shape[0])
            attention_mask = attention_mask.view(hidden_states.shape[0], attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query, key, value = self.q_quantizer(query), self.k_quantizer(key), self.v_quantizer(value)
        b = query.shape[0]
        head_dim = query.shape[-1] // attn.heads
        query = query.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.softmax(dim=-1)
        del scores  # (batch, heads, S, S): not needed past softmax, and 0.5 GB per sample at 64x64
        probs = self.probs_quantizer(probs)
        out = torch.matmul(probs, value)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
