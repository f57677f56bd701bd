"""Uncertainty of audit numbers: exact binomial intervals, TPR at a fixed FPR, and a cluster (patient-level)
bootstrap for any two-sample statistic. Every function returns its n beside the number."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.stats import binomtest

from privdistill.audit.roc import roc_auc
from privdistill.errors import DataError
from privdistill.seeds import derive_seed

N_BOOT = 2000  # bootstrap resamples: the percentile interval's ends move by < 0.01 AUC between seeds at n >= 30


def clopper_pearson(k: int, n: int, *, level: float = 0.95) -> list[float] | None:
    """Exact two-sided binomial interval for k successes of n (None when n == 0)."""
    if n <= 0:
        return None
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="exact")
    return [float(ci.low), float(ci.high)]


def rate_with_interval(k: int, n: int) -> dict[str, Any]:
    """{rate, k, n, ci95} of a proportion (ci95 exact, Clopper-Pearson)."""
    return {"rate": (k / n) if n else None, "k": int(k), "n": int(n), "ci95": clopper_pearson(k, n)}


def min_negatives_for(fpr: float) -> int:
    """Fewest negatives for which an FPR of ``fpr`` is a reachable operating point (one false positive is 1/n)."""
    return int(math.ceil(1.0 / fpr - 1e-9))


def tpr_at_fpr(positive: np.ndarray, negative: np.ndarray, fpr: float) -> float:
    """Largest TPR over thresholds whose FPR is <= ``fpr`` (a sample is called positive when score > threshold)."""
    pos = np.asarray(positive, np.float64).ravel()
    neg = np.sort(np.asarray(negative, np.float64).ravel())[::-1]
    allowed = int(math.floor(fpr * len(neg) + 1e-9))  # negatives that may score above the threshold
    if allowed >= len(neg):
        return 1.0
    return float((pos > neg[allowed]).mean())


def _groups(groups: np.ndarray | None, n: int) -> list[np.ndarray]:
    if groups is None:
        return [np.array([i]) for i in range(n)]
    _, inv = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    order = np.argsort(inv, kind="stable")
    return np.split(order, np.cumsum(np.bincount(inv))[:-1])


def cluster_bootstrap(
    stat: Callable[[np.ndarray, np.ndarray], float], positive: np.ndarray, negative: np.ndarray, *,
    positive_groups: np.ndarray | None = None, negative_groups: np.ndarray | None = None,
    n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95,
) -> list[float]:
    """Percentile interval of ``stat(positive, negative)`` resampling whole clusters (patients) with
    replacement, separately within positives and negatives: images of one patient move together, so
    correlated visits do not pass for independent evidence (Obuchowski 1997; a patient-level bootstrap)."""
    pos, neg = np.asarray(positive, np.float64).ravel(), np.asarray(negative, np.float64).ravel()
    gp, gn = _groups(positive_groups, len(pos)), _groups(negative_groups, len(neg))
    if len(gp) < 2 or len(gn) < 2:
        raise DataError(f"a bootstrap interval needs at least 2 clusters per side (got {len(gp)} and {len(gn)})")
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for b in range(n_boot):
        ip = np.concatenate([gp[i] for i in rng.integers(0, len(gp), len(gp))])
        ineg = np.concatenate([gn[i] for i in rng.integers(0, len(gn), len(gn))])
        out[b] = stat(pos[ip], neg[ineg])
    a = (1 - level) / 2
    return [float(np.quantile(out, a)), float(np.quantile(out, 1 - a))]


def per_cluster_mean(scores: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """One score per cluster (the mean of its images' scores); each image its own cluster without groups."""
    s = np.asarray(scores, np.float64).ravel()
    return np.array([s[g].mean() for g in _groups(groups, len(s))])


def attack_summary(member_scores: np.ndarray, nonmember_scores: np.ndarray, *, member_groups: np.ndarray | None,
                   nonmember_groups: np.ndarray | None, fprs: tuple[float, ...] = (0.01, 0.001),
                   seed: int = 0, n_boot: int = N_BOOT) -> dict[str, Any]:
    """AUC and TPR at low FPR of a membership score, each with its n and a patient-level 95% interval.

    The headline ``auc`` is computed on per-patient scores (mean over a patient's images): the patient
    is the unit of privacy and of independence. ``image_auc`` is over images, with an interval that
    still resamples patients. TPR at an FPR below 1/(non-member patients) is not reported (it cannot
    be measured), and the result says how many non-member patients it would need."""
    pm, pn = per_cluster_mean(member_scores, member_groups), per_cluster_mean(nonmember_scores, nonmember_groups)
    unit = "patient" if member_groups is not None and nonmember_groups is not None else "image"
    out: dict[str, Any] = {
        "unit": unit,
        "auc": roc_auc(pm, pn),
        "auc_ci95": cluster_bootstrap(roc_auc, pm, pn, n_boot=n_boot, seed=seed),
        "n_member_units": len(pm),
        "n_nonmember_units": len(pn),
        "image_auc": roc_auc(member_scores, nonmember_scores),
        "image_auc_ci95": cluster_bootstrap(roc_auc, member_scores, nonmember_scores, positive_groups=member_groups,
                                            negative_groups=nonmember_groups, n_boot=n_boot, seed=derive_seed(seed, "auc-bootstrap")),
        "interval": f"95% percentile bootstrap over {unit}s ({n_boot} resamples, members and non-members "
                    "resampled separately)",
    }
    tprs: dict[str, Any] = {}
    for f in fprs:
        need = min_negatives_for(f)
        if len(pn) < need:
            tprs[f"{f:g}"] = {"tpr": None, "n_nonmember_units": len(pn),
                              "reason": f"FPR {f:g} needs at least {need} non-member {unit}s; have {len(pn)}"}
            continue
        tprs[f"{f:g}"] = {
            "tpr": tpr_at_fpr(pm, pn, f), "n_member_units": len(pm), "n_nonmember_units": len(pn),
            "ci95": cluster_bootstrap(functools.partial(tpr_at_fpr, fpr=f), pm, pn, n_boot=n_boot,
                                      seed=derive_seed(seed, "tpr-bootstrap")),
        }
    out["tpr_at_fpr"] = tprs
    return out
