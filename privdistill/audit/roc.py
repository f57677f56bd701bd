"""ROC AUC of a score that should rank positives above negatives (Mann-Whitney U, ties count one half)."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from privdistill.errors import DataError


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative) + 0.5 P(equal).

    Computed from mid-ranks of the pooled scores (exact with ties, O(n log n)); 1.0 when every
    positive scores above every negative, 0.5 for a score that carries no information."""
    pos = np.asarray(positive, dtype=np.float64).ravel()
    neg = np.asarray(negative, dtype=np.float64).ravel()
    if len(pos) == 0 or len(neg) == 0:
        raise DataError(f"ROC AUC needs positives and negatives (got {len(pos)} and {len(neg)})")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise DataError("ROC AUC scores must be finite (a NaN or inf loss means the model diverged)")
    ranks = rankdata(np.concatenate([pos, neg]))  # mid-ranks: tied scores share their average rank
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))
