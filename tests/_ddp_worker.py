"""Run by tests/test_train.py under torchrun: trains a tiny model and writes this rank's weights."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from privdistill.config import ModelConfig, TrainConfig
from privdistill.data.types import ImageSet
from privdistill.models import DiffusionModel
from privdistill.train import Trainer, init_distributed


def tiny_setup() -> tuple[DiffusionModel, ImageSet, TrainConfig]:
    rng = np.random.default_rng(0)
    data = ImageSet(images=rng.uniform(-1, 1, (24, 1, 8, 8)).astype(np.float32),
                    labels=np.repeat(np.arange(2), 12), class_names=["a", "b"])
    torch.manual_seed(0)
    model = DiffusionModel.from_config(ModelConfig(block_out_channels=[8, 16], norm_num_groups=4),
                                       resolution=8, channels=1, class_names=["a", "b"])
    cfg = TrainConfig(steps=6, batch_size=8, warmup_steps=0, log_every=3, checkpoint_every=100, ema_decay=0.9)
    return model, data, cfg


if __name__ == "__main__":
    out = Path(sys.argv[1])
    d = init_distributed()
    model, data, cfg = tiny_setup()
    Trainer(model, data, cfg, seed=3, dist_info=d).fit()
    torch.save(model.unet.state_dict(), out / f"rank{d.rank}.pt")
