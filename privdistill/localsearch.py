"""Exact local-patch copy search at scale: the local detector's decision through one k-d tree per patch position
instead of a matrix product of every query patch with every training patch.

The local detector (`privdistill.filter.GalleryScorer.local`) scores an image by the best patch match: the max over
patch positions ``p`` whose centred energy ``E(q_p)`` reaches the noise floor, and over training images ``g``, of
``-|q_p - g_p|^2 / E(q_p)``; an image is dropped when that score is strictly above the calibrated threshold ``thr``
(always <= 0 in practice: scores are <= 0). With ``t = -thr`` that is a range query per position with a radius of
the query's own: is some training patch at the same position within ``sqrt(t E(q_p))`` of ``q_p``?

Per position, a k-d tree over the training images' patches (``scipy.spatial.cKDTree``, float64) answers it
exactly: the query patches are sorted by energy and taken in groups, each group searched for its nearest training
patch with the group's largest radius (times a float slack) as the tree's distance bound, then each nearest patch
is checked exactly against the query's own radius. The nearest patch is the one with the smallest distance, so if
any training patch is within a query's radius the nearest one is, and the tree's bound only prunes patches that
are farther than it. An image already dropped at an earlier position is not searched again.

Decisions equal the exhaustive detector's up to float rounding: it forms ``|q|^2 - 2 q.g + |g|^2`` in float32,
this search takes ``|q - g|^2`` in float64, so only a score within about 1e-6 of the threshold can be read on
different sides of it. A threshold ``>= 0`` drops nothing (no score is above it) and needs no search."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree

GROUP = 2048  # query patches sharing one distance bound (sorted by energy, so their radii are close)
SLACK = 1e-6  # relative slack on the tree's distance bound: it never prunes a patch at the radius


@dataclass
class LocalResult:
    """Per query image: whether some structured patch matches a training patch within the threshold; how many
    (query patch, tree search) pairs ran and how many nearest training patches were within their group's bound."""

    within: np.ndarray  # bool [N]
    searched: int
    candidates: int


def patches(images: np.ndarray, y: int, x: int, p: int) -> np.ndarray:
    """[N, c*p*p] float32: each image's ``p`` x ``p`` patch at (y, x), channels first."""
    return np.ascontiguousarray(images[:, :, y : y + p, x : x + p], np.float32).reshape(len(images), -1)


def centred_energy(q: np.ndarray) -> np.ndarray:
    """[N] float32: sum of squared deviations from each patch's mean, computed as the exhaustive detector does."""
    t = torch.from_numpy(q)
    return ((t - t.mean(1, keepdim=True)) ** 2).sum(1).numpy()


def local_within(query: np.ndarray, gallery: np.ndarray, patch: int, threshold: float, floor: float, *,
                 workers: int = 1) -> LocalResult:
    """The local detector's decision at ``threshold`` for NCHW ``query`` against NCHW ``gallery`` (same shape):
    True where some patch position with energy >= ``floor`` has a training patch with -d^2 / energy > threshold."""
    n, m = len(query), len(gallery)
    within = np.zeros(n, bool)
    if n == 0 or m == 0 or not threshold < 0:  # scores are <= 0: none is above a threshold >= 0 (or NaN)
        return LocalResult(within, 0, 0)
    h, w = query.shape[-2:]
    t = -float(threshold)
    searched = candidates = 0
    for y in range(h - patch + 1):
        for x in range(w - patch + 1):
            q = patches(query, y, x, patch)
            energy = centred_energy(q)
            active = np.flatnonzero((energy >= floor) & ~within)
            if len(active) == 0:
                continue
            if not np.isfinite(t):  # threshold -inf: any structured patch passes
                within[active] = True
                continue
            r2 = t * energy[active].astype(np.float64)
            for idx, d2, r2_found, n_searched in _nearest_within(q, gallery, y, x, patch, active, r2, workers):
                searched += n_searched
                candidates += len(idx)
                within[idx[d2 < r2_found]] = True
    return LocalResult(within, searched, candidates)


def _nearest_within(q: np.ndarray, gallery: np.ndarray, y: int, x: int, patch: int, active: np.ndarray,
                    r2: np.ndarray, workers: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    """For the query patches ``q[active]`` at position (y, x), each with its squared radius ``r2``: the nearest
    training patch at that position when it lies within the radius (plus slack), in groups of ``GROUP`` queries
    sorted by radius (one tree bound per group). Yields (query indices found, their exact squared distances, their
    squared radii, queries searched in the group); a patch nearer than its radius is never missed."""
    order = np.argsort(r2, kind="stable")
    active, r2 = active[order], r2[order]
    g = patches(gallery, y, x, patch).astype(np.float64)
    tree = cKDTree(g, balanced_tree=False, compact_nodes=False)
    qa = q[active].astype(np.float64)
    for s in range(0, len(active), GROUP):
        bound = float(np.sqrt(r2[min(s + GROUP, len(active)) - 1] * (1 + SLACK))) * (1 + SLACK) + 1e-12
        d, i = tree.query(qa[s : s + GROUP], distance_upper_bound=bound, workers=workers)
        rows = np.flatnonzero(np.isfinite(d))
        d2 = ((qa[s + rows] - g[i[rows]]) ** 2).sum(1)
        yield active[s + rows], d2, r2[s + rows], len(d)


BOOTSTRAP = 1024  # training images whose exact best patch match starts each query's bound in `best_scores`


@torch.no_grad()
def best_scores(query: np.ndarray, gallery: np.ndarray, patch: int, floor: float, *, workers: int = 1,
                bootstrap: int = BOOTSTRAP) -> np.ndarray:
    """Every query's exact local score (float64, ``|q - g|^2`` taken directly; -inf without a structured patch),
    by bounded tree searches: a first bound is the best match among the first ``bootstrap`` training images (one
    small matrix product per position; each pair's distance then taken exactly), and at each position only a
    training patch scoring above the query's best so far can lie within the tree's bound ``sqrt(-best * E)``,
    so the nearest one within it (if any) is the position's best and every other is skipped."""
    n, m = len(query), len(gallery)
    best = np.full(n, -np.inf)
    if n == 0 or m == 0:
        return best
    h, w = query.shape[-2:]
    positions = [(y, x) for y in range(h - patch + 1) for x in range(w - patch + 1)]
    sub = gallery[: min(bootstrap, m)]
    for y, x in positions:  # bootstrap: exact scores of the best float32 match among ``sub``
        q, g = patches(query, y, x, patch), patches(sub, y, x, patch)
        energy = centred_energy(q)
        rows = np.flatnonzero(energy >= floor)
        if len(rows) == 0:
            continue
        qt, gt = torch.from_numpy(q[rows]), torch.from_numpy(g)
        j = ((gt * gt).sum(1) - 2 * qt @ gt.T).argmin(1).numpy()
        d2 = ((q[rows].astype(np.float64) - g[j].astype(np.float64)) ** 2).sum(1)
        best[rows] = np.maximum(best[rows], -d2 / np.maximum(energy[rows].astype(np.float64), floor))
    for y, x in positions:
        q = patches(query, y, x, patch)
        energy = np.maximum(centred_energy(q).astype(np.float64), floor)
        active = np.flatnonzero((centred_energy(q) >= floor) & (best < 0))
        if len(active) == 0:
            continue
        r2 = -best[active] * energy[active]  # a training patch closer than this scores above the best so far
        for idx, d2, _, _ in _nearest_within(q, gallery, y, x, patch, active, r2, workers):
            best[idx] = np.maximum(best[idx], -d2 / energy[idx])
    return best
