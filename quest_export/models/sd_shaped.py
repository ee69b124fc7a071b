"""Stable-Diffusion pipelines with seeded random weights, built on the spot (no hub download).

``sd15-shaped`` is the measurement model for the sd15 path at its real size: its UNet has SD1.5's
exact configuration (860M parameters, 64x64 latents, 768-wide cross-attention), while the text
encoder and VAE are small but produce SD1.5's shapes (77x768 states, 4x64x64 latents at 512 px).
It is written with ``save_pretrained`` into a cache folder once and then loaded through
``DiffusionPipeline.from_pretrained``, the code path of ``--model sd15``. The tests' tiny SD
pipeline is built by the same function with small configurations.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SD15_SHAPED = "sd15-shaped"

# diffusers' UNet2DConditionModel arguments of runwayml/stable-diffusion-v1-5's unet/config.json
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
# 77 positions x 768 features like CLIP ViT-L/14's text tower, one layer deep
SD15_TEXT: dict[str, Any] = {"hidden_size": 768, "intermediate_size": 1024, "num_hidden_layers": 1, "num_attention_heads": 12,
                             "max_position_embeddings": 77}
# 8x down-sampling to 4 latent channels (512 px -> 64x64), narrow channels
SD15_VAE: dict[str, Any] = {
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (32, 32, 64, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": 512,
}


def _byte_unicode() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for raw bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_byte_tokenizer(directory: Path) -> Path:
    """vocab.json + merges.txt of a byte-level CLIP tokenizer (~500 tokens): any prompt encodes."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    for ch in _byte_unicode():
        tokens += [ch, ch + "</w>"]
    tokens += ["th", "the</w>"]
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (directory / "merges.txt").write_text("\n".join(["#version: 0.2", "t h", "th e</w>"]) + "\n")
    return directory


def build_sd_pipeline(out: Path, unet: dict[str, Any], text: dict[str, Any], vae: dict[str, Any], seed: int = 0) -> Path:
    """Write a StableDiffusionPipeline with seeded random weights to ``out`` (save_pretrained,
    safetensors) and return ``out``. Scheduler: DDIM with SD's noise schedule."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        tok_dir = write_byte_tokenizer(Path(scratch))
        tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=text["max_position_embeddings"])
    # built in this order (text encoder, UNet, VAE) so a seed always gives the same weights
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=1, **text))
    unet_model = UNet2DConditionModel(**unet)
    vae_model = AutoencoderKL(in_channels=3, out_channels=3, **vae)
    pipe = StableDiffusionPipeline(
        vae=vae_model,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet_model,
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def cache_root() -> Path:
    """Where built-in generated models are kept: ``$QUEST_EXPORT_CACHE`` or ~/.cache/quest-export."""
    return Path(os.environ.get("QUEST_EXPORT_CACHE") or Path.home() / ".cache" / "quest-export").expanduser()


def sd15_shaped_dir(build: bool = True, log=None) -> Path:
    """The sd15-shaped pipeline folder, built (about 3.5 GB, a minute) the first time it is asked for.

    Built into a temporary sibling and renamed, under a lock, so an interrupted or concurrent build
    never leaves a half-written model that later loads."""
    from quest_export.artifacts import atomic_directory
    from quest_export.errors import UserError
    from quest_export.locking import OutputLock

    target = cache_root() / SD15_SHAPED
    if (target / "model_index.json").is_file() or not build:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the model cache {target.parent} ({exc.strerror}); set QUEST_EXPORT_CACHE to a writable folder") from None
    with OutputLock(target):
        if (target / "model_index.json").is_file():  # built by a concurrent process meanwhile
            return target
        if log is not None:
            log(f"building {SD15_SHAPED} (SD1.5's UNet configuration, seeded random weights) into {target}")
        with atomic_directory(target, force=True) as tmp:
            build_sd_pipeline(tmp, SD15_UNET, SD15_TEXT, SD15_VAE)
    return target
