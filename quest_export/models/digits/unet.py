"""Architecture of the demo UNet: a real diffusers UNet2DConditionModel, small enough to ship.

It has every part QuEST treats specially: ResNet blocks with ``time_emb_proj``, transformer blocks
with self-attention, cross-attention on the label tokens, and feed-forward layers.
"""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from quest_export.models.digits.data import IMAGE_SIZE

#: Noise schedule shared by training (DDPM) and sampling (DDIM).
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=True)


def build_digits_unet(cross_attention_dim: int = 32) -> UNet2DConditionModel:
    """A freshly initialised demo UNet (16x16x1, three resolutions, attention at 8x8 and 4x4)."""
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        transformer_layers_per_block=1,
    )


def build_training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE)


def build_sampling_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULE, set_alpha_to_one=True, steps_offset=0)
