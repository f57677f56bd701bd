"""Exact shift-tolerant pixel near-duplicate search at scale: a grid over the leading principal coordinates and a
projected lower bound pick candidate training images; exact distances are computed on those candidates only.

The decision the pixel detector makes is a range query: is some training image closer than ``radius`` (in
`privdistill.pixel.pixel_features` space) to some shift of the query? Two bounds answer it without changing a
decision:

- with ``P`` the top principal directions of the training features and ``rho`` the norm of what ``P`` leaves
  out, ``|x - y|^2 >= |Px - Py|^2 + (rho_x - rho_y)^2`` (an L2 distance in ``dims + 1`` dimensions);
- each principal coordinate alone: ``|x - y| >= |p_i(x) - p_i(y)|``, so a training image within the radius
  lies in the same or a neighbouring cell of a grid of side ``radius`` over the first two coordinates, and
  within ``radius`` on the third (a cell's query rows are taken in bands of that coordinate).

Every (shifted query, training image) pair in neighbouring cells whose projected bound is below the radius
(plus a float-rounding slack, so a bound only prunes when clearly above it) is checked exactly. So every image
within the radius gets its exact nearest training image and distance; an image outside it gets ``inf`` and
index -1 (nothing within the radius: the search does not look further)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from privdistill import pixel

DEFAULT_DIMS = 16
ROW_CHUNK = 256  # query rows of one cell sharing one band of the third coordinate
CELL_STRIDE = 1 << 31  # cell keys: first grid coordinate x stride + second
BLOCK_ELEMS = 8 << 20  # bound matrix (shifted queries x candidate cells' images) held at once: 32 MiB
SLACK = 1e-3  # relative float32 slack on squared bounds and on the grid's cell side


@dataclass
class NearResult:
    """Per query: distance to the nearest training image when one is within ``radius`` (else inf), its index
    (else -1), and how many (shifted query, training image) pairs were checked exactly."""

    distance: np.ndarray  # float32 [N]
    index: np.ndarray  # int64 [N]
    candidates: int

    @property
    def within(self) -> np.ndarray:
        return np.isfinite(self.distance)


class ShiftIndex:
    """Training-image features for `near_over_shifts`: the central crops' pixel features, their principal
    directions and each image's low-dimensional bound vector."""

    def __init__(self, ref: np.ndarray, max_shift: int, dims: int = DEFAULT_DIMS) -> None:
        self.shift = pixel.usable_shift(ref.shape, max_shift)
        self.feats = torch.from_numpy(pixel.pixel_features(pixel.shifted_crop(ref, 0, 0, self.shift)))
        f64 = self.feats.double()
        self.mean = f64.mean(0) if len(f64) else torch.zeros(f64.shape[1], dtype=torch.float64)
        centred = f64 - self.mean
        dims = max(1, min(dims, centred.shape[1]))
        _, vecs = torch.linalg.eigh(centred.T @ centred)  # D x D: cheap and deterministic
        self.basis = vecs[:, -dims:].flip(1).contiguous()  # leading directions first
        self.ref_aug = self.bound_vectors(centred)

    def bound_vectors(self, centred: torch.Tensor) -> torch.Tensor:
        """[n, D] centred float64 -> [n, dims + 1] float64: the principal coordinates and the residual's norm."""
        proj = centred @ self.basis
        rho = (centred - proj @ self.basis.T).norm(dim=1, keepdim=True)
        return torch.cat([proj, rho], 1)

    def shifted_features(self, images: np.ndarray) -> torch.Tensor:
        """[S * n, D]: pixel features of every shifted crop of ``images``, shift-major (S = (2s+1)^2)."""
        s = self.shift
        return torch.cat([torch.from_numpy(pixel.pixel_features(pixel.shifted_crop(images, dy, dx, s)))
                          for dy in range(-s, s + 1) for dx in range(-s, s + 1)])


def _cell_keys(coords: torch.Tensor, side: float) -> np.ndarray:
    """Grid cell of each point over the first two coordinates, as one sortable int64 key."""
    c = np.floor(coords[:, :2].numpy() / side).astype(np.int64)
    return c[:, 0] * CELL_STRIDE + c[:, 1]


@torch.no_grad()
def near_over_shifts(query: np.ndarray, index: ShiftIndex, radius: float, *, query_block: int = 8192) -> NearResult:
    """The nearest training image within ``radius`` of each query at any shift up to the index's (exact; see
    the module docstring), by distance in `pixel.pixel_features` space; memory bounded by ``query_block``."""
    n, m = len(query), len(index.feats)
    dist, where = np.full(n, np.inf, np.float32), np.full(n, -1, np.int64)
    if n == 0 or m == 0 or not radius > 0:
        return NearResult(dist, where, 0)
    refs = _SortedRefs(index, radius)
    n_cand, threads = 0, torch.get_num_threads()
    try:
        # the candidate blocks are small: intra-op threads only add synchronisation (on the shared 2-core
        # machine 2 threads made this search 4.8x slower than 1: 52.8 s vs 11.0 s at N = M = 20,000)
        torch.set_num_threads(1)
        for q0 in range(0, n, query_block):
            n_cand += _search_block(query[q0 : q0 + query_block], index, refs, dist[q0:], where[q0:])
    finally:
        torch.set_num_threads(threads)
    return NearResult(dist, where, n_cand)


class _SortedRefs:
    """Training images sorted by grid cell (first two coordinates), then by the third coordinate."""

    def __init__(self, index: ShiftIndex, radius: float) -> None:
        self.radius, self.r2 = float(radius), float(radius) ** 2
        self.side = self.radius * (1 + SLACK) + SLACK
        keys = _cell_keys(index.ref_aug, self.side)
        p3 = index.ref_aug[:, min(2, index.ref_aug.shape[1] - 1)].numpy()
        order = np.lexsort((p3, keys))
        self.keys, self.p3, self.order = keys[order], p3[order], torch.from_numpy(order)
        # bound test as one product: |a - r|^2 < r2 + SLACK (|a|^2 + |r|^2 + r2)  <=>  [a, 1].[2r, -(1-SLACK)|r|^2] > u(a)
        aug = index.ref_aug[self.order]
        self.mat = torch.cat([2 * aug, -(1 - SLACK) * (aug**2).sum(1, keepdim=True)], 1).float()


NEIGHBOURS = np.array([dr * CELL_STRIDE + dc for dr in (-1, 0, 1) for dc in (-1, 0, 1)])


def _search_block(query: np.ndarray, index: ShiftIndex, refs: _SortedRefs, dist: np.ndarray, where: np.ndarray) -> int:
    """One block of queries: fills ``dist``/``where`` (views from the block's first query); returns the candidates."""
    b, side = len(query), refs.side
    qf = index.shifted_features(query)  # [S * b, D]
    q_aug = index.bound_vectors(qf.double() - index.mean)
    q_mat = torch.cat([q_aug, torch.ones(len(q_aug), 1, dtype=torch.float64)], 1).float()
    u = ((1 - SLACK) * (q_aug**2).sum(1) - refs.r2 * (1 + SLACK)).float()
    q_keys = _cell_keys(q_aug, side)
    q_p3 = q_aug[:, min(2, q_aug.shape[1] - 1)].numpy()
    by_cell = np.lexsort((q_p3, q_keys))  # rows by cell, then by the third coordinate
    ukeys, starts = np.unique(q_keys[by_cell], return_index=True)
    ends = np.append(starts[1:], len(by_cell))
    nb = ukeys[:, None] + NEIGHBOURS  # the 3 x 3 neighbouring cells of every query cell
    nb_lo, nb_hi = np.searchsorted(refs.keys, nb, "left"), np.searchsorted(refs.keys, nb, "right")
    pair_rows, pair_refs = [], []
    for c in range(len(ukeys)):
        cells = [(int(lo), int(hi)) for lo, hi in zip(nb_lo[c], nb_hi[c], strict=True) if hi > lo]
        for s0 in range(int(starts[c]), int(ends[c]), ROW_CHUNK) if cells else ():
            rows_np = by_cell[s0 : min(s0 + ROW_CHUNK, int(ends[c]))]
            # a training image within the radius is within it on the third coordinate too
            p_lo, p_hi = q_p3[rows_np[0]] - side, q_p3[rows_np[-1]] + side
            parts = [(lo + int(np.searchsorted(refs.p3[lo:hi], p_lo, "left")),
                      lo + int(np.searchsorted(refs.p3[lo:hi], p_hi, "right"))) for lo, hi in cells]
            parts = [(lo, hi) for lo, hi in parts if hi > lo]
            if not parts:
                continue
            cand = torch.cat([torch.arange(lo, hi) for lo, hi in parts])
            r_mat = torch.cat([refs.mat[lo:hi] for lo, hi in parts]).T.contiguous()
            cell_rows = torch.from_numpy(rows_np)
            step = max(1, BLOCK_ELEMS // len(cand))
            for s in range(0, len(cell_rows), step):
                rows = cell_rows[s : s + step]
                i, j = ((q_mat[rows] @ r_mat) > u[rows, None]).nonzero(as_tuple=True)
                pair_rows.append(rows[i])
                pair_refs.append(cand[j])
    if not pair_rows:
        return 0
    rows_t, refs_t = torch.cat(pair_rows), refs.order[torch.cat(pair_refs)]
    d = (qf[rows_t] - index.feats[refs_t]).pow_(2).sum(1).sqrt_().numpy()
    qi = rows_t.numpy() % b
    hit = d < refs.radius
    qi, ri, d = qi[hit], refs_t.numpy()[hit], d[hit]
    best = np.lexsort((ri, d, qi))  # per query the smallest distance, ties to the lowest training index
    qs, first = np.unique(qi[best], return_index=True)
    dist[qs], where[qs] = d[best][first], ri[best][first]
    return len(rows_t)
