"""Membership inference: the ROC AUC against known cases, ~0.5 when members and non-members come from one
distribution, high for a model overfit to a few images; the same noise for every image; class balancing."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from privdistill.audit.mia import balanced, comparable_nonmembers, denoising_losses, membership_auc
from privdistill.audit.roc import roc_auc
from privdistill.config import ModelConfig, TrainConfig, VisitsConfig
from privdistill.data.types import ImageSet
from privdistill.errors import DataError
from privdistill.models import DiffusionModel
from privdistill.train import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from _fixtures import fashion


def _small(start: int, n: int) -> ImageSet:
    x = F.interpolate(torch.from_numpy(fashion("train", start, n)), size=16, mode="area").numpy()
    return ImageSet(images=x, labels=np.zeros(n, np.int64), class_names=["item"])


def _model() -> DiffusionModel:
    return DiffusionModel.from_config(ModelConfig(block_out_channels=[16, 32], norm_num_groups=8), resolution=16,
                                      channels=1, class_names=["item"], seed=0)


# ----------------------------------------------------------------------------- ROC AUC
def test_auc_of_a_known_score_split() -> None:
    # pairs (pos > neg): 0.9 beats both, 0.8 both, 0.7 only 0.1 -> 5 of 6
    assert roc_auc([0.9, 0.8, 0.7], [0.1, 0.75]) == pytest.approx(5 / 6)
    assert roc_auc([2, 3], [0, 1]) == 1.0 and roc_auc([0, 1], [2, 3]) == 0.0
    # ties count one half: (1 vs 1) 0.5 + (1 vs 0) 1, twice -> 3/4
    assert roc_auc([1, 1], [1, 0]) == pytest.approx(0.75)
    assert roc_auc([5, 5, 5], [5, 5]) == 0.5


def test_auc_matches_pairwise_counting_with_many_ties() -> None:
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40), rng.integers(0, 4, 30)
    brute = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)])
    assert roc_auc(pos, neg) == pytest.approx(brute, abs=1e-12)


def test_auc_refuses_empty_or_non_finite_scores() -> None:
    with pytest.raises(DataError, match="positives and negatives"):
        roc_auc([], [1.0])
    with pytest.raises(DataError, match="finite"):
        roc_auc([np.nan], [1.0])


def test_auc_is_one_half_for_scores_from_one_distribution() -> None:
    rng = np.random.default_rng(1)
    assert abs(roc_auc(rng.normal(size=4000), rng.normal(size=4000)) - 0.5) < 0.02


# ----------------------------------------------------------------------------- the attack on tiny models
def test_same_noise_for_every_image() -> None:
    # two identical images get identical losses: the noise depends on (level, seed) only, not on the image
    data = _small(0, 3)
    data.images[2] = data.images[0]
    losses = denoising_losses(_model(), data, levels=(0.1, 0.3), seeds=(0, 1))
    assert losses.shape == (3, 4)
    np.testing.assert_array_equal(losses[0], losses[2])
    assert not np.allclose(losses[0], losses[1])


def test_auc_near_one_half_when_neither_set_was_trained_on(one_thread) -> None:
    # a model trained on other images: members and non-members are equally unseen
    model = _model()
    Trainer(model, _small(200, 64), TrainConfig(steps=30, batch_size=16, learning_rate=2e-3, warmup_steps=5,
                                                log_every=60), seed=0).fit()
    out = membership_auc(model, _small(0, 80), _small(100, 80))
    assert out["n_members"] == out["n_nonmembers"] == 80
    assert abs(out["auc"] - 0.5) < 0.12


def test_auc_high_for_a_model_overfit_to_a_few_images(one_thread) -> None:
    members, nonmembers = _small(0, 8), _small(8, 8)
    model = _model()
    Trainer(model, members, TrainConfig(steps=250, batch_size=8, learning_rate=2e-3, warmup_steps=10, ema_decay=0.9,
                                        log_every=250), seed=0).fit()
    out = membership_auc(model, members, nonmembers)
    assert out["auc"] >= 0.9
    assert out["member_loss_mean"] < out["nonmember_loss_mean"]
    assert set(out) >= {"auc", "n_members", "n_nonmembers", "timesteps"}
    assert not any(isinstance(v, (list, np.ndarray)) and len(v) == 8 for v in out.values())  # no per-image scores


# ----------------------------------------------------------------------------- fair comparison
def test_balanced_takes_equal_numbers_per_class() -> None:
    x = np.zeros((10, 1, 4, 4), np.float32)
    a = ImageSet(images=x, labels=np.array([0] * 7 + [1] * 3), class_names=["a", "b"])
    b = ImageSet(images=x[:6], labels=np.array([1] * 4 + [0] * 2), class_names=["b", "a"])  # 4 "a", 2 "b"
    m, n = balanced(a, b, seed=0)
    names_m = sorted(np.asarray(m.class_names)[m.labels].tolist())
    names_n = sorted(np.asarray(n.class_names)[n.labels].tolist())
    assert names_m == names_n == ["a"] * 4 + ["b"] * 2  # a: min(7, 4), b: min(3, 2)


def test_nonmembers_get_the_training_splits_simulated_visit() -> None:
    test = _small(0, 5)
    same = comparable_nonmembers(test, None, seed=0)
    moved = comparable_nonmembers(test, VisitsConfig(count=3, max_shift=1), seed=0)
    assert same is test
    assert len(moved) == 5 and not np.allclose(moved.images, test.images)  # one perturbed visit each


# ----------------------------------------------------------------------------- uncertainty (audit.stats)
def test_tpr_at_fpr_uses_only_thresholds_within_the_fpr() -> None:
    from privdistill.audit.stats import tpr_at_fpr

    neg = np.arange(100, dtype=float)  # 0..99
    pos = np.array([99.5, 98.5, 97.5, 50.0])
    # FPR 1%: one negative (99) may score above the threshold -> threshold 98: 99.5 and 98.5 pass
    assert tpr_at_fpr(pos, neg, 0.01) == pytest.approx(0.5)
    # FPR 0: threshold at the best negative (99): only 99.5 passes
    assert tpr_at_fpr(pos, neg, 0.0) == pytest.approx(0.25)


def test_clopper_pearson_of_zero_events() -> None:
    from privdistill.audit.stats import clopper_pearson

    lo, hi = clopper_pearson(0, 180)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 180), rel=1e-6)  # 2.03%: "0 of 180" is not "0%"


def test_patient_bootstrap_is_wider_than_an_image_bootstrap_for_repeated_visits() -> None:
    from privdistill.audit.roc import roc_auc
    from privdistill.audit.stats import cluster_bootstrap

    # 30 patients x 4 near-identical visits per side, no membership signal
    rng = np.random.default_rng(0)
    pm, pn = np.repeat(rng.normal(size=30), 4), np.repeat(rng.normal(size=30), 4)
    pm, pn = pm + 0.01 * rng.normal(size=120), pn + 0.01 * rng.normal(size=120)
    gm, gn = np.repeat([f"m{i}" for i in range(30)], 4), np.repeat([f"n{i}" for i in range(30)], 4)
    by_image = cluster_bootstrap(roc_auc, pm, pn, n_boot=500)
    by_patient = cluster_bootstrap(roc_auc, pm, pn, positive_groups=gm, negative_groups=gn, n_boot=500)
    assert by_patient[0] < 0.5 < by_patient[1]
    # 4 correlated visits carry about one patient's evidence: the honest interval is ~sqrt(4) = 2x wider
    assert (by_patient[1] - by_patient[0]) > 1.6 * (by_image[1] - by_image[0])


def test_attack_summary_reports_tpr_only_where_the_nonmember_count_allows() -> None:
    from privdistill.audit.stats import attack_summary

    rng = np.random.default_rng(1)
    few = attack_summary(rng.normal(1, 1, 40), rng.normal(0, 1, 40), member_groups=None, nonmember_groups=None,
                         n_boot=200)
    assert few["n_member_units"] == few["n_nonmember_units"] == 40 and few["unit"] == "image"
    assert few["tpr_at_fpr"]["0.01"]["tpr"] is None and "at least 100" in few["tpr_at_fpr"]["0.01"]["reason"]
    lo, hi = few["auc_ci95"]
    assert lo < few["auc"] < hi and lo > 0.5  # a one-sigma shift: AUC ~0.76, interval excludes 0.5
    many = attack_summary(rng.normal(3, 1, 150), rng.normal(0, 1, 150), member_groups=None, nonmember_groups=None,
                          n_boot=200)
    assert many["tpr_at_fpr"]["0.01"]["tpr"] > 0.2 and many["tpr_at_fpr"]["0.01"]["n_nonmember_units"] == 150
    assert many["tpr_at_fpr"]["0.001"]["tpr"] is None  # needs 1000 non-members


# ----------------------------------------------------------------------------- LiRA (audit.lira)
def test_lira_halves_put_every_patient_in_half_the_shadows() -> None:
    from privdistill.audit.lira import shadow_halves

    inside = shadow_halves(31, 6, seed=0)
    assert inside.shape == (6, 31) and (inside.sum(0) == 3).all()
    with pytest.raises(DataError, match="even number"):
        shadow_halves(10, 3, seed=0)


def test_lira_calibration_sees_a_small_shift_hidden_by_per_patient_difficulty() -> None:
    from privdistill.audit.lira import likelihood_ratio, shadow_halves

    # 60 patients whose difficulty varies far more (sd 3) than membership moves the score (+0.5)
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 3, 60)
    inside = shadow_halves(60, 8, seed=1)
    shadow = difficulty + 0.5 * inside + rng.normal(0, 0.1, (8, 60))
    member = np.arange(60) < 30
    target = difficulty + 0.5 * member + rng.normal(0, 0.1, 60)

    online, offline = likelihood_ratio(target, shadow, inside)

    raw = roc_auc(target[member], target[~member])
    assert raw < 0.75  # the plain loss attack barely sees it
    assert roc_auc(online[member], online[~member]) > 0.95 and roc_auc(offline[member], offline[~member]) > 0.95


@pytest.mark.slow  # trains 2 shadow teachers and a target (~2 min on a loaded core)
def test_lira_on_a_tiny_overfit_teacher(one_thread) -> None:
    from privdistill.audit.lira import lira_attack

    members, nonmembers = _small(0, 8), _small(8, 8)
    tcfg = TrainConfig(steps=250, batch_size=8, learning_rate=2e-3, warmup_steps=10, ema_decay=0.9, log_every=250)

    def train(data: ImageSet, seed: int) -> DiffusionModel:
        model = _model()
        Trainer(model, data, tcfg, seed=seed).fit()
        return model

    out = lira_attack(train(members, 0), members, nonmembers, train_shadow=train, n_shadows=2)
    assert out["online"]["n_member_units"] == out["online"]["n_nonmember_units"] == 8
    assert out["online"]["auc"] >= 0.9 and out["online"]["auc_ci95"][0] > 0.5
