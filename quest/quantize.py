"""Apply a recipe and a target profile to a UNet: the quantized simulation.

``quantize_unet`` converts every Conv2d/Linear in place to its quantized twin, installs the
quantizing attention processor, and registers a :class:`TimestepContext` that a forward pre-hook
fills from the UNet's own ``timestep`` argument. The UNet stays a ``UNet2DConditionModel``, so any
diffusers pipeline uses it unchanged.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from quest.errors import QuantConfigError
from quest.modules import QuantAttnProcessor, QuantConv2d, QuantLinear, SplitActivationQuantizer
from quest.profiles import TargetProfile, get_profile
from quest.quantizers import ActivationQuantizer, TiedOutputQuantizer, WeightQuantizer
from quest.recipe import Recipe
from quest.timesteps import TimestepContext, uniform_group_lookup

CONTEXT_NAME = "quest_timesteps"


@dataclass
class LayerInfo:
    """How one layer is quantized (the checkpoint's and manifest's layer map)."""

    name: str
    kind: str  # conv | linear | attention
    weight_bits: int | None
    act_bits: int | None
    timestep_groups: int
    output_quantizer: bool = False
    split_at: int | None = None
    softmax_bits: int | None = None


@dataclass
class QuantizedUNet:
    """Handle on a UNet quantized in place."""

    unet: nn.Module
    recipe: Recipe
    profile: TargetProfile
    context: TimestepContext
    layers: dict[str, LayerInfo]

    def activation_quantizers(self) -> Iterator[tuple[str, nn.Module]]:
        for name, module in self.unet.named_modules():
            if isinstance(module, (ActivationQuantizer, TiedOutputQuantizer)):
                yield name, module

    def weight_quantizers(self) -> Iterator[tuple[str, WeightQuantizer]]:
        for name, module in self.unet.named_modules():
            if isinstance(module, WeightQuantizer):
                yield name, module

    def layer_map(self) -> dict[str, dict[str, Any]]:
        return {name: asdict(info) for name, info in self.layers.items()}


def _rule_for(name: str, recipe: Recipe):
    match = None
    for rule in recipe.layers:
        if fnmatch.fnmatchcase(name, rule.pattern):
            match = rule  # last matching rule wins
    return match


def _is_up_shortcut(name: str) -> bool:
    return name.startswith("up_blocks.") and name.endswith("conv_shortcut")


def _shortcut_split(unet: nn.Module, name: str) -> int | None:
    """Channels of the hidden part of an up-block ResNet's ``cat([hidden, skip])`` input.

    The hidden part is what the previous ResNet (or the previous block / mid block) produced.
    """
    parts = name.split(".")  # up_blocks.{i}.resnets.{j}.conv_shortcut
    if len(parts) != 5 or parts[2] != "resnets":
        return None
    i, j = int(parts[1]), int(parts[3])
    if j > 0:
        hidden = unet.up_blocks[i].resnets[j - 1].out_channels
    elif i > 0:
        hidden = unet.up_blocks[i - 1].resnets[-1].out_channels
    else:
        hidden = unet.config.block_out_channels[-1]
    in_channels = unet.up_blocks[i].resnets[j].conv1.in_channels
    return hidden if 0 < hidden < in_channels else None


def _layer_names(unet: nn.Module, with_attention: bool) -> list[str]:
    names = [n for n, m in unet.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    if with_attention:
        from diffusers.models.attention_processor import Attention

        names += [n for n, m in unet.named_modules() if isinstance(m, Attention)]
    return names


def check_recipe(unet: nn.Module, recipe: Recipe, profile: TargetProfile) -> None:
    """Refuse, before any long work, a recipe the profile cannot run or whose rules name no layer."""
    recipe.validate()
    profile.check_activation_layout(recipe.activation_symmetric, recipe.activation_per_channel)
    for bits in {recipe.weight_bits, *(r.weight_bits for r in recipe.layers if r.weight_bits)}:
        profile.check_bits(bits, "weight")
    act = {recipe.act_bits, recipe.softmax_bits, recipe.attention_bits or recipe.act_bits}
    for bits in act | {r.act_bits for r in recipe.layers if r.act_bits}:
        profile.check_bits(bits, "activation")
    names = _layer_names(unet, recipe.quantize_attention)
    unmatched = [r.pattern for r in recipe.layers if not any(fnmatch.fnmatchcase(n, r.pattern) for n in names)]
    if unmatched:
        raise QuantConfigError(
            f"recipe {recipe.name}: rule pattern(s) {', '.join(map(repr, unmatched))} match no layer of the model"
        )
    unknown = sorted(set(recipe.act8_selected) - set(names))
    if unknown:
        raise QuantConfigError(f"recipe {recipe.name}: act8_selected names layer(s) this model does not have: {', '.join(unknown[:3])}")


def quantize_unet(unet: nn.Module, recipe: Recipe, profile: TargetProfile | None = None) -> QuantizedUNet:
    """Quantize ``unet`` in place following ``recipe`` on ``profile`` (default: the recipe's target)."""
    profile = profile or get_profile(recipe.target)
    check_recipe(unet, recipe, profile)
    num_train = int(getattr(getattr(unet, "config", None), "num_train_timesteps", 0) or 1000)
    groups = recipe.timestep_groups
    context = TimestepContext(uniform_group_lookup(groups, num_train))
    unet.add_module(CONTEXT_NAME, context)

    layers: dict[str, LayerInfo] = {}
    targets = [(n, m) for n, m in unet.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    for name, module in targets:
        rule = _rule_for(name, recipe)
        if rule is not None and not rule.quantize:
            continue
        w_bits = (rule.weight_bits if rule and rule.weight_bits else None) or recipe.weight_bits
        a_bits = (rule.act_bits if rule and rule.act_bits else None) or recipe.act_bits
        if name in recipe.act8_selected:  # quest.mixed_precision's choice
            a_bits = max(a_bits, 8)
        is_conv = isinstance(module, nn.Conv2d)
        qmod = (QuantConv2d if is_conv else QuantLinear).from_float(module)
        qmod.weight_quantizer = WeightQuantizer(profile.weight_spec(w_bits), module.weight.shape[0])
        act_spec = profile.activation_spec(a_bits)
        split_at = _shortcut_split(unet, name) if (recipe.split_shortcut and is_conv and _is_up_shortcut(name)) else None
        if split_at:
            qmod.input_quantizer = SplitActivationQuantizer(
                ActivationQuantizer(act_spec, groups, context), ActivationQuantizer(act_spec, groups, context), split_at
            )
        else:
            qmod.input_quantizer = ActivationQuantizer(act_spec, groups, context)
            if is_conv and profile.conv_output_quantizers:
                qmod.output_quantizer = TiedOutputQuantizer(profile.activation_spec(max(a_bits, 8)), qmod.input_quantizer)
        layers[name] = LayerInfo(
            name, "conv" if is_conv else "linear", qmod.weight_quantizer.spec.bits, a_bits, groups, qmod.output_quantizer is not None, split_at
        )

    if recipe.quantize_attention and profile.attention_quantizers:
        from diffusers.models.attention_processor import Attention

        for name, module in unet.named_modules():
            if not isinstance(module, Attention):
                continue
            rule = _rule_for(name, recipe)
            if rule is not None and not rule.quantize:
                continue
            a_bits = (rule.act_bits if rule and rule.act_bits else None) or recipe.attention_bits or recipe.act_bits
            if name in recipe.act8_selected:
                a_bits = max(a_bits, 8)
            spec = profile.activation_spec(a_bits)
            probs_spec = profile.activation_spec(recipe.softmax_bits)
            module.set_processor(
                QuantAttnProcessor(
                    ActivationQuantizer(spec, groups, context),
                    ActivationQuantizer(spec, groups, context),
                    ActivationQuantizer(spec, groups, context),
                    ActivationQuantizer(probs_spec, groups, context),
                )
            )
            layers[name] = LayerInfo(name, "attention", None, a_bits, groups, softmax_bits=recipe.softmax_bits)

    unet.to(next(unet.parameters()).device)  # new quantizers live where the weights live
    unet.register_forward_pre_hook(_set_timestep, with_kwargs=True)
    return QuantizedUNet(unet, recipe, profile, context, layers)


def _set_timestep(unet: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: select every quantizer's timestep group from the UNet's own input.
    (Module-level, reading the context from the module, so deep copies of the UNet work.)"""
    sample = args[0] if args else kwargs["sample"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    getattr(unet, CONTEXT_NAME).set(timestep, sample.shape[0])


def set_quantizers_enabled(qunet: QuantizedUNet, enabled: bool, pattern: str = "*") -> int:
    """Enable or disable every quantizer whose module name matches ``pattern``; returns the count."""
    count = 0
    for name, module in qunet.unet.named_modules():
        if isinstance(module, (ActivationQuantizer, TiedOutputQuantizer, WeightQuantizer)) and fnmatch.fnmatchcase(name, pattern):
            module.enabled = enabled
            count += 1
    return count


@torch.no_grad()
def quantization_summary(qunet: QuantizedUNet) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for info in qunet.layers.values():
        kinds[info.kind] = kinds.get(info.kind, 0) + 1
    return kinds
