"""The in-memory image set every stage exchanges: images in [-1, 1], NCHW float32, with labels,
prompts and patient ids aligned by index."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from privdistill.errors import DataError


@dataclass
class ImageSet:
    images: np.ndarray  # float32 [N, C, H, W], values in [-1, 1]
    labels: np.ndarray | None = None  # int64 [N] (index into class_names)
    prompts: list[str] | None = None  # [N]
    patient_ids: np.ndarray | None = None  # str [N]; None for synthetic data
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4:
            raise DataError(f"images must be NCHW, got shape {self.images.shape}")
        for name in ("labels", "prompts", "patient_ids"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise DataError(f"{name} has {len(v)} entries for {n} images")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray | list[int]) -> ImageSet:
        idx = np.asarray(idx, dtype=np.int64)
        return ImageSet(
            images=self.images[idx],
            labels=None if self.labels is None else self.labels[idx],
            prompts=None if self.prompts is None else [self.prompts[i] for i in idx],
            patient_ids=None if self.patient_ids is None else self.patient_ids[idx],
            class_names=list(self.class_names),
        )

    def save(self, path: Path) -> None:
        """Write to ``path`` (.npz). Callers write inside a stage's temporary directory."""
        arrays: dict[str, np.ndarray] = {"images": self.images.astype(np.float32)}
        if self.labels is not None:
            arrays["labels"] = self.labels.astype(np.int64)
        if self.patient_ids is not None:
            arrays["patient_ids"] = np.asarray(self.patient_ids, dtype=str)
        meta = {"class_names": self.class_names, "prompts": self.prompts}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        with open(path, "wb") as fh:
            np.savez(fh, allow_pickle=False, **arrays)

    @classmethod
    def load(cls, path: Path) -> ImageSet:
        if not Path(path).is_file():
            raise DataError(f"image set not found: {path}")
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            return cls(
                images=z["images"],
                labels=z.get("labels"),
                prompts=meta.get("prompts"),
                patient_ids=z.get("patient_ids"),
                class_names=meta.get("class_names", []),
            )
