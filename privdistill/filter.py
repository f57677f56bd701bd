"""The privacy filter: drop synthetic images that the re-identification embedding links to a real patient,
or that are pixel-space near-duplicates of a training image; write the aggregate report and local review."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import structlog
import torch

from privdistill import pixel
from privdistill.config import FilterConfig
from privdistill.data.types import ImageSet
from privdistill.errors import DataError
from privdistill.imaging import save_grid

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


@dataclass
class FilterResult:
    """Per-synthetic-image filter decisions (indices refer to the synthetic set)."""

    kept: np.ndarray  # int64 indices
    dropped: np.ndarray  # int64 indices
    best_similarity: np.ndarray  # float32 [N]: cosine similarity to the closest real embedding
    best_real_index: np.ndarray  # int64 [N]: that real image
    reid_match: np.ndarray  # bool [N]: best_similarity >= threshold
    pixel_match: np.ndarray  # bool [N]: pixel near-duplicate (all False when the check is off)
    pixel_distance: np.ndarray | None  # float32 [N]: smoothed-pixel L2 distance to the nearest real image
    pixel_real_index: np.ndarray | None  # int64 [N]
    threshold: float
    pixel_threshold: float | None
    enabled: bool = True
    review_grid_max: int = 32
    synthetic: ImageSet | None = field(default=None, repr=False)

    @property
    def reasons(self) -> list[tuple[str, ...]]:
        """Why each synthetic image was (or, with the filter off, would have been) dropped."""
        return [
            tuple(r for r, hit in (("reid", a), ("pixel", b)) if hit)
            for a, b in zip(self.reid_match.tolist(), self.pixel_match.tolist())
        ]

    def kept_set(self) -> ImageSet:
        if self.synthetic is None:
            raise DataError("this FilterResult holds no synthetic set")
        out = self.synthetic.subset(self.kept)
        out.patient_ids = None
        return out


def _normalise(e: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(e, np.float32))
    return torch.nn.functional.normalize(t, dim=1)


@torch.no_grad()
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
    threshold: float,
    cfg: FilterConfig,
    real_embeddings: np.ndarray | None = None,
) -> FilterResult:
    """Compare every synthetic image with all real training images (embeddings, then smoothed pixels)."""
    if synthetic.images.shape[1:] != real_train.images.shape[1:]:
        raise DataError(
            f"synthetic images {synthetic.images.shape[1:]} and real images {real_train.images.shape[1:]} "
            "differ in shape: sample at the training resolution"
        )
    e_real = embed(real_train.images) if real_embeddings is None else real_embeddings
    if len(e_real) != len(real_train):
        raise DataError(f"{len(e_real)} real embeddings for {len(real_train)} real images")
    best, where = best_matches(embed(synthetic.images), e_real, cfg.chunk_size)
    reid_match = best >= threshold

    pix_d = pix_i = pix_thr = None
    pixel_match = np.zeros(len(synthetic), bool)
    if cfg.pixel_near_duplicate and len(real_train) and len(synthetic):
        # shift-tolerant: a copy displaced by a pixel or two is as identifying as an exact one
        pix_d, pix_i, f_real = pixel.nearest_over_shifts(synthetic.images, real_train.images, cfg.pixel_max_shift)
        pix_thr = pixel_threshold(real_train, cfg.pixel_ratio, features=f_real)
        if pix_thr is None:
            log.warning("filter.pixel_check_skipped", reason="fewer than two patients in the training set")
        else:
            pixel_match = pix_d < pix_thr

    would_drop = reid_match | pixel_match
    if not cfg.enabled:
        log.warning("filter.disabled", n_synthetic=len(synthetic), would_drop=int(would_drop.sum()))
        would_drop = np.zeros_like(would_drop)
    result = FilterResult(
        kept=np.flatnonzero(~would_drop),
        dropped=np.flatnonzero(would_drop),
        best_similarity=best.astype(np.float32),
        best_real_index=where.astype(np.int64),
        reid_match=reid_match,
        pixel_match=pixel_match,
        pixel_distance=pix_d,
        pixel_real_index=None if pix_i is None else pix_i.astype(np.int64),
        threshold=float(threshold),
        pixel_threshold=pix_thr,
        enabled=cfg.enabled,
        review_grid_max=cfg.review_grid_max,
        synthetic=synthetic,
    )
    log.info(
        "filter.done", n_synthetic=len(synthetic), kept=len(result.kept), dropped=len(result.dropped),
        reid=int(reid_match.sum()), pixel=int(pixel_match.sum()),
    )  # fmt: skip
    return result


# --------------------------------------------------------------------------- outputs
def privacy_report(result: FilterResult, *, calibration: dict[str, Any]) -> dict[str, Any]:
    """Aggregate numbers only: nothing per image, nothing that identifies a real image or patient."""
    n = len(result.best_similarity)
    finite = result.best_similarity[np.isfinite(result.best_similarity)]
    return {
        "filter_enabled": result.enabled,
        "n_synthetic": n,
        "kept": int(len(result.kept)),
        "dropped": int(len(result.dropped)),
        "dropped_by_reason": {
            "reid": int(result.reid_match.sum()) if result.enabled else 0,
            "pixel": int(result.pixel_match.sum()) if result.enabled else 0,
            "both": int((result.reid_match & result.pixel_match).sum()) if result.enabled else 0,
        },
        "would_drop_if_enabled": int((result.reid_match | result.pixel_match).sum()),
        "threshold": result.threshold,
        "calibration": {k: calibration.get(k) for k in ("tpr", "fpr", "auc", "n_pos", "n_neg")},
        "pixel_near_duplicate": result.pixel_threshold is not None,
        "pixel_threshold": result.pixel_threshold,
        "similarity_quantiles": {
            f"q{round(q * 100):02d}": float(np.quantile(finite, q)) if len(finite) else None for q in QUANTILES
        },
    }


def _histogram(similarity: np.ndarray, threshold: float, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(similarity[np.isfinite(similarity)], bins=50, color="tab:blue", alpha=0.8)
    ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("cosine similarity to the closest real training image")
    ax.set_ylabel("synthetic images")
    ax.set_title("Re-identification similarity of synthetic samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def write_decisions(result: FilterResult, path: Path) -> None:
    """Per-synthetic-image decisions for the local review page (index -1: no pixel check ran)."""
    n = len(result.best_similarity)
    pix_i = np.full(n, -1, np.int64) if result.pixel_real_index is None else result.pixel_real_index
    pix_d = np.full(n, np.nan, np.float32) if result.pixel_distance is None else result.pixel_distance
    with open(path, "wb") as fh:
        np.savez(fh, best_similarity=result.best_similarity, best_real_index=result.best_real_index,
                 reid_match=result.reid_match, pixel_match=result.pixel_match, pixel_real_index=pix_i,
                 pixel_distance=pix_d.astype(np.float32), dropped=result.dropped,
                 threshold=np.float64(result.threshold), enabled=np.bool_(result.enabled))


def write_filter_outputs(
    result: FilterResult, synthetic: ImageSet, real_train: ImageSet, out_dir: Path, *, calibration: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write kept.npz, privacy_report.json (with ``extra`` aggregate sections merged in),
    similarity_histogram.png and the local-only review/ folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = synthetic.subset(result.kept)
    kept.patient_ids = None
    kept.save(out_dir / "kept.npz")
    report = {**privacy_report(result, calibration=calibration), **(extra or {})}
    (out_dir / "privacy_report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    _histogram(result.best_similarity, result.threshold, out_dir / "similarity_histogram.png")

    review = out_dir / "review"
    review.mkdir(exist_ok=True)
    (review / "README.txt").write_text(REVIEW_README)
    write_decisions(result, review / DECISIONS_FILE)
    flagged = result.dropped if result.enabled else np.flatnonzero(result.reid_match | result.pixel_match)
    shown = flagged[: result.review_grid_max]
    if len(shown):
        use_pixel = ~result.reid_match[shown] & (result.pixel_real_index is not None)
        partner = result.best_real_index[shown].copy()
        if result.pixel_real_index is not None:
            partner[use_pixel] = result.pixel_real_index[shown][use_pixel]
        pairs = np.stack([synthetic.images[shown], real_train.images[partner]], 1)
        save_grid(pairs.reshape(-1, *synthetic.images.shape[1:]), review / "dropped_review.png", ncols=8)
    log.info("filter.outputs_written", kept=report["kept"], dropped=report["dropped"], reviewed=len(shown))
    return report
