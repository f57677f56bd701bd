"""A small Vision Transformer for downstream evaluation, built from config with transformers (no download)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from privdistill.config import ViTArchConfig


class ViTClassifier(nn.Module):
    """``ViTForImageClassification`` that takes NCHW images in [-1, 1] and returns logits."""

    def __init__(self, resolution: int, channels: int, n_classes: int, arch: ViTArchConfig) -> None:
        super().__init__()
        self.config = ViTConfig(
            image_size=resolution,
            patch_size=arch.patch_for(resolution),
            num_channels=channels,
            hidden_size=arch.hidden_size,
            num_hidden_layers=arch.num_layers,
            num_attention_heads=arch.num_heads,
            intermediate_size=arch.mlp_ratio * arch.hidden_size,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.config.num_labels = n_classes  # a property (sets id2label), not an __init__ argument
        self.vit = ViTForImageClassification(self.config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=x).logits


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch: int = 512) -> np.ndarray:
    """Predicted class index per image (model in eval mode)."""
    model.eval()
    out = [
        model(torch.from_numpy(np.ascontiguousarray(images[s : s + batch], dtype=np.float32))).argmax(1)
        for s in range(0, len(images), batch)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images whose predicted class equals the label."""
    if len(images) == 0:
        return 0.0
    return float((predict(model, images) == np.asarray(labels)).mean())
