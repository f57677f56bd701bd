"""Fingerprint audit: planting, the detector, the t' search (stub denoiser and real tiny teachers), the
filter on fingerprinted copies, and the `privdistill audit` command on the tiny config."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from privdistill.audit.detector import detector_accuracy, train_detector
from privdistill.audit.fingerprint_audit import audit_failures, raise_if_survivors, survivors
from privdistill.audit.fingerprints import Fingerprint, make_fingerprints, plant
from privdistill.audit.tprime import estimate_tprime, model_tprime
from privdistill.config import FilterConfig, ModelConfig, TrainConfig
from privdistill.data.types import ImageSet
from privdistill.errors import DataError, PrivacyPolicyError
from privdistill.filter import filter_synthetic
from privdistill.models import DiffusionModel
from privdistill.train import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from _fixtures import fashion, with_visits

ROOT = Path(__file__).resolve().parents[1]


def _small(split: str, start: int, n: int) -> np.ndarray:
    """n Fashion-MNIST images at 16x16 (area-averaged), NCHW in [-1, 1]."""
    x = torch.from_numpy(fashion(split, start, n))
    return F.interpolate(x, size=16, mode="area").numpy()


def _pixel_embed(images: np.ndarray) -> np.ndarray:
    flat = images.reshape(len(images), -1).astype(np.float32)
    return flat - flat.mean(1, keepdims=True)


# ----------------------------------------------------------------------------- planting
def test_plant_marks_copies_of_k_distinct_patients_and_leaves_the_source_alone() -> None:
    train = with_visits(_small("train", 0, 12), visits=2, seed=0)
    before = train.images.copy()
    planted = plant(train, 4, seed=3)

    assert np.array_equal(train.images, before)  # the run's own training set is untouched
    assert len(set(train.patient_ids[planted.indices])) == 4
    changed = np.flatnonzero(np.abs(planted.data.images - before).reshape(len(before), -1).max(1) > 0)
    assert sorted(changed) == sorted(planted.indices)
    assert [fp.kind for fp in planted.fingerprints] == ["circle", "patch", "circle", "patch"]
    assert planted.fingerprints == make_fingerprints(4, height=16, width=16, seed=3)  # seeded
    with pytest.raises(DataError, match="distinct patients"):
        plant(train, 13, seed=0)


# ----------------------------------------------------------------------------- t' search on a stub
def _stub(reproduced: Callable[[int, int], bool]) -> tuple[np.ndarray, Callable, Callable]:
    """A fingerprinted image, a stub denoiser returning it marked when ``reproduced(t, seed)``, and a detector."""
    fp = Fingerprint("circle", 5, 5, 3)
    clean = _small("t10k", 0, 1)
    marked = fp.apply(clean)

    def reconstruct(images: np.ndarray, t: int, seed: int) -> np.ndarray:
        return marked if reproduced(t, seed) else clean

    def detect(images: np.ndarray) -> np.ndarray:
        return np.abs(images - marked).reshape(len(images), -1).max(1) < 1e-6

    return marked, reconstruct, detect


def test_tprime_is_the_last_level_before_the_first_failure_on_a_non_monotone_curve() -> None:
    # Prepare: reproduced by every seed up to t = 100, by none from 101 to 899, by 12 of 16 seeds from 900:
    # the old "largest level with a majority" rule answered 900; the boundary is 100
    marked, reconstruct, detect = _stub(lambda t, s: t <= 100 or (t >= 900 and s % 4 != 0))

    # Execute
    out = estimate_tprime(marked, reconstruct=reconstruct, detect=detect, t_max=999, seeds=16, tol=1)

    # Assert
    assert out["t_prime"] == [100] and out["bracket"] == [[100, 101]]
    assert out["levels"][0]["100"] == [16, 16] and out["levels"][0]["101"] == [0, 16]
    assert out["levels"][0]["999"] == [12, 16]  # the late comeback was seen, and does not count


def test_tprime_bisection_on_a_monotone_curve_with_a_minority_band() -> None:
    # every seed below 420; one seed in four between 420 and 700 (no majority); none above
    marked, reconstruct, detect = _stub(lambda t, s: t < 420 or (t < 700 and s % 4 == 0))
    out = estimate_tprime(marked, reconstruct=reconstruct, detect=detect, t_max=999, seeds=16, tol=1)
    assert out["t_prime"] == [419] and out["bracket"] == [[419, 420]]
    assert len(out["levels"][0]) <= 20  # bisection: ~log2(1000) levels, not a scan of every t


def test_tprime_is_zero_when_nothing_comes_back_and_t_max_when_everything_does() -> None:
    x = _small("t10k", 0, 2)
    none = estimate_tprime(x, reconstruct=lambda im, t, s: im, detect=lambda im: np.zeros(len(im), bool),
                           t_max=500, seeds=16)
    assert none["t_prime"] == [0, 0] and none["bracket"] == [[0, 1], [0, 1]]
    every = estimate_tprime(x, reconstruct=lambda im, t, s: im, detect=lambda im: np.ones(len(im), bool),
                            t_max=500, seeds=16)
    assert every["t_prime"] == [500, 500] and every["bracket"][0] == [500, None]


def test_tprime_difference_from_control_has_an_interval_from_the_seeds() -> None:
    from privdistill.audit.tprime import tprime_difference

    rng = np.random.default_rng(0)
    levels = [10, 100, 200, 300, 400]
    # fingerprinted: reproduced by ~90% of seeds up to 300, control: up to 100 only
    fp = {t: rng.random(16) < (0.9 if t <= 300 else 0.1) for t in levels}
    ctrl = {t: rng.random(16) < (0.9 if t <= 100 else 0.1) for t in levels}
    d = tprime_difference(fp, ctrl, n_boot=500)
    assert d["difference"] == 200 and d["ci95"][0] > 0  # the interval excludes "same as control"
    same = tprime_difference(ctrl, ctrl, n_boot=500)
    assert same["difference"] == 0 and same["ci95"][0] <= 0 <= same["ci95"][1]
    # 8 of 16 is not a majority: a coin-flip level gives a wide interval, not a confident difference
    coin = {t: np.arange(16) % 2 == 0 if t == 200 else np.ones(16, bool) for t in levels}
    assert tprime_difference(coin, ctrl, n_boot=500)["ci95"][1] >= 300


def test_plant_with_doses_repeats_each_fingerprinted_image() -> None:
    train = with_visits(_small("train", 0, 12), visits=2, seed=0)
    planted = plant(train, 3, seed=1, doses=(1, 2, 4))
    assert planted.doses == [1, 2, 4] and len(planted.data) == len(train) + 1 + 3
    for i, d in zip(planted.indices, planted.doses, strict=True):
        same = (planted.data.images == planted.data.images[i]).reshape(len(planted.data), -1).all(1)
        assert same.sum() == d and len(set(planted.data.patient_ids[same])) == 1
    with pytest.raises(DataError, match="positive"):
        plant(train, 2, seed=0, doses=(0,))


def test_probability_bound_says_what_it_would_take() -> None:
    from privdistill.audit.fingerprint_audit import _probability_bound
    from privdistill.audit.tprime import samples_needed

    b = _probability_bound(0, 201, None)
    assert b["teacher_upper95"] == pytest.approx(1 - 0.025 ** (1 / 201), rel=1e-6)  # "0 of 201" is <= 1.8%
    assert b["paper_bound"] is None and str(samples_needed(1e-3)) in b["paper_bound_needs"]
    assert 1 - 0.025 ** (1 / samples_needed(1e-3)) <= 1e-3 < 1 - 0.025 ** (1 / (samples_needed(1e-3) - 1))


# ----------------------------------------------------------------------------- detector
def test_detector_separates_held_out_fingerprinted_and_clean_images(one_thread) -> None:
    fps = make_fingerprints(4, height=16, width=16, seed=1)
    det = train_detector(_small("train", 0, 300), fps, steps=250, seed=0)
    acc = detector_accuracy(det, _small("t10k", 0, 200), fps, seed=0)  # images the detector never saw
    assert acc["n"] == 400
    assert acc["true_positive_rate"] >= 0.95 and acc["true_negative_rate"] >= 0.95


# ----------------------------------------------------------------------------- t' on real tiny teachers
def _teacher(data: ImageSet) -> DiffusionModel:
    model = DiffusionModel.from_config(ModelConfig(block_out_channels=[16, 32], norm_num_groups=8), resolution=16,
                                       channels=1, class_names=["item"], seed=0)
    Trainer(model, data, TrainConfig(steps=400, batch_size=16, learning_rate=2e-3, warmup_steps=10, ema_decay=0.9,
                                     log_every=200), seed=0).fit()
    return model


@pytest.mark.slow  # two 400-step teachers and a 16-seed t' bisection each: 480 s on a loaded core
def test_tprime_is_larger_for_a_teacher_that_saw_the_fingerprinted_image_many_times(one_thread) -> None:
    # Prepare: 48 images; image 0 carries a fingerprint. Teacher "once" sees it once, teacher "many"
    # sees 48 extra copies of it (half its data).
    base = _small("train", 0, 48)
    fp = make_fingerprints(1, height=16, width=16, seed=0)[0]
    base[0] = fp.apply(base[:1])[0]
    once = ImageSet(images=base, labels=np.zeros(48, np.int64), class_names=["item"])
    many_imgs = np.concatenate([base, np.repeat(base[:1], 48, 0)])
    many = ImageSet(images=many_imgs, labels=np.zeros(96, np.int64), class_names=["item"])
    det = train_detector(_small("train", 100, 300), [fp], steps=250, seed=0)
    target = once.subset([0])

    # Execute
    t_once = model_tprime(_teacher(once), target, det.detect, seeds=16, full_steps=20, tol=25)
    t_many = model_tprime(_teacher(many), target, det.detect, seeds=16, full_steps=20, tol=25)

    # Assert
    assert t_many["t_prime"][0] > t_once["t_prime"][0], (t_once["levels"], t_many["levels"])
    assert t_many["t_prime"][0] >= 450


# ----------------------------------------------------------------------------- the filter on fingerprinted copies
def test_the_filter_drops_every_planted_exact_duplicate() -> None:
    train = with_visits(_small("train", 0, 40), visits=2, seed=0)
    planted = plant(train, 6, seed=0)
    copies = ImageSet(images=planted.images.copy())
    emb = _pixel_embed(planted.data.images)
    result = filter_synthetic(copies, planted.data, embed=_pixel_embed, threshold=0.999, cfg=FilterConfig(),
                              real_embeddings=emb)
    assert len(result.dropped) == 6 and len(result.kept) == 0
    assert result.pixel_match.all()


def test_survivors_are_listed_and_make_the_audit_fail(tmp_path: Path) -> None:
    train = with_visits(_small("train", 0, 20), visits=2, seed=0)
    planted = plant(train, 2, seed=0)
    fresh = _small("t10k", 0, 3)
    samples = ImageSet(images=np.concatenate([planted.images, fresh]))  # 2 copies + 3 unrelated images
    off = FilterConfig(enabled=False)  # a filter that keeps everything
    result = filter_synthetic(samples, planted.data, embed=_pixel_embed, threshold=0.999, cfg=off)
    carrier = np.array([True, True, False, False, False])

    kept = survivors(carrier, result)

    assert kept.tolist() == [0, 1]
    good_detector = {"heldout": {"true_positive_rate": 0.97}}
    report = {"filter": {"survivors": kept.tolist(), "fingerprinted_samples": 2, "exact_copies_recall": 1.0},
              "detector": good_detector}
    report["failures"] = audit_failures(report)
    with pytest.raises(PrivacyPolicyError, match=r"2 of 2 fingerprinted free samples survived.*\[0, 1\]") as err:
        raise_if_survivors(report, tmp_path)
    assert err.value.exit_code == 4
    clean = {"filter": {"survivors": [], "fingerprinted_samples": 3, "exact_copies_recall": 1.0},
             "detector": good_detector}
    assert audit_failures(clean) == []


def test_no_carrier_found_is_not_a_pass_when_the_detector_is_weak_or_exact_copies_were_kept() -> None:
    weak = {"filter": {"survivors": [], "fingerprinted_samples": 0, "exact_copies_recall": 1.0},
            "detector": {"heldout": {"true_positive_rate": 0.4}}}
    kept_copy = {"filter": {"survivors": [], "fingerprinted_samples": 0, "exact_copies_recall": 0.75},
                 "detector": {"heldout": {"true_positive_rate": 1.0}}}

    weak_failures, copy_failures = audit_failures(weak), audit_failures(kept_copy)

    assert len(weak_failures) == 1 and "detector finds only 0.400" in weak_failures[0]
    assert len(copy_failures) == 1 and "kept exact copies" in copy_failures[0] and "0.750" in copy_failures[0]


# ----------------------------------------------------------------------------- the command
@pytest.mark.slow  # the whole audit on the tiny config: ingest, re-id, a 150-step teacher, detector, t', samples,
# and a 150-step student on the kept set (> 10 min on one loaded core)
@pytest.mark.timeout(1800)
def test_audit_command_on_the_tiny_config_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "audit-out"
    cmd = [sys.executable, "-m", "privdistill.cli", "--log-format", "json", "audit", str(ROOT / "examples/tiny.yaml"),
           "--fingerprints", "4", "--workdir", str(tmp_path / "w"), "--out", str(out), "--steps", "150",
           "--samples", "60", "--seeds", "16", "--doses", "1,2", "--student-steps", "150"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1700, cwd=ROOT,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    report = json.loads((out / "report.json").read_text())

    # the verdict is the one audit_failures gives on the written numbers, and the exit code follows it
    assert report["failures"] == audit_failures(report) and report["passed"] == (not report["failures"])
    assert proc.returncode == (0 if report["passed"] else 4), proc.stderr[-2000:]
    assert [f["dose"] for f in report["fingerprints"]] == [1, 2, 1, 2]
    assert report["settings"]["teacher_steps"] == 150 and report["free_samples"]["n"] >= 60
    assert report["detector"]["heldout"]["accuracy"] >= 0.95
    # each t' is the last evaluated level before the first level a majority of the 16 seeds failed
    t_max = report["settings"]["t_prime_search"]["t_max"]
    for f in report["fingerprints"]:
        levels = sorted((int(t), k, n) for t, (k, n) in f["reproduced_by_level"].items())
        assert all(n == 16 for _, _, n in levels)
        below = [(t, k) for t, k, _ in levels if t <= f["t_prime"]]
        assert all(k > 8 for _, k in below)
        above = [(t, k) for t, k, _ in levels if t > f["t_prime"]]
        assert f["t_prime"] == t_max or above[0][1] <= 8
        assert np.isfinite(f["t_prime_minus_control_ci95"]).all()
    st = report["student"]
    assert st["train_steps"] == 150 and st["n_samples"] >= 60 and 0 < st["n_kept"] <= report["free_samples"]["n"]
    assert st["carrying"]["n"] == st["n_samples"] and st["unmarked_baseline"]["n"] > 0
    assert len(st["t_prime"]["t_prime"]) == 4 and "student_t_prime" in report["fingerprints"][0]
    assert report["filter"]["exact_copies_recall"] == 1.0
    md = (out / "report.md").read_text()
    assert "Fingerprint audit: tiny" in md and "## Through the student" in md
    assert (out / "fingerprinted_training.png").is_file()


def test_student_carriers_above_the_unmarked_baseline_fail_the_audit() -> None:
    from privdistill.audit.stats import rate_with_interval

    base = {"filter": {"survivors": [], "fingerprinted_samples": 0, "exact_copies_recall": 1.0},
            "detector": {"heldout": {"true_positive_rate": 1.0}}}
    st = {"carrying": rate_with_interval(12, 300), "unmarked_baseline": rate_with_interval(2, 200),
          "above_baseline": True, "above_baseline_p_value": 0.02}
    failures = audit_failures({**base, "student": st})
    assert len(failures) == 1 and failures[0].startswith("fingerprints reached the student: 12 of 300")
    assert audit_failures({**base, "student": {**st, "above_baseline": False}}) == []
