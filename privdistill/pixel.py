"""Pixel-space nearest neighbours, robust to sampler noise: images are Gaussian-smoothed and
average-pooled before L2 distances are taken, and the search is chunked so memory stays bounded
whatever the number of reference images."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_SIGMA = 1.0
DEFAULT_POOL = 2
CHUNK_BYTES = 256 << 20  # distance-matrix budget per chunk


def _gauss_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


OPERATOR_MAX_INPUTS = 1024  # images up to this many values (c*h*w) go through one precomputed map (<= 4 MiB)


@torch.no_grad()
def _blur_pool(x: torch.Tensor, k: torch.Tensor | None, pool: int) -> torch.Tensor:
    c = x.shape[1]
    if k is not None:
        r = len(k) // 2
        kh = k.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
        kv = k.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), kh, groups=c)
        x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), kv, groups=c)
    if pool > 1 and x.shape[-1] >= 2 * pool:
        x = F.avg_pool2d(x, pool, ceil_mode=True)
    return x.reshape(len(x), -1)


@lru_cache(maxsize=8)
def _feature_operator(shape: tuple[int, int, int], sigma: float, pool: int) -> torch.Tensor:
    """[c*h*w, D]: the blur-then-pool map as a matrix (it is linear), built by sending the identity through it."""
    n_in = shape[0] * shape[1] * shape[2]
    eye = torch.eye(n_in, dtype=torch.float32).reshape(n_in, *shape)
    return _blur_pool(eye, _gauss_kernel(sigma) if sigma > 0 else None, pool).contiguous()


@torch.no_grad()
def pixel_features(
    images: np.ndarray, sigma: float = DEFAULT_SIGMA, pool: int = DEFAULT_POOL, batch: int = 4096
) -> np.ndarray:
    """NCHW [-1, 1] -> [N, D] float32: Gaussian blur (sigma px), then pool x pool average pooling.

    Small images (up to OPERATOR_MAX_INPUTS values) take one matrix product with the same linear map, built
    once per shape: on CPU a depthwise convolution costs far more per image than that product."""
    out = []
    shape = tuple(int(v) for v in images.shape[1:])
    op = _feature_operator(shape, float(sigma), int(pool)) if 0 < np.prod(shape) <= OPERATOR_MAX_INPUTS else None
    k = _gauss_kernel(sigma) if sigma > 0 else None
    for s in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[s : s + batch], dtype=np.float32))
        out.append((x.reshape(len(x), -1) @ op if op is not None else _blur_pool(x, k, pool)).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def shifted_crop(images: np.ndarray, dy: int, dx: int, s: int) -> np.ndarray:
    """The interior of NCHW ``images`` (an ``s``-pixel border removed), displaced by (dy, dx), |d| <= s."""
    h, w = images.shape[-2:]
    return np.ascontiguousarray(images[:, :, s + dy : h - s + dy, s + dx : w - s + dx])


def usable_shift(shape: tuple[int, ...], max_shift: int) -> int:
    """``max_shift``, or 0 when the images are too small to crop a border of that width."""
    return max_shift if min(shape[-2:]) > 4 * max_shift else 0


def nearest_over_shifts(
    query: np.ndarray, ref: np.ndarray, max_shift: int, *, sigma: float = DEFAULT_SIGMA, pool: int = DEFAULT_POOL,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest reference (in ``pixel_features`` space) of each query image, minimised over integer
    shifts of the query by up to ``max_shift`` px: (distance [N], index [N], reference features)."""
    d, i, _, ref_feats = knn_over_shifts(query, ref, max_shift, k=1, sigma=sigma, pool=pool)
    return d[:, 0], i[:, 0], ref_feats


def knn_over_shifts(
    query: np.ndarray, ref: np.ndarray, max_shift: int, k: int = 1, *, sigma: float = DEFAULT_SIGMA,
    pool: int = DEFAULT_POOL,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` nearest references of each query image in ``pixel_features`` space for every
    integer shift of the query by up to ``max_shift`` px (the interiors are compared, see
    `shifted_crop`), merged and sorted: (distances [N, K] ascending, reference indices [N, K],
    shifts [N, K, 2] as (dy, dx), reference features), K = k·(2s+1)². A reference may appear once
    per shift; the minimum over shifts of any reference among the k nearest of some shift is exact."""
    s = usable_shift(query.shape, max_shift)
    ref_feats = pixel_features(shifted_crop(ref, 0, 0, s), sigma=sigma, pool=pool)
    dists, idxs, shifts = [], [], []
    for dy in range(-s, s + 1):
        for dx in range(-s, s + 1):
            d, i = knn(pixel_features(shifted_crop(query, dy, dx, s), sigma=sigma, pool=pool), ref_feats, k=k)
            dists.append(d)
            idxs.append(i)
            shifts.append(np.broadcast_to(np.array([dy, dx], np.int64), (*i.shape, 2)))
    d, i, sh = np.concatenate(dists, 1), np.concatenate(idxs, 1), np.concatenate(shifts, 1)
    order = np.argsort(d, axis=1, kind="stable")
    return (np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1),
            np.take_along_axis(sh, order[..., None], 1), ref_feats)


@torch.no_grad()
def knn(
    query: np.ndarray, ref: np.ndarray, k: int = 1, chunk_bytes: int = CHUNK_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by L2 distance: (distances [N, k], indices [N, k]).

    One matrix product per chunk of queries; at most ``chunk_bytes`` of distances in memory."""
    q = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32))
    r = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))
    k = min(k, len(r))
    r_sq = (r * r).sum(1)
    rows = max(1, chunk_bytes // max(1, 4 * len(r)))
    dists, idxs = [], []
    for s in range(0, len(q), rows):
        qc = q[s : s + rows]
        d2 = (qc * qc).sum(1, keepdim=True) - 2.0 * (qc @ r.T) + r_sq
        val, idx = torch.topk(d2, k, dim=1, largest=False)
        dists.append(val.clamp_min_(0).sqrt_())
        idxs.append(idx)
    if not dists:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return torch.cat(dists).numpy(), torch.cat(idxs).numpy()


def nearest_and_other_patient(
    query: np.ndarray, ref: np.ndarray, ref_patients: np.ndarray, chunk_bytes: int = CHUNK_BYTES
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each query: distance to its nearest reference, that reference's index, and the distance
    to the nearest reference of any *other* patient than that one.

    Exact: k is one more than the largest number of images any patient has, so the k nearest
    always contain an image of another patient."""
    _, counts = np.unique(ref_patients, return_counts=True)
    k = min(len(ref), int(counts.max()) + 1)
    d, idx = knn(query, ref, k=k, chunk_bytes=chunk_bytes)
    nearest_pid = ref_patients[idx[:, 0]]
    other = ref_patients[idx] != nearest_pid[:, None]
    first_other = np.where(other.any(1), other.argmax(1), -1)
    d_other = np.where(first_other >= 0, d[np.arange(len(d)), np.maximum(first_other, 0)], np.inf)
    return d[:, 0], idx[:, 0], d_other.astype(np.float32)
