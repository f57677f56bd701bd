"""Evaluation metrics: pixel-space memorization, independent re-identification rate, TSTR/TRTR
downstream accuracy and a domain-specific Fréchet distance."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import scipy.linalg
import scipy.stats
import structlog
import torch
import torch.nn.functional as F

from privdistill import pixel
from privdistill.classifier import accuracy, train_classifier
from privdistill.data.types import ImageSet
from privdistill.errors import DataError

log = structlog.get_logger(__name__)

# Memorization is measured on raw pixels (no blur, no pooling of the *sample*): on Fashion-MNIST,
# Gaussian blur and pooling shrink the distance between two different images about as fast as they
# shrink sampler noise. Removing the *expected noise energy* from squared distances instead (see
# `memorization`) keeps all the discriminative detail. A sample that is a *blurred* copy (what a
# denoiser tends to give back) is far from its source in raw pixels, so the reference is also
# compared blurred by each of MEMO_BLURS (px): a matched filter for the blur, one hypothesis each.
MEMO_SIGMA = 0.0
MEMO_POOL = 1
MAX_SHIFT = 1
MEMO_BLURS = (0.0, 0.5, 0.7, 1.0)
# below this RMS per-pixel difference ([-1, 1] scale) beyond the noise, a sample's nearest image of
# another patient is indistinguishable from its nearest image: the ratio test cannot decide
UNDECIDABLE_RMS = 1e-3
_LAPLACE = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]]).view(1, 1, 3, 3)


def noise_sigma(images: np.ndarray) -> np.ndarray:
    """Per-image std of additive white noise, Immerkær's (1996) fast estimator:
    sqrt(π/2) · mean|I ∗ N| / 6 with N the 3×3 difference-of-Laplacians mask (channels averaged)."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    n, c, h, w = x.shape
    if h < 3 or w < 3 or n == 0:
        return np.zeros(n, np.float32)
    r = F.conv2d(x.reshape(n * c, 1, h, w), _LAPLACE).abs().reshape(n, -1)
    return (r.mean(1) * math.sqrt(math.pi / 2) / 6.0).numpy()


def binomial_ci(k: int, n: int, *, k_high: int | None = None) -> list[float] | None:
    """Wilson 95% interval of a rate k/n; with ``k_high``, the upper end is that of k_high/n (used to
    count undecidable samples as positives in the upper bound). None when n is 0."""
    if n <= 0:
        return None
    lo = scipy.stats.binomtest(int(k), int(n)).proportion_ci(0.95, method="wilson").low
    hi = scipy.stats.binomtest(int(k if k_high is None else k_high), int(n)).proportion_ci(0.95, method="wilson").high
    return [float(lo), float(hi)]


def check_reference(ref: ImageSet) -> np.ndarray:
    """The reference's patient ids (one patient per image when it has none), or a DataError naming why
    the memorization test cannot be run against it."""
    n = len(ref)
    pids = np.asarray(ref.patient_ids if ref.patient_ids is not None else np.arange(n).astype(str))
    if n < 2 or len(np.unique(pids)) < 2:
        raise DataError(
            f"the memorization reference has {n} image(s) of {len(np.unique(pids))} patient(s): a copy is judged "
            "against the nearest image of another patient, so pass the whole training set (at least 2 patients)"
        )
    flat = np.asarray(ref.images, dtype=np.float32).reshape(n, -1)
    if not np.isfinite(flat).all():
        raise DataError("the memorization reference has NaN or infinite pixel values; re-run ingest")
    if float(np.ptp(flat, axis=0).max()) == 0.0:
        raise DataError(
            f"the memorization reference is degenerate: all {n} images are identical, so no sample can be told "
            "apart from a copy; check the ingest output"
        )
    return pids


def _hypothesis(samples: np.ndarray, ref: np.ndarray, pids: np.ndarray, max_shift: int, k: int,
                sigma: float = MEMO_SIGMA) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shift-tolerant L2 (raw, or both sides blurred by ``sigma`` px): (nearest distance, its index, its
    shift (dy, dx), nearest distance to an image of any other patient than the nearest one's). Exact:
    each shift's k nearest hold at most k − 1 images of one patient."""
    d, idx, sh, _ = pixel.knn_over_shifts(samples, ref, max_shift, k=k, sigma=sigma, pool=MEMO_POOL)
    d = d.astype(np.float64)
    other = pids[idx] != pids[idx[:, 0]][:, None]
    d_other = d[np.arange(len(d)), other.argmax(1)]
    return d[:, 0], idx[:, 0], sh[:, 0], d_other


def copy_distances(
    samples: np.ndarray, ref: ImageSet, *, max_shift: int = MAX_SHIFT, blurs: tuple[float, ...] = MEMO_BLURS
) -> dict[str, np.ndarray]:
    """Noise-debiased, shift-tolerant L2 distances from each sample to its nearest reference image
    and to the nearest reference image of any other patient, once per reference blur in ``blurs``
    (arrays [N, len(blurs)]; see `memorization`)."""
    if not blurs or blurs[0] != 0:
        raise ValueError(f"blurs must start with 0, the raw comparison the noise estimate uses; got {blurs}")
    pids = check_reference(ref)
    _, counts = np.unique(pids, return_counts=True)
    k = min(len(ref), int(counts.max()) + 1)
    s = pixel.usable_shift(samples.shape, max_shift)
    near, index, other = [], [], []
    sig = None
    for b in blurs:
        ref_b = ref.images if b == 0 else pixel.pixel_features(ref.images, sigma=b, pool=1).reshape(ref.images.shape)
        d, i, sh, d_o = _hypothesis(samples, ref_b, pids, max_shift, k)
        if sig is None:
            # the noise level: the smaller of the sample's own estimate and that of its residual against
            # its nearest image (content shared by all images, e.g. a texture, cancels in the residual
            # and so cannot inflate it; a residual of different content reads as noise, the sample's own does not)
            x = np.stack([pixel.shifted_crop(samples[j : j + 1], int(sh[j, 0]), int(sh[j, 1]), s)[0] for j in range(len(samples))])
            a = pixel.shifted_crop(ref.images[i], 0, 0, s)
            sig = np.minimum(noise_sigma(x), noise_sigma(x - a)).astype(np.float64)
            noise2 = sig**2 * float(np.prod(x.shape[1:]))
            floor2 = UNDECIDABLE_RMS**2 * float(np.prod(x.shape[1:]))
        near.append(np.sqrt(np.maximum(d**2 - noise2, 0.0)))
        other.append(np.sqrt(np.maximum(d_o**2 - noise2, 0.0)))
        index.append(i)
    assert sig is not None  # blurs is non-empty (checked above), so the first pass set it
    return {
        "nearest_distance": np.stack(near, 1),
        "other_distance": np.stack(other, 1),
        "nearest_index": np.stack(index, 1).astype(np.int64),
        "noise_sigma": sig,
        "decidable": np.stack(other, 1) ** 2 > floor2,
        "blurs": np.asarray(blurs, np.float64),
    }


def memorization(
    samples: np.ndarray,
    train: ImageSet,
    *,
    ratio: float = 1 / 3,
    max_shift: int = MAX_SHIFT,
    blurs: tuple[float, ...] = MEMO_BLURS,
    embed: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict:
    """Fraction of generated samples that copy a training image, with its 95% interval.

    A sample x is **memorized** when d(x, a) < ratio · d(x, b) for some detector, where a is its
    nearest training image and b the nearest training image of any *other patient* than a's (so
    several visits of one patient do not hide a copy). The pixel detectors use L2 in raw pixel space
    ([-1, 1] scale), made robust in three ways:

    - **noise-debiased**: d² = max(‖x − y‖² − P·σ̂², 0), with P the number of pixels compared and σ̂
      the smaller of two white-noise estimates (Immerkær): of the sample, and of its residual against
      its nearest image, so content all images share (a texture) cannot inflate it;
    - **shift-tolerant**: the minimum over integer shifts of x by up to ``max_shift`` pixels in
      each direction, comparing the image interiors (a ``max_shift`` border is cropped);
    - **blur-matched**: one detector per reference blur in ``blurs`` (Gaussian σ in px; 0 = raw), so
      a smoothed copy is compared with its smoothed source.

    With ``embed`` (images → feature vectors), a second detector runs the same ratio test on
    L2-normalised features (no noise removal, no shifts).

    A sample no detector calls memorized and for which some detector cannot tell the nearest image
    from the nearest other-patient image (their distances, noise removed, both ~0: e.g. patients
    sharing an image) is **undecidable**: counted, never silently "not memorized". ``ci`` is the
    Wilson 95% interval with undecidable samples counted as memorized in its upper end.

    Images without patient ids count as one patient each (then a blend of one person's two images
    is not caught). Raises DataError for a reference of fewer than 2 patients or of identical images.
    Returns ``rate``, ``count``, ``n``, ``undecidable`` (count), ``ci`` ([lo, hi] or None),
    ``by_detector`` (counts), and per-sample arrays ``ratio`` (smallest over detectors; NaN when
    none decides), ``memorized``, ``undecidable_mask``, ``nearest_index`` (of the detector with the
    smallest ratio), ``nearest_distance``, ``other_distance`` (raw detector) and ``noise_sigma``.
    """
    pids = check_reference(train)
    n = len(samples)
    if n == 0:
        return {"rate": 0.0, "count": 0, "n": 0, "undecidable": 0, "ci": None, "by_detector": {},
                "ratio": np.zeros(0), "memorized": np.zeros(0, bool), "undecidable_mask": np.zeros(0, bool),
                "nearest_index": np.zeros(0, np.int64)}
    dist = copy_distances(samples, train, max_shift=max_shift, blurs=blurs)
    ok = dist["decidable"]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(ok, dist["nearest_distance"] / dist["other_distance"], np.nan)
    names = [f"pixel_blur{b:g}" if b else "pixel" for b in blurs]
    hits = r < ratio
    undecided = ~ok
    index = dist["nearest_index"]
    if embed is not None:
        e_s = F.normalize(torch.from_numpy(np.asarray(embed(samples), np.float32)), dim=1).numpy()
        e_r = F.normalize(torch.from_numpy(np.asarray(embed(train.images), np.float32)), dim=1).numpy()
        d_e, i_e, o_e = pixel.nearest_and_other_patient(e_s, e_r, pids)
        ok_e = o_e > UNDECIDABLE_RMS
        with np.errstate(divide="ignore", invalid="ignore"):
            r_e = np.where(ok_e, d_e / o_e, np.nan)
        r = np.concatenate([r, r_e[:, None]], 1)
        hits = np.concatenate([hits, (r_e < ratio)[:, None]], 1)
        undecided = np.concatenate([undecided, ~ok_e[:, None]], 1)
        index = np.concatenate([index, i_e[:, None]], 1)
        names.append("feature")
    memorized = hits.any(1)
    undecidable = ~memorized & undecided.any(1)
    r_or_inf = np.where(np.isnan(r), np.inf, r)
    best = np.argmin(r_or_inf, 1)
    r_min = np.where(np.isinf(r_or_inf.min(1)), np.nan, r_or_inf.min(1))
    count, n_und = int(memorized.sum()), int(undecidable.sum())
    rate = count / n
    by_detector = {name: int(hits[:, j].sum()) for j, name in enumerate(names)}
    log.info("memorization", n=n, rate=rate, undecidable=n_und, by_detector=by_detector)
    return {
        "rate": rate, "count": count, "n": n, "undecidable": n_und,
        "ci": binomial_ci(count, n, k_high=count + n_und), "by_detector": by_detector,
        "ratio": r_min, "memorized": memorized, "undecidable_mask": undecidable,
        "nearest_index": index[np.arange(n), best],
        "nearest_distance": dist["nearest_distance"][:, 0], "other_distance": dist["other_distance"][:, 0],
        "noise_sigma": dist["noise_sigma"],
    }


def data_copying(
    samples: np.ndarray, train: ImageSet, fresh: np.ndarray, *, max_shift: int = MAX_SHIFT,
    n_boot: int = 1000, seed: int = 0,
) -> dict:
    """Data-copying test in the style of Meehan et al. (2020): the ROC AUC with which samples sit
    *closer* to their nearest training image than fresh real images (same distribution, never trained
    on) sit to theirs. 0.5: samples are no closer to the training set than new data (no copying);
    towards 1: samples copy. "Closer" is scale-free, the ratio of the distance to the nearest training
    image to that to the nearest image of another patient (shift-tolerant L2 after a 1-px blur), so
    samples of worse quality, far from every image, do not read as anti-copying; ``distance_auc`` is the
    plain nearest-distance version. Returns ``auc``, ``ci`` (95% percentile bootstrap, samples and fresh
    images resampled independently, ``n_boot`` resamples), ``distance_auc``, ``n_samples`` and
    ``n_fresh``; the AUCs and ci are None when either set is empty."""
    from privdistill.audit.roc import roc_auc

    out: dict = {"auc": None, "ci": None, "distance_auc": None, "n_samples": int(len(samples)), "n_fresh": int(len(fresh))}
    if len(samples) == 0 or len(fresh) == 0:
        return out
    pids = check_reference(train)
    k = min(len(train), int(np.unique(pids, return_counts=True)[1].max()) + 1)
    near_s, _, _, other_s = _hypothesis(samples, train.images, pids, max_shift, k, sigma=1.0)
    near_f, _, _, other_f = _hypothesis(fresh, train.images, pids, max_shift, k, sigma=1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        score_s = -np.nan_to_num(near_s / other_s, nan=1.0)  # 0/0: a duplicate across patients, no evidence
        score_f = -np.nan_to_num(near_f / other_f, nan=1.0)
    out["auc"] = roc_auc(score_s, score_f)
    out["distance_auc"] = roc_auc(-near_s, -near_f)
    rng = np.random.default_rng(seed)
    boots = [roc_auc(score_s[rng.integers(0, len(score_s), len(score_s))], score_f[rng.integers(0, len(score_f), len(score_f))])
             for _ in range(n_boot)]
    out["ci"] = [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))]
    log.info("data_copying", n_samples=len(samples), n_fresh=len(fresh), auc=out["auc"], distance_auc=out["distance_auc"])
    return out


def reid_rate(
    samples: np.ndarray,
    train_embeddings: np.ndarray,
    *,
    embed: Callable[[np.ndarray], np.ndarray],
    threshold: float,
    chunk: int = 4096,
) -> float:
    """Fraction of samples whose best cosine similarity to any training embedding is ≥ threshold,
    under an independently trained re-identification model ``embed`` (images → embeddings)."""
    if len(samples) == 0:
        return 0.0
    ref = torch.from_numpy(np.ascontiguousarray(train_embeddings, dtype=np.float32))
    ref = F.normalize(ref, dim=1)
    hits = 0
    for s in range(0, len(samples), chunk):
        e = torch.from_numpy(np.ascontiguousarray(embed(samples[s : s + chunk]), dtype=np.float32))
        e = F.normalize(e, dim=1)
        best = torch.full((len(e),), -1.0)
        for r in range(0, len(ref), chunk):
            best = torch.maximum(best, (e @ ref[r : r + chunk].T).max(1).values)
        hits += int((best >= threshold).sum())
    return hits / len(samples)


def tstr_accuracy(synthetic: ImageSet, test: ImageSet, n_classes: int, *, steps: int, batch_size: int, seed: int) -> float:
    """Train on synthetic samples and their labels, test on the real held-out test set."""
    if synthetic.labels is None or test.labels is None:
        raise DataError("TSTR accuracy needs class labels on both the synthetic and the test set")
    clf = train_classifier(synthetic.images, synthetic.labels, n_classes, steps=steps, batch_size=batch_size, seed=seed)
    return accuracy(clf, test.images, test.labels)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray, eps: float = 1e-6) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½), with the usual fix for a singular product."""
    diff = mu1 - mu2
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(cov1 @ cov2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(cov1)) * eps
            covmean = scipy.linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))


def fid_domain(real_test_feats: np.ndarray, synth_feats: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two feature sets from `classifier.features` of a
    classifier trained on the REAL training data. Domain-specific: no Inception weights are used,
    so values are not comparable with published FIDs, only between runs with the same classifier."""
    a = np.asarray(real_test_feats, dtype=np.float64)
    b = np.asarray(synth_feats, dtype=np.float64)
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
