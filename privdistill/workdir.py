"""The work directory's layout: the pipeline's stages in order, and the files each stage leaves in its directory,
named once. Stage bodies write into their temporary ``ctx.out`` with these names; everything that reads a finished
work directory (the site's gate, packaging, review page and student check, the fingerprint audit) goes through
``WorkDir``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

INGEST, TRAIN_TEACHER, TRAIN_REID, SAMPLE, FILTER, TRAIN_STUDENT, EVALUATE = (
    "ingest", "train-teacher", "train-reid", "sample", "filter", "train-student", "evaluate")

# files inside a stage's directory
TRAIN_SET, TEST_SET, DATA_REPORT = "train.npz", "test.npz", "data_report.json"  # ingest
MODEL_DIR, PROMPTS_FILE = "model", "prompts.json"  # train-teacher / train-student (prompts: text conditioning)
DP_FILE = "dp_report.json"  # the teacher's DP-SGD accounting; travels teacher -> sample -> filter -> report/shard
REID_DIR, REID_ONNX = "reid", "reid.onnx"  # train-reid
SAMPLES_FILE, SAMPLES_GRID = "samples.npz", "samples_grid.png"  # sample
MIA_FILE = "mia_report.json"  # the teacher's membership-inference AUC (aggregate); sample -> filter -> report/shard
KEPT_FILE = "kept.npz"  # filter: the kept synthetic images, the only input of the student


@dataclass(frozen=True)
class WorkDir:
    """Paths of a finished work directory's stage outputs."""

    root: Path

    def stage(self, name: str) -> Path:
        return Path(self.root) / name

    @property
    def train_set(self) -> Path:
        return self.stage(INGEST) / TRAIN_SET

    @property
    def test_set(self) -> Path:
        return self.stage(INGEST) / TEST_SET

    @property
    def teacher_model(self) -> Path:
        return self.stage(TRAIN_TEACHER) / MODEL_DIR

    @property
    def reid_model(self) -> Path:
        return self.stage(TRAIN_REID) / REID_DIR

    @property
    def reid_onnx(self) -> Path:
        return self.stage(TRAIN_REID) / REID_ONNX

    @property
    def samples(self) -> Path:
        return self.stage(SAMPLE) / SAMPLES_FILE

    @property
    def teacher_mia(self) -> Path:
        return self.stage(SAMPLE) / MIA_FILE

    @property
    def filter_dir(self) -> Path:
        return self.stage(FILTER)

    @property
    def kept(self) -> Path:
        return self.stage(FILTER) / KEPT_FILE
