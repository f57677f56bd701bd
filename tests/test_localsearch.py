"""The local detector's tree search takes the exhaustive detector's decisions, at every threshold between its scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn.functional as F
from torch import from_numpy

from privdistill import localsearch
from privdistill.data.types import ImageSet
from privdistill.filter import GalleryScorer

pytestmark = pytest.mark.usefixtures("one_thread")
SIDE, PATCH = 14, 4


def textures(n: int, seed: int) -> np.ndarray:
    """Smooth random images in [-1, 1] with flat (structureless) margins, like objects on a background."""
    t = from_numpy(np.random.default_rng(seed).normal(0, 1, (n, 1, SIDE, SIDE)).astype(np.float32))
    x = np.clip(F.avg_pool2d(F.pad(t, (1, 1, 1, 1), mode="replicate"), 3, 1).numpy() * 1.5, -1, 1)
    x[:, :, :2], x[:, :, :, -2:] = -1, -1
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def world() -> dict:
    """300 training images, 20 of them carrying a high-contrast 4x4 mark (a burned-in label: random +-1); 120
    queries: 100 fresh, 10 with one of those marks copied at the same place, 10 with it plus noise (sd 0.005)."""
    gallery, query = textures(300, 0), textures(120, 1)
    rng = np.random.default_rng(2)
    src = rng.choice(len(gallery), 20, replace=False)
    pos = rng.integers(2, SIDE - PATCH - 2, (20, 2))
    for k, (j, (y, x)) in enumerate(zip(src, pos, strict=True)):
        gallery[j, :, y : y + PATCH, x : x + PATCH] = rng.choice([-1.0, 1.0], (1, PATCH, PATCH))
        mark = gallery[j, :, y : y + PATCH, x : x + PATCH].copy()
        if k >= 10:
            mark = mark + rng.normal(0, 0.005, mark.shape).astype(np.float32)
        query[100 + k, :, y : y + PATCH, x : x + PATCH] = mark
    scorer = GalleryScorer(ImageSet(gallery), lambda a: np.zeros((len(a), 1), np.float32),
                           real_embeddings=np.zeros((len(gallery), 1)), local_patch=PATCH)
    return {"gallery": gallery, "query": query, "src": src, "scorer": scorer, "scores": scorer.local(query),
            "exact": exact_scores(query, gallery, scorer.local_floor)}


def exact_scores(query: np.ndarray, gallery: np.ndarray, floor: float) -> np.ndarray:
    """The local detector's scores by brute force in float64 with |q - g|^2 taken directly (no float32 expansion)."""
    best = np.full(len(query), -np.inf)
    for y in range(SIDE - PATCH + 1):
        for x in range(SIDE - PATCH + 1):
            q, g = localsearch.patches(query, y, x, PATCH), localsearch.patches(gallery, y, x, PATCH)
            energy = localsearch.centred_energy(q).astype(np.float64)
            d2 = ((q.astype(np.float64)[:, None] - g.astype(np.float64)[None]) ** 2).sum(-1).min(1)
            best = np.maximum(best, np.where(energy >= floor, -d2 / np.maximum(energy, floor), -np.inf))
    return best


def tree(world: dict, threshold: float) -> np.ndarray:
    s = world["scorer"]
    return localsearch.local_within(world["query"], world["gallery"], PATCH, threshold, s.local_floor).within


def test_decisions_equal_exhaustive_at_every_gap_between_scores(world: dict) -> None:
    scores = np.sort(np.unique(world["exact"][np.isfinite(world["exact"])]))
    assert len(scores) >= 100
    # thresholds half-way between consecutive scores (the tightest place a prefilter could miss one), plus ends
    mids = (scores[1:] + scores[:-1]) / 2
    thresholds = np.concatenate([mids[:: max(1, len(mids) // 40)], mids[-12:], [scores[0] - 1.0, -np.inf, 0.0]])
    for thr in thresholds:
        assert np.array_equal(tree(world, float(thr)), world["exact"] > thr), f"threshold {thr}"


def test_float32_exhaustive_scores_differ_only_by_rounding(world: dict) -> None:
    """The filter's exhaustive scores (float32 |q|^2 - 2q.g + |g|^2) are the exact ones up to rounding; away from
    that rounding the two searches decide alike."""
    finite = np.isfinite(world["exact"])
    assert np.array_equal(finite, np.isfinite(world["scores"]))
    err = np.abs(world["scores"][finite] - world["exact"][finite])
    assert err.max() < 1e-4  # float32 rounding of |q|^2 ~ 16 over patch energies >= 0.16
    scores = np.sort(world["scores"][finite])
    for thr in np.quantile(scores, [0.05, 0.5, 0.9, 0.99]):
        if np.abs(scores - thr).min() > 1e-4:
            assert np.array_equal(tree(world, float(thr)), world["scores"] > thr)


def test_planted_marks_are_found_and_fresh_images_kept(world: dict) -> None:
    scores = world["exact"]
    thr = float(np.quantile(scores[:100], 0.95))  # about 5 of 100 fresh images above it
    within = tree(world, thr)
    assert within[100:].all()  # every mark, exact or noisy, scores near 0
    assert within[:100].sum() == (scores[:100] > thr).sum() <= 5


def test_a_mark_the_whole_image_nearest_neighbour_misses_is_found(world: dict) -> None:
    """Candidate-miss case: a mark's source is not the query's nearest training image as a whole, so a search that
    only checks each query's nearest whole images (or a few shifts of them) would keep it."""
    g, q = world["gallery"].reshape(300, -1), world["query"].reshape(120, -1)
    nearest_whole = ((q[100:, None] - g[None]) ** 2).sum(-1).argmin(1)
    missed = np.flatnonzero(nearest_whole != world["src"])
    assert len(missed) >= 15  # almost every mark sits on an otherwise unrelated image
    within = tree(world, -1e-3)
    assert within[100 + missed[missed < 10]].all()  # the exact marks score 0 > -1e-3


def test_scorer_local_within_uses_the_tree_and_matches(world: dict) -> None:
    s: GalleryScorer = world["scorer"]
    thr = float(np.quantile(world["exact"], 0.9))
    assert np.array_equal(s.local_within(world["query"], thr), world["exact"] > thr)


def test_search_handles_empty_and_nonnegative_thresholds(world: dict) -> None:
    res = localsearch.local_within(world["query"], world["gallery"], PATCH, 0.0, 0.16)
    assert not res.within.any() and res.searched == 0  # scores are <= 0: nothing is strictly above 0
    res = localsearch.local_within(world["query"][:0], world["gallery"], PATCH, -0.1, 0.16)
    assert res.within.shape == (0,)


def test_best_scores_are_the_exact_scores(world: dict) -> None:
    s: GalleryScorer = world["scorer"]
    got = localsearch.best_scores(world["query"], world["gallery"], PATCH, s.local_floor, bootstrap=16)
    assert np.array_equal(got, world["exact"])
