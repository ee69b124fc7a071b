"""Learned label tokens: the digits model's "text encoder".

Each label (0-9, plus a null label for classifier-free guidance) maps to a short sequence of
learned tokens that the UNet reads through cross-attention, exactly where Stable Diffusion reads
CLIP text embeddings. Several tokens per label keep the cross-attention softmax non-trivial.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class LabelEncoder(ModelMixin, ConfigMixin):
    """Maps integer labels to ``(batch, num_tokens, embed_dim)`` cross-attention states."""

    @register_to_config
    def __init__(self, num_labels: int = 10, num_tokens: int = 4, embed_dim: int = 32) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_labels + 1, num_tokens * embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        nn.init.normal_(self.embedding.weight, std=1.0)

    @property
    def null_label(self) -> int:
        """Index of the unconditional (null) label used for classifier-free guidance."""
        return int(self.config.num_labels)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        tokens = self.embedding(labels).view(labels.shape[0], self.config.num_tokens, self.config.embed_dim)
        return self.norm(tokens)
