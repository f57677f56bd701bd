"""The privacy filter: drop synthetic images that the re-identification embedding links to a real patient,
or that are pixel-space near-duplicates of a training image; write the aggregate report and local review."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from privdistill import localsearch, nearsearch, pixel
from privdistill.config import FilterConfig
from privdistill.data.types import ImageSet
from privdistill.errors import DataError
from privdistill.imaging import save_grid
from privdistill.web.plots import write_similarity_histogram
from privdistill.workdir import KEPT_FILE

log = structlog.get_logger(__name__)

Embed = Callable[[np.ndarray], np.ndarray]
BLOCK_ELEMS = 4 << 20  # similarity block (rows x real columns) kept cache-sized: 16 MiB of float32
MEDIAN_SAMPLE = 10_000  # training images whose other-patient distance estimates the median
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
REVIEW_README = """LOCAL REVIEW ONLY - NEVER EXPORT THIS FOLDER.

dropped_review.png shows synthetic images the privacy filter dropped, each beside the REAL training
image it matched (left: synthetic, right: real). It contains real patient images: it exists so a
person inside the site can check the filter's decisions, and must not leave the site.
decisions.npz holds each synthetic image's similarity to, and index of, its nearest real training
image (what the site's review page shows); it links synthetic images to real ones and stays here too.
"""
DECISIONS_FILE = "decisions.npz"


DETECTORS = ("reid", "pixel", "local")
PIXEL_SEARCHES = ("grid", "exhaustive")  # grid: exact decisions, distances exact under the threshold
LOCAL_SEARCHES = ("tree", "exhaustive")  # tree: the same decisions up to float rounding at the threshold
LOCAL_NOISE_FLOOR = 0.01  # per-pixel variance below which a patch carries no identifying structure (std 0.1)


@dataclass
class FilterCalibration:
    """Thresholds of the filter's detectors, calibrated on the decision the filter makes.

    Null: each detector's score (higher = more like a training image) of images of patients outside both
    the training gallery and the re-identification model's training, scored against the actual training
    gallery of this run. Each of the k detectors gets alpha / k (Bonferroni); its threshold is the
    conformal (1 - alpha/k) quantile of its null scores (the ceil((n+1)(1-alpha/k))-th smallest), and an
    image is dropped when any score is strictly above its threshold, so a fresh image of a new patient is
    dropped with probability at most alpha (exchangeability; union bound over detectors)."""

    alpha: float
    n_null: int
    thresholds: dict[str, float]
    reid_score: str = "max"
    cohort_k: int = 10
    local_patch: int = 4

    @property
    def detectors(self) -> tuple[str, ...]:
        return tuple(self.thresholds)

    @property
    def alpha_per_detector(self) -> float:
        return self.alpha / max(1, len(self.thresholds))

    def as_dict(self) -> dict[str, Any]:
        return {"method": "conformal best-match null, Bonferroni over detectors", "alpha": self.alpha,
                "n_null": self.n_null, "detectors": list(self.detectors),
                "alpha_per_detector": self.alpha_per_detector, "thresholds": dict(self.thresholds),
                "reid_score": self.reid_score, "cohort_k": self.cohort_k, "local_patch": self.local_patch}


def conformal_threshold(null_scores: np.ndarray, alpha: float) -> float:
    """The ceil((n+1)(1-alpha))-th smallest null score: P(fresh score > it) <= alpha for an exchangeable
    fresh image. Needs n >= 1/alpha - 1 null scores (else no finite threshold exists)."""
    s = np.sort(np.asarray(null_scores, np.float64))
    k = int(math.ceil((len(s) + 1) * (1 - alpha)))
    if k > len(s):
        need = int(math.ceil(1 / alpha)) - 1
        raise DataError(
            f"the filter's calibration has {len(s)} held-out image(s) of other patients, too few for a fresh-drop "
            f"level {alpha:.4g} per detector (needs >= {need}); add held-out real images (data.test_source or "
            "data.max_test_per_class), raise filter.max_fresh_drop, or use fewer filter.detectors"
        )
    return float(s[k - 1])


def _patient_index(pids: np.ndarray | None, n: int) -> np.ndarray:
    if pids is None:
        return np.arange(n)
    return np.unique(np.asarray(pids), return_inverse=True)[1].astype(np.int64)


class GalleryScorer:
    """Scores of query images against the training gallery, one per detector (higher = closer to a
    training image): ``reid`` the best cosine similarity of re-id embeddings (``max``), or that minus the
    mean of the next ``cohort_k`` patients' best similarities, over their spread (``cohort``, score
    normalisation as in open-set verification); ``pixel`` minus the smoothed-pixel L2 distance to the nearest
    training image over shifts of up to ``max_shift`` px; ``local`` the best patch match: max over patch
    positions and training images of -||q_p - g_p||^2 / (centred energy of q_p), patches without structure
    left out, so a small copied region (an implant, a burned-in label) scores near 0 while a fresh one scores
    well below.
    ``exclude`` (per query, a gallery index or -1) leaves one gallery image out, for leave-one-visit-out."""

    def __init__(self, gallery: ImageSet, embed: Embed, *, real_embeddings: np.ndarray | None = None,
                 reid_score: str = "max", cohort_k: int = 10, max_shift: int = 1, local_patch: int = 4,
                 chunk_size: int = 4096, pixel_search: str = "grid", local_search: str = "tree") -> None:
        if pixel_search not in PIXEL_SEARCHES:
            raise DataError(f"unknown pixel search {pixel_search!r}; choose from {PIXEL_SEARCHES}")
        if local_search not in LOCAL_SEARCHES:
            raise DataError(f"unknown local search {local_search!r}; choose from {LOCAL_SEARCHES}")
        self.gallery, self.embed = gallery, embed
        self.pixel_search, self.local_search = pixel_search, local_search
        self._shift_index: nearsearch.ShiftIndex | None = None
        self.e_gallery = embed(gallery.images) if real_embeddings is None else real_embeddings
        if len(self.e_gallery) != len(gallery):
            raise DataError(f"{len(self.e_gallery)} real embeddings for {len(gallery)} real images")
        self.patient = torch.from_numpy(_patient_index(gallery.patient_ids, len(gallery)))
        self.n_patients = int(self.patient.max()) + 1 if len(gallery) else 0
        self.reid_score, self.cohort_k, self.max_shift = reid_score, cohort_k, max_shift
        self.local_patch = max(2, min(local_patch, min(gallery.images.shape[-2:]) // 2))
        self.chunk_size = chunk_size

    # -- re-identification embedding
    @torch.inference_mode()
    def reid(self, images: np.ndarray, exclude: np.ndarray | None = None,
             embeddings: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(score, best cosine similarity, index of the most similar training image)."""
        e = self.embed(images) if embeddings is None else embeddings
        q, g = _normalise(e), _normalise(self.e_gallery)
        n, m = len(q), len(g)
        score, best, where = np.full(n, -np.inf), np.full(n, -np.inf, np.float32), np.zeros(n, np.int64)
        if m == 0:
            return score, best, where
        rows = max(1, min(self.chunk_size, BLOCK_ELEMS // max(1, m)))
        for s in range(0, n, rows):
            sim = q[s : s + rows] @ g.T
            if exclude is not None:
                ex = torch.from_numpy(np.asarray(exclude[s : s + rows], np.int64))
                hit = ex >= 0
                sim[hit.nonzero()[:, 0], ex[hit]] = -float("inf")
            b, w = sim.max(dim=1)
            best[s : s + rows], where[s : s + rows] = b.numpy(), w.numpy()
            if self.reid_score == "max" or self.n_patients < 3:
                score[s : s + rows] = b.numpy()
                continue
            per = torch.full((len(sim), self.n_patients), -float("inf"))
            per = per.scatter_reduce(1, self.patient.expand(len(sim), -1), sim, reduce="amax")
            k = min(self.cohort_k, self.n_patients - 1)
            top = per.topk(k + 1, dim=1).values
            cohort = top[:, 1:]
            cohort = torch.where(torch.isfinite(cohort), cohort, top[:, :1])
            mu, sd = cohort.mean(1), cohort.std(1, unbiased=False) if k > 1 else torch.zeros(len(sim))
            score[s : s + rows] = ((top[:, 0] - mu) / (sd + 0.05)).numpy()
        return score, best, where

    # -- smoothed pixels, shift tolerant
    def pixel(self, images: np.ndarray, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(score = -distance, index of the nearest training image)."""
        s = pixel.usable_shift(images.shape, self.max_shift)
        ref = pixel.pixel_features(pixel.shifted_crop(self.gallery.images, 0, 0, s))
        best_d = np.full(len(images), np.inf, np.float32)
        best_i = np.zeros(len(images), np.int64)
        k = 1 if exclude is None else 2
        for dy in range(-s, s + 1):
            for dx in range(-s, s + 1):
                d, i = pixel.knn(pixel.pixel_features(pixel.shifted_crop(images, dy, dx, s)), ref, k=k)
                if exclude is not None and d.shape[1] > 1:
                    skip = i[:, 0] == exclude
                    d0, i0 = np.where(skip, d[:, 1], d[:, 0]), np.where(skip, i[:, 1], i[:, 0])
                else:
                    d0, i0 = d[:, 0], i[:, 0]
                better = d0 < best_d
                best_d[better], best_i[better] = d0[better], i0[better]
        return -best_d.astype(np.float64), best_i

    def pixel_within(self, images: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The pixel detector's decision at distance ``radius``: (distance, index of the nearest training image,
        within), exact where within (see `privdistill.nearsearch`; inf and -1 elsewhere). ``exhaustive``
        search: every distance exact, at the cost of a full search per shift."""
        if self.pixel_search == "exhaustive":
            neg_d, idx = self.pixel(images)
            d = (-neg_d).astype(np.float32)
            return d, idx, d < radius
        if self._shift_index is None:
            self._shift_index = nearsearch.ShiftIndex(self.gallery.images, self.max_shift)
        near = nearsearch.near_over_shifts(images, self._shift_index, radius)
        log.debug("filter.pixel_search", n=len(images), candidates=near.candidates)
        return near.distance, near.index, near.within

    # -- local structure: the best-matching patch
    @torch.no_grad()
    def local(self, images: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
        """Max over every patch position (stride 1) holding structure (centred energy >= the noise floor) and
        over training images of -||q_p - g_p||^2 / energy(q_p); -inf for an image without such a patch.
        Exhaustive (every score exact): positions outer, so each position's training patches are cut once."""
        p = self.local_patch
        g_all = torch.from_numpy(np.ascontiguousarray(self.gallery.images, np.float32))
        q_all = torch.from_numpy(np.ascontiguousarray(images, np.float32))
        h, w = images.shape[-2:]
        floor = self.local_floor
        m = len(g_all)
        rows = max(1, min(self.chunk_size, BLOCK_ELEMS // max(1, m)))
        best = torch.full((len(images),), -float("inf"))
        ex_all = None if exclude is None else torch.from_numpy(np.asarray(exclude, np.int64))
        for y in range(h - p + 1):
            for x in range(w - p + 1):
                g = g_all[:, :, y : y + p, x : x + p].reshape(m, -1)
                g_sq = (g * g).sum(1)
                q_pos = q_all[:, :, y : y + p, x : x + p].reshape(len(q_all), -1)
                for s in range(0, len(images), rows):
                    q = q_pos[s : s + rows]
                    energy = ((q - q.mean(1, keepdim=True)) ** 2).sum(1)
                    if not bool((energy >= floor).any()):
                        continue
                    d2 = ((q * q).sum(1, keepdim=True) - 2 * q @ g.T + g_sq).clamp_min(0)
                    if ex_all is not None:
                        ex = ex_all[s : s + rows]
                        hit = ex >= 0
                        d2[hit.nonzero()[:, 0], ex[hit]] = float("inf")
                    val = torch.where(energy >= floor, -d2.min(dim=1).values / energy.clamp_min(floor),
                                      torch.tensor(-float("inf")))
                    torch.maximum(best[s : s + rows], val, out=best[s : s + rows])
        return best.numpy().astype(np.float64)

    @property
    def local_floor(self) -> float:
        """Centred patch energy below which a patch carries no identifying structure."""
        return LOCAL_NOISE_FLOOR * self.gallery.images.shape[1] * self.local_patch**2

    def local_within(self, images: np.ndarray, threshold: float) -> np.ndarray:
        """The local detector's decision at ``threshold`` (score strictly above it): ``tree`` search exact up to
        float rounding (see `privdistill.localsearch`), ``exhaustive`` every score computed."""
        if self.local_search == "exhaustive":
            return self.local(images) > threshold
        res = localsearch.local_within(images, self.gallery.images, self.local_patch, threshold, self.local_floor,
                                       workers=max(1, torch.get_num_threads()))
        log.debug("filter.local_search", n=len(images), searched=res.searched, candidates=res.candidates)
        return res.within

    def scores(self, images: np.ndarray, detectors: tuple[str, ...] | list[str],
               exclude: np.ndarray | None = None) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for d in detectors:
            if d == "reid":
                out[d] = self.reid(images, exclude)[0]
            elif d == "pixel":
                out[d] = self.pixel(images, exclude)[0]
            elif d == "local":
                out[d] = self.local(images, exclude)
            else:
                raise DataError(f"unknown filter detector {d!r}; choose from {DETECTORS}")
        return out


def scorer_for(gallery: ImageSet, embed: Embed, cfg: FilterConfig, *, real_embeddings: np.ndarray | None = None
               ) -> GalleryScorer:
    return GalleryScorer(gallery, embed, real_embeddings=real_embeddings, reid_score=cfg.reid_score,
                         cohort_k=cfg.cohort_k, max_shift=cfg.pixel_max_shift, local_patch=cfg.local_patch,
                         chunk_size=cfg.chunk_size)


def calibrate_filter(scorer: GalleryScorer, null_images: np.ndarray, cfg: FilterConfig) -> FilterCalibration:
    """Conformal thresholds of ``cfg.detectors`` at ``cfg.max_fresh_drop`` split between them (see FilterCalibration)."""
    detectors = tuple(dict.fromkeys(cfg.detectors))
    if not cfg.pixel_near_duplicate:
        detectors = tuple(d for d in detectors if d != "pixel")
    if not detectors:
        raise DataError("filter.detectors is empty: the filter needs at least one detector")
    a = cfg.max_fresh_drop / len(detectors)
    null = scorer.scores(null_images, detectors)
    thr: dict[str, float] = {d: conformal_threshold(null[d], a) for d in detectors}
    cal = FilterCalibration(alpha=cfg.max_fresh_drop, n_null=int(len(null_images)), thresholds=thr,
                            reid_score=scorer.reid_score, cohort_k=scorer.cohort_k, local_patch=scorer.local_patch)
    log.info("filter.calibrated", alpha=cal.alpha, n_null=cal.n_null, **{f"threshold_{k}": round(v, 4) for k, v in thr.items()})
    return cal


def split_null(heldout: ImageSet, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Patient-disjoint (calibration-null, audit) indices of the held-out real images."""
    pid = _patient_index(heldout.patient_ids, len(heldout))
    n_p = int(pid.max()) + 1 if len(pid) else 0
    order = np.random.default_rng(seed).permutation(n_p)
    n_cal = min(n_p - 1, max(1, round(fraction * n_p))) if n_p > 1 else n_p
    cal_p = np.zeros(n_p, bool)
    cal_p[order[:n_cal]] = True
    return np.flatnonzero(cal_p[pid]), np.flatnonzero(~cal_p[pid])


@dataclass
class FilterResult:
    """Per-synthetic-image filter decisions (indices refer to the synthetic set)."""

    kept: np.ndarray  # int64 indices
    dropped: np.ndarray  # int64 indices
    best_similarity: np.ndarray  # float32 [N]: cosine similarity to the closest real embedding
    best_real_index: np.ndarray  # int64 [N]: that real image
    reid_match: np.ndarray  # bool [N]: the re-id detector's score passed its threshold
    pixel_match: np.ndarray  # bool [N]: pixel near-duplicate (all False when the check is off)
    # float32 [N]: smoothed-pixel L2 distance to the nearest real image (calibrated filter: exact when under the
    # threshold, inf when no training image is that close)
    pixel_distance: np.ndarray | None
    pixel_real_index: np.ndarray | None  # int64 [N] (-1: none under the calibrated threshold)
    threshold: float
    pixel_threshold: float | None
    enabled: bool = True
    review_grid_max: int = 32
    local_match: np.ndarray | None = None  # bool [N]: a patch-level copy (calibrated filter only)
    calibration: FilterCalibration | None = None

    @property
    def local(self) -> np.ndarray:
        return np.zeros_like(self.reid_match) if self.local_match is None else self.local_match

    @property
    def flagged(self) -> np.ndarray:
        return self.reid_match | self.pixel_match | self.local

    @property
    def reasons(self) -> list[tuple[str, ...]]:
        """Why each synthetic image was (or, with the filter off, would have been) dropped."""
        return [
            tuple(r for r, hit in (("reid", a), ("pixel", b), ("local", c)) if hit)
            for a, b, c in zip(self.reid_match.tolist(), self.pixel_match.tolist(), self.local.tolist(), strict=True)
        ]


def _normalise(e: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(e, np.float32))
    return torch.nn.functional.normalize(t, dim=1)
@torch.inference_mode()
def best_matches(query: np.ndarray, ref: np.ndarray, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Highest cosine similarity of each query embedding to any reference, and its index.

    One matrix product per (chunk_size queries x block of references); memory stays bounded."""
    q, r = _normalise(query), _normalise(ref)
    n, m = len(q), len(r)
    best = torch.full((n,), -float("inf"))
    where = torch.zeros(n, dtype=torch.long)
    if m == 0:
        return best.numpy(), where.numpy()
    cols = max(1024, BLOCK_ELEMS // max(1, chunk_size))
    r_t = r.T.contiguous()
    for s in range(0, n, chunk_size):
        qc = q[s : s + chunk_size]
        b, w = best[s : s + chunk_size], where[s : s + chunk_size]  # views: updated in place
        for c in range(0, m, cols):
            val, idx = (qc @ r_t[:, c : c + cols]).max(dim=1)
            better = val > b
            b[better], w[better] = val[better], idx[better] + c
    return best.numpy(), where.numpy()


def pixel_threshold(real: ImageSet, ratio: float, *, features: np.ndarray | None = None, seed: int = 0) -> float | None:
    """``ratio`` x median distance from a training image to its nearest training image of another patient."""
    feats = pixel.pixel_features(real.images) if features is None else features
    pids = real.patient_ids if real.patient_ids is not None else np.arange(len(real)).astype(str)
    if len(np.unique(pids)) < 2:
        return None
    sample = np.arange(len(feats))
    if len(sample) > MEDIAN_SAMPLE:  # the median is estimated on a fixed random subset of queries
        sample = np.sort(np.random.default_rng(seed).choice(len(feats), MEDIAN_SAMPLE, replace=False))
    # each query is itself a reference, so its nearest is itself and "other patient" excludes its own
    _, _, d_other = pixel.nearest_and_other_patient(feats[sample], feats, np.asarray(pids))
    d_other = d_other[np.isfinite(d_other)]
    return float(ratio * np.median(d_other)) if len(d_other) else None


def filter_synthetic(
    synthetic: ImageSet,
    real_train: ImageSet,
    *,
    embed: Embed,
    cfg: FilterConfig,
    threshold: float | None = None,
    calibration: FilterCalibration | None = None,
    real_embeddings: np.ndarray | None = None,
    scorer: GalleryScorer | None = None,
) -> FilterResult:
    """Compare every synthetic image with all real training images and drop the ones a detector flags.

    With ``calibration`` (what the pipeline uses): its detectors at their conformal thresholds (see
    FilterCalibration). Without it, explicit thresholds: the re-id cosine ``threshold`` and the pixel check at
    ``cfg.pixel_ratio`` x the median other-patient distance (the older, uncalibrated rule; tests and audits)."""
    if synthetic.images.shape[1:] != real_train.images.shape[1:]:
        raise DataError(
            f"synthetic images {synthetic.images.shape[1:]} and real images {real_train.images.shape[1:]} "
            "differ in shape: sample at the training resolution"
        )
    if calibration is None and threshold is None:
        raise DataError("filter_synthetic needs a calibration (calibrate_filter) or an explicit re-id threshold")
    sc = scorer or scorer_for(real_train, embed, cfg, real_embeddings=real_embeddings)
    n = len(synthetic)
    reid_score, best, where = sc.reid(synthetic.images)
    pix_d = pix_i = pix_thr = None
    pixel_match = np.zeros(n, bool)
    local_match = None
    if calibration is None:
        assert threshold is not None  # refused above when there is no calibration
        reid_match = best >= float(threshold)
        if cfg.pixel_near_duplicate and len(real_train) and n:
            # shift-tolerant: a copy displaced by a pixel or two is as identifying as an exact one
            neg_d, pix_i = sc.pixel(synthetic.images)
            pix_d = (-neg_d).astype(np.float32)
            pix_thr = pixel_threshold(real_train, cfg.pixel_ratio)
            if pix_thr is None:
                log.warning("filter.pixel_check_skipped", reason="fewer than two patients in the training set")
            else:
                pixel_match = pix_d < pix_thr
    else:
        thr = calibration.thresholds
        reid_match = reid_score > thr["reid"] if "reid" in thr else np.zeros(n, bool)
        if "pixel" in thr and n:
            pix_thr = float(-thr["pixel"])  # as a distance: dropped when strictly closer than this
            pix_d, pix_i, pixel_match = sc.pixel_within(synthetic.images, pix_thr)
        if "local" in thr and n:
            local_match = sc.local_within(synthetic.images, thr["local"])
        # on the cosine scale only for the plain best-match score (the histogram and review page draw it)
        threshold = thr.get("reid", float("nan")) if calibration.reid_score == "max" else float("nan")

    would_drop = reid_match | pixel_match | (local_match if local_match is not None else False)
    if not cfg.enabled:
        log.warning("filter.disabled", n_synthetic=n, would_drop=int(would_drop.sum()))
        would_drop = np.zeros_like(would_drop)
    result = FilterResult(
        kept=np.flatnonzero(~would_drop),
        dropped=np.flatnonzero(would_drop),
        best_similarity=best.astype(np.float32),
        best_real_index=where.astype(np.int64),
        reid_match=np.asarray(reid_match, bool),
        pixel_match=pixel_match,
        pixel_distance=pix_d,
        pixel_real_index=None if pix_i is None else pix_i.astype(np.int64),
        threshold=float(threshold),
        pixel_threshold=pix_thr,
        enabled=cfg.enabled,
        review_grid_max=cfg.review_grid_max,
        local_match=local_match,
        calibration=calibration,
    )
    log.info(
        "filter.done", n_synthetic=n, kept=len(result.kept), dropped=len(result.dropped),
        reid=int(result.reid_match.sum()), pixel=int(pixel_match.sum()), local=int(result.local.sum()),
    )  # fmt: skip
    return result


# --------------------------------------------------------------------------- outputs
def privacy_report(result: FilterResult, *, calibration: dict[str, Any]) -> dict[str, Any]:
    """Aggregate numbers only: nothing per image, nothing that identifies a real image or patient.
    ``calibration``: the re-identification model's pair calibration (a diagnostic, reported as ``reid_pairs``)."""
    n = len(result.best_similarity)
    finite = result.best_similarity[np.isfinite(result.best_similarity)]
    on = result.enabled
    cal = result.calibration.as_dict() if result.calibration is not None else {"method": "explicit thresholds"}
    return {
        "filter_enabled": result.enabled,
        "n_synthetic": n,
        "kept": int(len(result.kept)),
        "dropped": int(len(result.dropped)),
        "dropped_by_reason": {
            "reid": int(result.reid_match.sum()) if on else 0,
            "pixel": int(result.pixel_match.sum()) if on else 0,
            "local": int(result.local.sum()) if on else 0,
            "both": int((result.reid_match & result.pixel_match).sum()) if on else 0,
        },
        "would_drop_if_enabled": int(result.flagged.sum()),
        # the re-id detector's threshold on the cosine scale (None: no plain best-match re-id detector)
        "threshold": result.threshold if math.isfinite(result.threshold) else None,
        "calibration": cal,
        "reid_pairs": {k: calibration.get(k) for k in ("tpr", "fpr", "auc", "n_pos", "n_neg", "threshold")},
        "pixel_near_duplicate": result.pixel_threshold is not None,
        "pixel_threshold": result.pixel_threshold,
        "similarity_quantiles": {
            f"q{round(q * 100):02d}": float(np.quantile(finite, q)) if len(finite) else None for q in QUANTILES
        },
    }


def write_decisions(result: FilterResult, path: Path) -> None:
    """Per-synthetic-image decisions for the local review page (index -1: no pixel check ran)."""
    n = len(result.best_similarity)
    pix_i = np.full(n, -1, np.int64) if result.pixel_real_index is None else result.pixel_real_index
    pix_d = np.full(n, np.nan, np.float32) if result.pixel_distance is None else result.pixel_distance
    with open(path, "wb") as fh:
        np.savez(fh, best_similarity=result.best_similarity, best_real_index=result.best_real_index,
                 reid_match=result.reid_match, pixel_match=result.pixel_match, local_match=result.local,
                 pixel_real_index=pix_i,
                 pixel_distance=pix_d.astype(np.float32), dropped=result.dropped,
                 threshold=np.float64(result.threshold), enabled=np.bool_(result.enabled))


def write_filter_outputs(
    result: FilterResult, synthetic: ImageSet, real_train: ImageSet, out_dir: Path, *, calibration: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write kept.npz, privacy_report.json (with ``extra`` aggregate sections merged in),
    similarity_histogram.svg and the local-only review/ folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = synthetic.subset(result.kept)
    kept.patient_ids = None
    kept.save(out_dir / KEPT_FILE)
    report = {**privacy_report(result, calibration=calibration), **(extra or {})}
    (out_dir / "privacy_report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    write_similarity_histogram(result.best_similarity, result.threshold, out_dir / "similarity_histogram.svg")

    review = out_dir / "review"
    review.mkdir(exist_ok=True)
    (review / "README.txt").write_text(REVIEW_README)
    write_decisions(result, review / DECISIONS_FILE)
    flagged = result.dropped if result.enabled else np.flatnonzero(result.flagged)
    shown = flagged[: result.review_grid_max]
    if len(shown):
        partner = result.best_real_index[shown].copy()
        if result.pixel_real_index is not None:  # the pixel partner where re-id did not match and one was found
            use_pixel = ~result.reid_match[shown] & (result.pixel_real_index[shown] >= 0)
            partner[use_pixel] = result.pixel_real_index[shown][use_pixel]
        pairs = np.stack([synthetic.images[shown], real_train.images[partner]], 1)
        save_grid(pairs.reshape(-1, *synthetic.images.shape[1:]), review / "dropped_review.png", ncols=8)
    log.info("filter.outputs_written", kept=report["kept"], dropped=report["dropped"], reviewed=len(shown))
    return report
