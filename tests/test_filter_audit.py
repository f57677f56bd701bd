"""The filter's calibration and audit: conformal thresholds hold their fresh-drop level, the audit reports a
fresh-drop rate with its exact interval on images the calibration never saw, and per-kind recall with n and
a patient-level interval, listing the kinds with too few cases. Real Fashion-MNIST images; a centred-pixel
stand-in embedding so the test needs no re-id training."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _fixtures import FMNIST, fashion, with_visits
from scipy.stats import binomtest

from privdistill.config import FilterConfig
from privdistill.data.types import ImageSet
from privdistill.errors import DataError
from privdistill.filter import GalleryScorer, calibrate_filter, conformal_threshold
from privdistill.filter_audit import audit_filter, patient_bootstrap, plant_copies

pytestmark = pytest.mark.usefixtures("one_thread")


def _embed(images: np.ndarray) -> np.ndarray:
    flat = images.reshape(len(images), -1).astype(np.float32)
    flat = flat - flat.mean(1, keepdims=True)
    return flat / np.linalg.norm(flat, axis=1, keepdims=True).clip(1e-8)


def _small(x: np.ndarray) -> np.ndarray:  # 28 -> 14 px: keeps the local detector's scan quick
    return x.reshape(len(x), 1, 14, 2, 14, 2).mean(axis=(3, 5)).astype(np.float32)


def test_conformal_threshold_is_the_rank_ceil_n_plus_1_times_1_minus_alpha() -> None:
    null = np.arange(1, 20, dtype=float)[::-1]  # 19 scores
    assert conformal_threshold(null, 0.1) == 18.0  # ceil(20 * 0.9) = 18th smallest
    assert conformal_threshold(null, 0.05) == 19.0  # ceil(20 * 0.95) = 19th
    with pytest.raises(DataError, match=r"too few for a fresh-drop level 0.04.*needs >= 24"):
        conformal_threshold(null, 0.04)


def test_conformal_threshold_holds_its_level_on_exchangeable_scores() -> None:
    # 4000 independent trials: 99 null scores and one fresh score from the same distribution. The guarantee
    # is P(fresh > threshold) <= alpha, exactly 5/100 here; 0.035..0.065 is +-3.2 binomial SDs around 0.05,
    # so a threshold that is too loose (pair-calibrated) or needlessly strict fails.
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4000, 100))
    drops = [s[99] > conformal_threshold(s[:99], 0.05) for s in scores]
    assert 0.035 <= float(np.mean(drops)) <= 0.065


def test_patient_bootstrap_resamples_patients() -> None:
    hits = np.array([1, 1, 1, 1, 0, 0], bool)
    assert patient_bootstrap(hits, np.array(list("aabbcc")), seed=0) == [pytest.approx(0.0), pytest.approx(1.0)]
    assert patient_bootstrap(np.ones(6, bool), np.array(list("aabbcc")), seed=0) == [1.0, 1.0]
    assert patient_bootstrap(hits, np.array(["a"] * 6), seed=0) == [pytest.approx(4 / 6)] * 2  # one patient: no spread
    assert patient_bootstrap(np.zeros(0, bool), np.zeros(0, str), seed=0) is None


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST not installed")
def test_audit_reports_fresh_drop_with_exact_interval_and_recall_per_kind() -> None:
    # Prepare: 60 training patients x 2 visits; 200 held-out images of other patients calibrate, 200 more audit
    train = with_visits(_small(fashion("train", 0, 60)), visits=2, seed=0)
    held = _small(fashion("t10k", 0, 400))
    cfg = FilterConfig()  # library defaults: alpha 0.05 over the reid, pixel and local detectors
    scorer = GalleryScorer(train, _embed, local_patch=cfg.local_patch)
    cal = calibrate_filter(scorer, held[:200], cfg)
    fresh = ImageSet(held[200:], patient_ids=np.array([f"f{i}" for i in range(200)]))

    # Execute
    out = audit_filter(train, fresh, scorer=scorer, calibration=cal, seed=0)
    whole = calibrate_filter(scorer, held[:200], FilterConfig(detectors=["reid", "pixel"]))
    without_local = audit_filter(train, fresh, scorer=scorer, calibration=whole, seed=0)

    # Assert: the calibration
    assert cal.alpha == 0.05 and cal.n_null == 200 and cal.detectors == ("reid", "pixel", "local")
    assert cal.alpha_per_detector == pytest.approx(0.05 / 3)
    # fresh images of new patients: at alpha 0.05, P(Binomial(200, 0.05) > 20) < 0.001
    k, n = out["fresh_dropped"], out["fresh_n"]
    assert n == 200 and out["fresh_drop_rate"] == k / n <= 0.10
    ci = binomtest(k, n).proportion_ci(method="exact")
    assert out["fresh_drop_ci"] == [pytest.approx(ci.low), pytest.approx(ci.high)]
    # recall: value, 95% interval and n for every kind; exact copies are always caught
    rec = out["recall"]
    assert rec["exact"] == {"value": 1.0, "ci": [1.0, 1.0], "n": 50, "n_patients": rec["exact"]["n_patients"]}
    for kind, r in rec.items():
        if r["n"]:
            assert r["ci"][0] <= r["value"] <= r["ci"][1], kind
    assert rec["repeat_visit_lovo"]["n"] == 100 and rec["repeat_visit_lovo"]["n_patients"] == 60
    # a small patch of a training image on a fresh image: the local detector is what catches it
    assert rec["local_mark"]["n"] == 50
    assert rec["local_mark"]["value"] >= 0.9
    assert without_local["recall"]["local_mark"]["value"] <= 0.5
    # the training set has no labels: no homogeneous class to copy from, and the report says so
    assert rec["homogeneous_class"]["n"] == 0 and "homogeneous_class" in out["too_few"]
    assert "exact" not in out["too_few"]
    json.dumps(out)  # aggregate, JSON-safe


def test_plant_copies_kinds_and_sizes() -> None:
    rng = np.random.default_rng(2)
    imgs = np.clip(rng.normal(0, 0.6, (10, 1, 12, 12)), -1, 1).astype(np.float32)
    copies = plant_copies(ImageSet(imgs), 4, seed=0)
    assert set(copies) == {"exact", "shift_1px", "noise_0.1", "contrast_0.9", "blur_0.5-1px", "correlated_noise"}
    assert all(v.shape == (4, 1, 12, 12) and v.min() >= -1 and v.max() <= 1 for v in copies.values())
    # the correlated noise is smooth: neighbouring pixels of the added noise correlate strongly
    diff = copies["correlated_noise"] - copies["exact"]
    a, b = diff[..., :-1].ravel(), diff[..., 1:].ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.5
