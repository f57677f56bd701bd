"""The student stage reads only the filter's kept synthetic set: every attempt to feed it real
images fails loudly with PrivacyPolicyError."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from privdistill.data.types import ImageSet
from privdistill.errors import PrivacyPolicyError
from privdistill.pipeline import open_filtered_set
from privdistill.stages import Stage, StageContext, run_stage
from privdistill.workdir import KEPT_FILE


def _real_set(n: int = 6) -> ImageSet:
    rng = np.random.default_rng(0)
    return ImageSet(images=rng.uniform(-1, 1, (n, 1, 8, 8)).astype(np.float32), labels=np.zeros(n, np.int64),
                    patient_ids=np.array([f"p{i}" for i in range(n)]), class_names=["a"])


def _synthetic_set(n: int = 6) -> ImageSet:
    s = _real_set(n)
    return ImageSet(images=s.images, labels=s.labels, class_names=["a"])


def _fake_filter_stage(workdir: Path, data: ImageSet) -> Path:
    """A real stage record named 'filter' whose kept set is ``data``."""
    def body(ctx: StageContext) -> dict:
        data.save(ctx.out / KEPT_FILE)
        return {}
    run_stage(Stage("filter", body, (), {}), workdir)
    return workdir / "filter"


def test_accepts_a_completed_filter_output(tmp_path: Path) -> None:
    got = open_filtered_set(_fake_filter_stage(tmp_path, _synthetic_set()))
    assert len(got) == 6 and got.patient_ids is None


def test_refuses_the_ingest_directory_of_real_images(tmp_path: Path) -> None:
    ingest = tmp_path / "ingest"
    ingest.mkdir()
    _real_set().save(ingest / "train.npz")
    with pytest.raises(PrivacyPolicyError, match="not a completed filter stage output"):
        open_filtered_set(ingest)


def test_refuses_real_images_renamed_as_the_kept_set(tmp_path: Path) -> None:
    fdir = _fake_filter_stage(tmp_path, _synthetic_set())
    _real_set().save(fdir / KEPT_FILE)  # swapped in after the filter wrote its record
    with pytest.raises(PrivacyPolicyError, match="changed after the filter stage wrote it"):
        open_filtered_set(fdir)


def test_refuses_a_forged_record_over_real_images(tmp_path: Path) -> None:
    fdir = _fake_filter_stage(tmp_path, _real_set())  # hashes match, but the images carry patient ids
    with pytest.raises(PrivacyPolicyError, match="carries patient ids"):
        open_filtered_set(fdir)


def test_refuses_a_record_from_another_stage(tmp_path: Path) -> None:
    fdir = _fake_filter_stage(tmp_path, _synthetic_set())
    rec = json.loads((fdir / "_stage.json").read_text())
    rec["stage"] = "ingest"
    (fdir / "_stage.json").write_text(json.dumps(rec))
    with pytest.raises(PrivacyPolicyError):
        open_filtered_set(fdir)


def test_student_stage_pointed_at_real_data_fails_loudly(tmp_path: Path) -> None:
    from privdistill.config import parse_config
    from privdistill.pipeline import build_stage

    idx = tmp_path / "imgs.gz"
    idx.write_bytes(b"x")
    cfg = parse_config({"data": {"source": {"type": "idx", "images": str(idx)}, "resolution": 8},
                        "teacher": {"model": {"block_out_channels": [8, 16], "norm_num_groups": 4}}})
    ingest = tmp_path / "ingest"
    ingest.mkdir()
    _real_set().save(ingest / "train.npz")
    stage = build_stage(cfg, "train-student")
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(name="train-student", workdir=tmp_path, out=out, checkpoint_dir=tmp_path / "ck",
                       inputs={"filter": ingest})
    with pytest.raises(PrivacyPolicyError):
        stage.fn(ctx)
    assert list(out.iterdir()) == []
    shutil.rmtree(out)
