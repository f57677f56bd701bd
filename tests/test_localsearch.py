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


def test_window_bound_and_tree_fallback_equal_brute_force(world: dict) -> None:
    """Every path of the search: sum windows with the projected bound (default), the k-d tree for every query
    (windows all "large"), and a mix (windows above 2 patches go to the tree), at several thresholds."""
    s, exact = world["scorer"], world["exact"]
    for thr in (*np.quantile(exact[np.isfinite(exact)], [0.02, 0.3, 0.8]), -1e-3, -1e-9):
        assert thr < 0
        want = exact > thr
        paths = {"window": {}, "tree": {"max_window": 0, "tree_pairs": 0}, "mixed": {"max_window": 2, "tree_pairs": 0}}
        for name, kw in paths.items():
            res = localsearch.local_within(world["query"], world["gallery"], PATCH, float(thr), s.local_floor, **kw)
            assert np.array_equal(res.within, want), f"{name} at {thr}"
            if name == "window":
                assert res.tree_queries == 0 and res.pairs > 0
            if name == "tree":
                assert res.tree_queries > 0 and res.pairs == 0
    thr = float(np.quantile(exact[np.isfinite(exact)], 0.3))
    res = localsearch.local_within(world["query"], world["gallery"], PATCH, thr, s.local_floor, max_window=2,
                                   tree_pairs=0)
    assert res.tree_queries > 0 and res.pairs > 0  # both paths ran at one threshold


def test_a_patch_exactly_at_the_radius_is_not_within_and_one_ulp_inside_is() -> None:
    """Scores are strictly above the threshold: with the largest t where d^2 < t E fails (d^2 == t E when float
    allows) the copy is not a match; one float step larger it is, so no bound (window, projection, tree) may prune
    it. The query is flat but for one pixel (every patch covering it: energy 15/16 exactly in float32); its copy in
    the training set is brighter by 2^-4 everywhere (d^2 = 2^-4 exactly, all of it along the sum direction)."""
    gallery, query = textures(50, 5), np.full((2, 1, SIDE, SIDE), -1.0, np.float32)
    query[0, 0, 8, 8] = 0.0
    gallery[7] = query[0] + 2.0**-4  # off by 2^-4 at every pixel: along (1, ..., 1), where the sum window is tight
    energy = localsearch.centred_energy(localsearch.patches(query[:1], 6, 6, PATCH))[0]
    assert energy == 0.9375
    d2 = 16 * 2.0**-8
    t = d2 / 0.9375
    while d2 < t * 0.9375:
        t = np.nextafter(t, 0.0)
    while not d2 < np.nextafter(t, np.inf) * 0.9375:
        t = np.nextafter(t, np.inf)
    inside = np.nextafter(t, np.inf)  # the smallest t at which the copy matches
    floor = 0.16
    assert np.array_equal(exact_scores(query, gallery, floor) > -t, [False, False])
    assert np.array_equal(exact_scores(query, gallery, floor) > -inside, [True, False])
    for kw in ({}, {"max_window": 0, "tree_pairs": 0}):
        assert not localsearch.local_within(query, gallery, PATCH, -t, floor, **kw).within.any()
        assert localsearch.local_within(query, gallery, PATCH, -inside, floor, **kw).within.tolist() == [True, False]


def test_zero_and_subnormal_radii(world: dict) -> None:
    """Radius 0 (threshold -0.0: nothing is strictly above it) and the smallest radii: only exact copies count."""
    s, exact = world["scorer"], world["exact"]
    assert not localsearch.local_within(world["query"], world["gallery"], PATCH, -0.0, s.local_floor).within.any()
    for thr in (-5e-324, -1e-300, -1e-30):
        for kw in ({}, {"max_window": 0, "tree_pairs": 0}):
            got = localsearch.local_within(world["query"], world["gallery"], PATCH, thr, s.local_floor, **kw).within
            assert np.array_equal(got, exact > thr), (thr, kw)
    assert (exact[100:110] == 0).all()  # the 10 exact marks: d^2 = 0 at their position
    got = localsearch.local_within(world["query"], world["gallery"], PATCH, -1e-300, s.local_floor).within
    assert got[100:110].all() and not got[110:].any() and not got[:100].any()


def test_energies_of_a_subset_equal_those_of_the_whole_set() -> None:
    """The search recomputes the detector's float32 energies for candidate rows only: bit-identical to the
    energies of all rows at once (so the set of structured patches is the exhaustive detector's)."""
    q = np.random.default_rng(3).normal(0, 0.6, (5000, 16)).astype(np.float32)
    whole = localsearch.centred_energy(q)
    rng = np.random.default_rng(4)
    for size in (1, 2, 7, 8, 15, 64, 1000, 4999):
        idx = np.sort(rng.choice(len(q), size, replace=False))
        assert np.array_equal(localsearch.centred_energy(q[idx]), whole[idx])
        assert np.array_equal(localsearch.centred_energy(np.ascontiguousarray(q.T[:, idx].T)), whole[idx])


def test_top_score_is_the_rank_th_largest_exact_score(world: dict) -> None:
    s, exact = world["scorer"], world["exact"]
    ranked = np.sort(exact)[::-1]
    for rank in (1, 11, 60):
        for kw in ({}, {"first_level": -1e-12, "factor": 10.0}, {"max_window": 0, "tree_pairs": 0, "bootstrap": 4}):
            got = localsearch.top_score(world["query"], world["gallery"], PATCH, s.local_floor, rank, **kw)
            assert got == ranked[rank - 1], (rank, kw)
    flat = np.concatenate([world["query"][:5], np.full((3, 1, SIDE, SIDE), 0.5, np.float32)])  # 3 without structure
    assert localsearch.top_score(flat, world["gallery"], PATCH, s.local_floor, 5) == np.sort(exact[:5])[0]
    assert localsearch.top_score(flat, world["gallery"], PATCH, s.local_floor, 6) == -np.inf
    with pytest.raises(ValueError, match="rank 0"):
        localsearch.top_score(world["query"], world["gallery"], PATCH, s.local_floor, 0)


def test_best_scores_by_the_tree_are_the_exact_scores(world: dict) -> None:
    s: GalleryScorer = world["scorer"]
    got = localsearch.best_scores(world["query"], world["gallery"], PATCH, s.local_floor, bootstrap=16,
                                  max_window=0, tree_pairs=0)
    assert np.array_equal(got, world["exact"])
