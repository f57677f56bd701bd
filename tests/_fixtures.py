"""Test helpers shared by several test modules: real Fashion-MNIST images, simulated visits, process state."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from privdistill.data.types import ImageSet

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def process_running(pid: int) -> bool:
    """Whether ``pid`` runs (Linux /proc); a zombie waiting for its new parent to reap it counts as ended."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def fashion(split: str, start: int, n: int) -> np.ndarray:
    """n real Fashion-MNIST images from `split` ("train" or "t10k"), NCHW in [-1, 1]."""
    with gzip.open(FMNIST / f"{split}-images-idx3-ubyte.gz") as fh:
        raw = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    return raw[start : start + n].astype(np.float32) / 127.5 - 1.0


def with_visits(base: np.ndarray, visits: int, seed: int, prefix: str = "patient-") -> ImageSet:
    """Each base image is a patient; each visit is shifted by up to 1 px with 5% intensity jitter."""
    rng = np.random.default_rng(seed)
    images, pids = [], []
    for i, img in enumerate(base):
        for _ in range(visits):
            dy, dx = rng.integers(-1, 2, 2)
            shifted = np.roll(img, (int(dy), int(dx)), axis=(1, 2))
            images.append(np.clip((shifted + 1) * rng.uniform(0.95, 1.05) - 1, -1, 1))
            pids.append(f"{prefix}{i:04d}")
    return ImageSet(np.stack(images).astype(np.float32), patient_ids=np.array(pids), class_names=["item"])
