"""Exact local-patch copy search at scale: the local detector's decision through cheap exact lower bounds per patch
position (a window over sorted patch sums, then a second projection), a k-d tree only where windows are large,
instead of a matrix product of every query patch with every training patch.

The local detector (`privdistill.filter.GalleryScorer.local`) scores an image by the best patch match: the max over
patch positions ``p`` whose centred energy ``E(q_p)`` reaches the noise floor, and over training images ``g``, of
``-|q_p - g_p|^2 / E(q_p)``; an image is dropped when that score is strictly above the calibrated threshold ``thr``
(always <= 0 in practice: scores are <= 0). With ``t = -thr`` that is a range query per position with a radius of
the query's own: is some training patch at the same position within ``r = sqrt(t E(q_p))`` of ``q_p``?

Per position, with ``P`` values per patch, ``u1 = (1, ..., 1) / sqrt(P)`` and ``u2`` a unit vector orthogonal to
it (the training patches' leading centred principal direction), projection on ``{u1, u2}`` can only shorten a
distance: ``|q - g|^2 >= (sum q - sum g)^2 / P + (u2.q - u2.g)^2``. So a training patch within ``r`` has its sum
within ``sqrt(P) r`` of the query's (a window over the training patches sorted by sum, found for every query at once
by binary search), and passes the two-projection bound; only those pairs get the exact float64 ``|q - g|^2``. At the
calibrated thresholds radii are tiny and windows hold a few patches; queries whose windows are large are searched
in a k-d tree instead (``scipy.spatial.cKDTree``, built only at positions that need it): query patches sorted by
radius, in groups, each searched for its nearest training patch with its group's largest radius (times a float
slack) as the tree's distance bound, then checked exactly against its own radius. Bounds carry a float slack, so
they only prune a patch clearly outside the radius. An image already dropped at an earlier position is not searched
again.

Decisions equal the exhaustive detector's up to float rounding: it forms ``|q|^2 - 2 q.g + |g|^2`` in float32,
this search takes ``|q - g|^2`` in float64 (with the exhaustive detector's own float32 energies), so only a score
within about 1e-6 of the threshold can be read on different sides of it. A threshold ``>= 0`` drops nothing (no
score is above it) and needs no search."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np
import torch
from scipy.spatial import cKDTree

GROUP = 2048  # query patches sharing one tree distance bound (sorted by radius, so their radii are close)
SLACK = 1e-6  # relative slack on the tree's distance bound: it never prunes a patch at the radius
MAX_WINDOW = 512  # training patches in a query's sum window above which it may go to the tree
TREE_PAIRS = 2_000_000  # large windows' pairs at one position above which those queries use the tree instead
PAIR_CHUNK = 1 << 20  # (query, training patch) pairs bound-checked at once
ENERGY_REL = 1e-5  # float32 energies (the detector's) lie within this relative error of the float64 ones here
BOUND_REL = 1e-9  # relative slack on windows and projected bounds (float64 rounding is ~1e-15)
BOUND_ABS = 1e-12  # absolute slack, times P * scale^2 (scale: the largest absolute pixel value, at least 1)
BOOTSTRAP = 1024  # training images whose exact best patch match starts each query's bound in `best_scores`
FIRST_LEVEL, LEVEL_FACTOR = -1e-8, 100.0  # `top_score`: scores first searched down to, and the step down
F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class LocalResult:
    """Per query image: whether some structured patch matches a training patch within the threshold; how many
    (query patch, position) searches ran, how many found a training patch within their bound, how many (query
    patch, training patch) pairs were bound-checked and how many query patches went to a k-d tree."""

    within: np.ndarray  # bool [N]
    searched: int
    candidates: int
    pairs: int = 0
    tree_queries: int = 0


def patches(images: np.ndarray, y: int, x: int, p: int) -> np.ndarray:
    """[N, c*p*p] float32: each image's ``p`` x ``p`` patch at (y, x), channels first."""
    return np.ascontiguousarray(images[:, :, y : y + p, x : x + p], np.float32).reshape(len(images), -1)


def centred_energy(q: np.ndarray) -> np.ndarray:
    """[N] float32: sum of squared deviations from each patch's mean, computed as the exhaustive detector does."""
    t = torch.from_numpy(np.ascontiguousarray(q, np.float32))
    return ((t - t.mean(1, keepdim=True)) ** 2).sum(1).numpy()


class _Side:
    """One image set at one patch position: its patches feature-major ([P, N] float32, channels first like
    `patches`), their sums, second projections and float64 centred energies. Reuses ``buffers`` (one set's
    [P, N] float32 and float64 arrays) from position to position."""

    def __init__(self, layout: np.ndarray, y: int, x: int, p: int, buffers: tuple[np.ndarray, np.ndarray],
                 u2: np.ndarray | None = None, energy: bool = True) -> None:
        self.slab, s64 = buffers
        np.copyto(self.slab.reshape(layout.shape[0], p, p, -1), layout[:, y : y + p, x : x + p, :])
        np.copyto(s64, self.slab)
        self.k1 = s64.sum(0)
        self.u2 = _second_direction(s64) if u2 is None else u2
        self.k2 = self.u2 @ s64
        self.e64 = np.einsum("pn,pn->n", s64, s64) - self.k1 * self.k1 / len(s64) if energy else self.k1[:0]

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """[len(idx), P] float32, C-contiguous: the same values and layout as `patches` gives for those images."""
        return np.ascontiguousarray(self.slab[:, idx].T)


def _layout(images: np.ndarray, p: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The images as [C, H, W, N] float32 (images last: each patch position's values are a few contiguous runs),
    and the [P, N] buffers a `_Side` fills."""
    t = torch.from_numpy(np.ascontiguousarray(images, np.float32)).permute(1, 2, 3, 0).contiguous()
    n_val = images.shape[1] * p * p
    return t.numpy(), (np.empty((n_val, len(images)), np.float32), np.empty((n_val, len(images)), np.float64))


def _second_direction(s64: np.ndarray, sample: int = 4096) -> np.ndarray:
    """A unit vector orthogonal to (1, ..., 1): the leading principal direction of a subsample's centred patches
    (any such vector keeps the bound exact; a spread-out one prunes more)."""
    p = len(s64)
    if p < 2:
        return np.zeros(p)
    sub = s64[:, :: max(1, s64.shape[1] // sample)]
    c = sub - sub.mean(0, keepdims=True)  # remove each patch's mean: its component along (1, ..., 1)
    _, vecs = np.linalg.eigh(c @ c.T)
    v = vecs[:, -1] - vecs[:, -1].mean()
    if not np.linalg.norm(v) > 1e-6:
        v = np.zeros(p)
        v[0], v[1] = 1.0, -1.0
    return v / np.linalg.norm(v)


def _one_torch_thread(fn: F) -> F:
    """Runs ``fn`` with one torch intra-op thread: its torch calls are small (energies of a few rows, a 1,000 x
    1,024 product), and on a loaded 2-core machine a second OpenMP thread only spun (100k x 100k calibration under
    the same load: 31.2 CPU-s with 2 threads, 18.5 with 1). Results do not depend on the thread count."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return cast(F, run)


def _scale(*arrays: np.ndarray) -> float:
    return max([1.0] + [max(-float(a.min()), float(a.max())) for a in arrays if a.size])


class _Position:
    """The training patches at one position: sorted by sum, with a k-d tree built on first use."""

    def __init__(self, layout: np.ndarray, y: int, x: int, p: int, buffers: tuple[np.ndarray, np.ndarray]) -> None:
        self.side = _Side(layout, y, x, p, buffers, energy=False)
        self.order = np.argsort(self.side.k1)
        self.k1, self.k2 = self.side.k1[self.order], self.side.k2[self.order]
        self._g64: np.ndarray | None = None
        self._tree: cKDTree | None = None

    def tree(self) -> tuple[cKDTree, np.ndarray]:
        if self._tree is None:
            self._g64 = self.side.rows(np.arange(self.side.slab.shape[1])).astype(np.float64)
            self._tree = cKDTree(self._g64, balanced_tree=False, compact_nodes=False)
        assert self._g64 is not None
        return self._tree, self._g64


def _scan(query: np.ndarray, gallery: np.ndarray, patch: int, floor: float, coef: np.ndarray, *, workers: int,
          max_window: int, tree_pairs: int, stats: dict[str, int]
          ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
    """Every position (y, x): for the query patches with energy >= ``floor`` and ``coef > 0`` (read afresh at each
    position; the squared radius is ``coef * energy``), the nearest training patch when it lies within the radius
    (plus slack). Yields (y, x, query indices, their exact squared distances, their float32 energies as float64);
    a training patch nearer than a query's radius is never missed."""
    p = patch
    scale = _scale(query, gallery)
    n_val = query.shape[1] * p * p
    eps = BOUND_ABS * n_val * scale * scale
    q_lay, q_buf = _layout(query, p)
    g_lay, g_buf = _layout(gallery, p)
    for y in range(query.shape[-2] - p + 1):
        for x in range(query.shape[-1] - p + 1):
            live = np.flatnonzero(coef > 0)
            if len(live) == 0:
                return
            pos = _Position(g_lay, y, x, p, g_buf)
            q_side = _Side(q_lay, y, x, p, q_buf, pos.side.u2)
            e_hi = q_side.e64[live] * (1 + ENERGY_REL) + eps  # >= the float32 energy
            live, e_hi = live[e_hi >= floor], e_hi[e_hi >= floor]
            if len(live) == 0:
                continue
            r2_hi = coef[live] * e_hi * (1 + BOUND_REL) + eps
            half = np.sqrt(n_val * r2_hi) * (1 + BOUND_REL) + eps
            by_key = np.argsort(q_side.k1[live])  # sorted needles: a cache-friendly binary search
            live, r2_hi, half = live[by_key], r2_hi[by_key], half[by_key]
            k1q = q_side.k1[live]
            lo = np.searchsorted(pos.k1, k1q - half, side="left")
            hi = np.searchsorted(pos.k1, k1q + half, side="right")
            count = hi - lo
            big = count > max_window
            if int(count[big].sum()) <= tree_pairs:
                big[:] = False
            stats["searched"] += len(live)
            yield from _pairs(y, x, q_side, pos, live[~big], lo[~big], count[~big], r2_hi[~big], floor, n_val,
                              eps, stats)
            if big.any():
                yield from _tree_search(y, x, q_side, pos, live[big], coef, floor, workers, stats)


def _pairs(y: int, x: int, q_side: _Side, pos: _Position, live: np.ndarray, lo: np.ndarray, count: np.ndarray,
           r2_hi: np.ndarray, floor: float, n_val: int, eps: float, stats: dict[str, int]
           ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
    """The window path: every (query, training patch in its sum window) pair through the two-projection bound, the
    survivors' exact squared distances, the nearest per query."""
    keep = count > 0
    live, lo, count, r2_hi = live[keep], lo[keep], count[keep], r2_hi[keep]
    ends = np.cumsum(count)
    start = 0
    while start < len(live):
        stop = max(start + 1, int(np.searchsorted(ends, ends[start] - count[start] + PAIR_CHUNK, side="right")))
        c = count[start:stop]
        n_pairs = int(c.sum())
        stats["pairs"] += n_pairs
        qi = np.repeat(np.arange(start, stop), c)
        gj = np.arange(n_pairs) - np.repeat(np.cumsum(c) - c - lo[start:stop], c)  # index into the sorted patches
        d1 = q_side.k1[live[qi]] - pos.k1[gj]
        d2p = q_side.k2[live[qi]] - pos.k2[gj]
        ok = d1 * d1 / n_val + d2p * d2p <= r2_hi[qi] * (1 + BOUND_REL) + eps
        start = stop
        if not ok.any():
            continue
        qi, gi = qi[ok], pos.order[gj[ok]]
        d2 = ((q_side.rows(live[qi]).astype(np.float64) - pos.side.rows(gi).astype(np.float64)) ** 2).sum(1)
        first = np.flatnonzero(np.r_[True, qi[1:] != qi[:-1]])  # pairs come grouped by query
        idx = live[qi[first]]
        nearest = np.minimum.reduceat(d2, first)
        energy = centred_energy(q_side.rows(idx)).astype(np.float64)
        structured = energy >= floor
        stats["candidates"] += int(structured.sum())
        yield y, x, idx[structured], nearest[structured], energy[structured]


def _tree_search(y: int, x: int, q_side: _Side, pos: _Position, live: np.ndarray, coef: np.ndarray, floor: float,
                 workers: int, stats: dict[str, int]) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
    """The fallback for large windows: grouped, radius-bounded nearest-neighbour queries in the position's tree."""
    energy = centred_energy(q_side.rows(live)).astype(np.float64)
    live, energy = live[energy >= floor], energy[energy >= floor]
    if len(live) == 0:
        return
    stats["tree_queries"] += len(live)
    tree, g = pos.tree()
    r2 = coef[live] * energy
    order = np.argsort(r2, kind="stable")
    live, r2, energy = live[order], r2[order], energy[order]
    qa = q_side.rows(live).astype(np.float64)
    for s in range(0, len(live), GROUP):
        bound = float(np.sqrt(r2[min(s + GROUP, len(live)) - 1] * (1 + SLACK))) * (1 + SLACK) + 1e-12
        d, i = tree.query(qa[s : s + GROUP], distance_upper_bound=bound, workers=workers)
        rows = np.flatnonzero(np.isfinite(d))
        stats["candidates"] += len(rows)
        d2 = ((qa[s + rows] - g[i[rows]]) ** 2).sum(1)
        yield y, x, live[s + rows], d2, energy[s + rows]


@_one_torch_thread
def local_within(query: np.ndarray, gallery: np.ndarray, patch: int, threshold: float, floor: float, *,
                 workers: int = 1, max_window: int = MAX_WINDOW, tree_pairs: int = TREE_PAIRS) -> LocalResult:
    """The local detector's decision at ``threshold`` for NCHW ``query`` against NCHW ``gallery`` (same shape):
    True where some patch position with energy >= ``floor`` has a training patch with -d^2 / energy > threshold.
    ``max_window`` / ``tree_pairs``: when a query's sum window goes to the k-d tree (see the module notes)."""
    n, m = len(query), len(gallery)
    within = np.zeros(n, bool)
    if n == 0 or m == 0 or not threshold < 0:  # scores are <= 0: none is above a threshold >= 0 (or NaN)
        return LocalResult(within, 0, 0)
    t = -float(threshold)
    if not np.isfinite(t):  # threshold -inf: any structured patch passes
        for y in range(query.shape[-2] - patch + 1):
            for x in range(query.shape[-1] - patch + 1):
                within |= centred_energy(patches(query, y, x, patch)) >= floor
        return LocalResult(within, 0, 0)
    coef = np.full(n, t)
    stats = {"searched": 0, "candidates": 0, "pairs": 0, "tree_queries": 0}
    for _, _, idx, d2, energy in _scan(query, gallery, patch, floor, coef, workers=workers, max_window=max_window,
                                       tree_pairs=tree_pairs, stats=stats):
        hit = idx[d2 < t * energy]
        within[hit] = True
        coef[hit] = 0.0  # an image already dropped is not searched again
    return LocalResult(within, **stats)


def _bootstrap(query: np.ndarray, gallery: np.ndarray, patch: int, floor: float, bootstrap: int) -> np.ndarray:
    """Lower bounds of every query's exact score: the exact score of its best float32 match among the first
    ``bootstrap`` training images at every position (one small matrix product per position)."""
    best = np.full(len(query), -np.inf)
    sub = gallery[: min(bootstrap, len(gallery))]
    h, w = query.shape[-2:]
    for y in range(h - patch + 1):
        for x in range(w - patch + 1):
            q, g = patches(query, y, x, patch), patches(sub, y, x, patch)
            energy = centred_energy(q)
            rows = np.flatnonzero(energy >= floor)
            if len(rows) == 0:
                continue
            qt, gt = torch.from_numpy(q[rows]), torch.from_numpy(g)
            j = ((gt * gt).sum(1) - 2 * qt @ gt.T).argmin(1).numpy()
            d2 = ((q[rows].astype(np.float64) - g[j].astype(np.float64)) ** 2).sum(1)
            best[rows] = np.maximum(best[rows], -d2 / np.maximum(energy[rows].astype(np.float64), floor))
    return best


def _improve(best: np.ndarray, query: np.ndarray, gallery: np.ndarray, patch: int, floor: float, level: float,
             todo: np.ndarray, workers: int, max_window: int, tree_pairs: int) -> None:
    """Raise ``best[todo]`` (in place) to the exact score wherever that score is >= ``level``: each position
    searched with the radius of a score >= max(best so far, level)."""
    coef = np.zeros(len(best))

    def refresh() -> None:
        coef[:] = 0.0
        coef[todo] = -np.maximum(best[todo], level)
        coef[~(coef > 0)] = 0.0  # a score of 0 cannot be beaten

    refresh()
    stats = {"searched": 0, "candidates": 0, "pairs": 0, "tree_queries": 0}
    for _, _, idx, d2, energy in _scan(query, gallery, patch, floor, coef, workers=workers, max_window=max_window,
                                       tree_pairs=tree_pairs, stats=stats):
        best[idx] = np.maximum(best[idx], -d2 / np.maximum(energy, floor))
        refresh()


@_one_torch_thread
@torch.no_grad()
def best_scores(query: np.ndarray, gallery: np.ndarray, patch: int, floor: float, *, workers: int = 1,
                bootstrap: int = BOOTSTRAP, max_window: int = MAX_WINDOW, tree_pairs: int = TREE_PAIRS) -> np.ndarray:
    """Every query's exact local score (float64, ``|q - g|^2`` taken directly; -inf without a structured patch),
    by bounded searches: a first bound is the best match among the first ``bootstrap`` training images, and at each
    position only a training patch scoring above the query's best so far can lie within ``sqrt(-best * E)``, so the
    nearest one within it (if any) is the position's best and every other is skipped."""
    n, m = len(query), len(gallery)
    if n == 0 or m == 0:
        return np.full(n, -np.inf)
    best = _bootstrap(query, gallery, patch, floor, bootstrap)
    _improve(best, query, gallery, patch, floor, -np.inf, np.isfinite(best), workers, max_window, tree_pairs)
    return best


@_one_torch_thread
@torch.no_grad()
def top_score(query: np.ndarray, gallery: np.ndarray, patch: int, floor: float, rank: int, *, workers: int = 1,
              bootstrap: int = BOOTSTRAP, first_level: float = FIRST_LEVEL, factor: float = LEVEL_FACTOR,
              max_window: int = MAX_WINDOW, tree_pairs: int = TREE_PAIRS) -> float:
    """The ``rank``-th largest exact local score of the ``query`` images (1 = the largest): exactly
    ``np.sort(best_scores(...))[-rank]``, what a conformal threshold needs, without every score.

    With ``b`` the bootstrap's lower bounds and ``L`` their ``rank``-th largest, the answer is >= ``L``. Searching
    every image down to a level ``v`` (radii of a score >= max(best so far, v)) gives the exact score of every image
    scoring >= v; once ``rank`` images do, the ``rank``-th largest is among them. Levels start at ``first_level``
    (tiny radii: cheap) and step down by ``factor``, never below ``L``, where ``rank`` images are sure to reach."""
    n, m = len(query), len(gallery)
    if not 1 <= rank <= n:
        raise ValueError(f"rank {rank} outside 1..{n} (the number of query images)")
    if m == 0:
        return -math.inf
    best = _bootstrap(query, gallery, patch, floor, bootstrap)
    if np.isfinite(best).sum() < rank:  # images without a structured patch score -inf, exactly
        return -math.inf
    floor_level = float(np.sort(best)[-rank])
    level, done = min(first_level, 0.0), np.zeros(n, bool)
    while True:
        level = max(level, floor_level)
        todo = ~done & np.isfinite(best)
        _improve(best, query, gallery, patch, floor, level, todo, workers, max_window, tree_pairs)
        done |= best >= level
        if done.sum() >= rank or level <= floor_level:
            return float(np.sort(best)[-rank])
        level *= factor
