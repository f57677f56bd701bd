"""Exact shift-tolerant pixel near-duplicate search at scale: a grid over the leading principal coordinates and a
projected lower bound pick candidate training images; exact distances are computed on those candidates only.

The decision the pixel detector makes is a range query: is some training image closer than ``radius`` (in
`privdistill.pixel.pixel_features` space) to some shift of the query? Two bounds answer it without changing a
decision:

- with ``P`` the top principal directions of the training features and ``rho`` the norm of what ``P`` leaves
  out, ``|x - y|^2 >= |Px - Py|^2 + (rho_x - rho_y)^2`` (an L2 distance in ``dims + 1`` dimensions);
- each principal coordinate alone: ``|x - y| >= |p_i(x) - p_i(y)|``, so a training image within the radius
  lies in the same or a neighbouring cell of a grid of side ``radius`` over the first two coordinates.

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
    side = float(radius) * (1 + SLACK) + SLACK
    r2 = float(radius) ** 2
    ref_keys = _cell_keys(index.ref_aug, side)
    order = np.argsort(ref_keys, kind="stable")
    ref_keys, order_t = ref_keys[order], torch.from_numpy(order)
    # bound test as one product: |a - r|^2 < r2 + SLACK (|a|^2 + |r|^2 + r2)  <=>  [a, 1] . [2r, -(1-SLACK)|r|^2] > u(a)
    ref_aug = index.ref_aug[order_t]
    ref_mat = torch.cat([2 * ref_aug, -(1 - SLACK) * (ref_aug**2).sum(1, keepdim=True)], 1).float()
    n_cand = 0
    for q0 in range(0, n, query_block):
        b = min(query_block, n - q0)
        qf = index.shifted_features(query[q0 : q0 + b])  # [S * b, D]
        q_aug = index.bound_vectors(qf.double() - index.mean)
        q_mat = torch.cat([q_aug, torch.ones(len(q_aug), 1, dtype=torch.float64)], 1).float()
        u = ((1 - SLACK) * (q_aug**2).sum(1) - r2 * (1 + SLACK)).float()
        q_keys = _cell_keys(q_aug, side)
        ukeys, inverse = np.unique(q_keys, return_inverse=True)
        rows_by_cell = np.argsort(inverse, kind="stable")
        ends = np.cumsum(np.bincount(inverse, minlength=len(ukeys)))
        # the 3 x 3 neighbouring cells: one contiguous span of sorted training images per row of cells
        spans = [(np.searchsorted(ref_keys, ukeys + dr * CELL_STRIDE - 1, "left"),
                  np.searchsorted(ref_keys, ukeys + dr * CELL_STRIDE + 1, "right")) for dr in (-1, 0, 1)]
        pair_rows, pair_refs = [], []
        for c in range(len(ukeys)):
            parts = [(int(lo[c]), int(hi[c])) for lo, hi in spans if hi[c] > lo[c]]
            if not parts:
                continue
            refs = torch.cat([torch.arange(lo, hi) for lo, hi in parts])
            r_mat = torch.cat([ref_mat[lo:hi] for lo, hi in parts]).T.contiguous()
            cell_rows = torch.from_numpy(rows_by_cell[(ends[c - 1] if c else 0) : ends[c]])
            step = max(1, BLOCK_ELEMS // len(refs))
            for s in range(0, len(cell_rows), step):
                rows = cell_rows[s : s + step]
                i, j = ((q_mat[rows] @ r_mat) > u[rows, None]).nonzero(as_tuple=True)
                pair_rows.append(rows[i])
                pair_refs.append(refs[j])
        if not pair_rows:
            continue
        rows_t, refs_t = torch.cat(pair_rows), order_t[torch.cat(pair_refs)]
        n_cand += len(rows_t)
        d = (qf[rows_t] - index.feats[refs_t]).pow_(2).sum(1).sqrt_().numpy()
        qi = rows_t.numpy() % b
        hit = d < radius
        qi, ri, d = qi[hit], refs_t.numpy()[hit], d[hit]
        best = np.lexsort((ri, d, qi))  # per query the smallest distance, ties to the lowest training index
        qs, first = np.unique(qi[best], return_index=True)
        dist[q0 + qs], where[q0 + qs] = d[best][first], ri[best][first]
    return NearResult(dist, where, n_cand)
