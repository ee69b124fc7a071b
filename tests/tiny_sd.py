"""A tiny, randomly initialised Stable-Diffusion-shaped pipeline for tests.

Same classes as sd14/sd15 (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer,
DDIMScheduler), written by the builder that makes the built-in ``sd15-shaped`` model
(``quest_export.models.sd_shaped``), so the CLI loads it through the code path the SD aliases use.
"""

from __future__ import annotations

from pathlib import Path

from quest_export.models.sd_shaped import build_sd_pipeline, write_byte_tokenizer  # noqa: F401 - tests use the tokenizer too

TINY_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 16}
TINY_VAE = {
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (16, 32),
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 16,
}


def build_tiny_sd(directory: Path, seed: int = 0) -> Path:
    """Write a tiny SD pipeline (about 1 MB) to ``directory``/tiny-sd and return it."""
    return build_sd_pipeline(directory / "tiny-sd", TINY_UNET, TINY_TEXT, TINY_VAE, seed)
