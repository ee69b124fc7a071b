"""``bench-unet``: a randomly initialised SD1.5-shaped UNet for measuring engine speed.

block_out_channels (64, 128, 256, 256), layers_per_block 2, cross-attention dim 256, 4 latent
channels, 32x32 latents: the structure of SD1.5's UNet at a size a 2-core machine can time.
Quantized with plain PTQ on random calibration inputs (speed does not depend on the weights).
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

LATENT = 32
TOKENS = 8
HIDDEN = 256
BATCH = 2


def build_bench_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return unet.eval()


def random_unet_inputs(count: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(count, 4, LATENT, LATENT, generator=generator)
    timestep = torch.randint(0, 1000, (count,), generator=generator).float()
    states = torch.randn(count, TOKENS, HIDDEN, generator=generator)
    return sample, timestep, states
