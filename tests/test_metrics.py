"""Memorization on real Fashion-MNIST (noisy, shifted and multi-visit copies vs fresh images),
re-identification rate, classifier determinism and the domain Fréchet distance."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from privdistill.classifier import accuracy, features, train_classifier
from privdistill.data.types import ImageSet
from privdistill.metrics import fid_domain, frechet_distance, memorization, noise_sigma, reid_rate
from privdistill.pixel import pixel_features

FMNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = [0, 2, 3, 4, 6, 7, 9]  # tops (the most alike classes), sneakers, boots
N_PATIENTS, N_MULTI = 400, 50  # 50 patients have 3 visits: 500 training images


def _idx(split: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(FMNIST / f"{split}-images-idx3-ubyte.gz") as fh:
        x = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(FMNIST / f"{split}-labels-idx1-ubyte.gz") as fh:
        y = np.frombuffer(fh.read(), np.uint8, offset=8).astype(np.int64)
    return x.astype(np.float32) / 127.5 - 1.0, y


def _shift1(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image shifted by one pixel up, down, left or right (background fills in)."""
    out = np.full_like(images, -1.0)
    for i, img in enumerate(images):
        axis, step = int(rng.integers(1, 3)), int(rng.choice([-1, 1]))
        src = [slice(None)] * 3
        dst = [slice(None)] * 3
        src[axis], dst[axis] = (slice(0, -1), slice(1, None)) if step == 1 else (slice(1, None), slice(0, -1))
        out[i][tuple(dst)] = img[tuple(src)]
    return out


def _noisy(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(images + rng.normal(0, sigma, images.shape), -1, 1).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> dict:
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed")
    rng = np.random.default_rng(0)
    xtr, ytr = _idx("train")
    xte, yte = _idx("t10k")
    pick = rng.choice(np.flatnonzero(np.isin(ytr, CLASSES)), N_PATIENTS, replace=False)
    images, pids = [xtr[pick]], [np.array([f"p{i}" for i in range(N_PATIENTS)])]
    for _ in range(2):  # two more visits of the first N_MULTI patients, each shifted by one pixel
        images.append(_shift1(xtr[pick[:N_MULTI]], rng))
        pids.append(np.array([f"p{i}" for i in range(N_MULTI)]))
    train = ImageSet(images=np.concatenate(images), labels=None, patient_ids=np.concatenate(pids))
    fresh = xte[rng.choice(np.flatnonzero(np.isin(yte, CLASSES)), 1000, replace=False)]
    probe = rng.choice(len(train), 300, replace=False)
    multi = np.flatnonzero(np.isin(train.patient_ids, [f"p{i}" for i in range(N_MULTI)]))
    return {"train": train, "fresh": fresh, "probe": probe, "multi": multi, "rng": rng}


# measured with these seeds: σ 0/0.05/0.1 -> 1.0, σ 0.2 -> 0.993 (raw L2 without debiasing: ~0.1)
@pytest.mark.parametrize("sigma,low", [(0.0, 1.0), (0.05, 1.0), (0.1, 1.0), (0.2, 0.97)])
def test_noisy_copies_are_memorized(data: dict, sigma: float, low: float) -> None:
    train = data["train"]
    copies = _noisy(train.images[data["probe"]], sigma, data["rng"])
    res = memorization(copies, train)
    assert res["rate"] >= low
    hit = res["memorized"]
    same_patient = train.patient_ids[res["nearest_index"][hit]] == train.patient_ids[data["probe"][hit]]
    assert same_patient.all()


def test_noisy_copies_of_multi_visit_patients_are_memorized(data: dict) -> None:
    train = data["train"]
    copies = _noisy(train.images[data["multi"]], 0.2, data["rng"])
    assert memorization(copies, train)["rate"] >= 0.97


def test_shifted_copies_are_memorized(data: dict) -> None:
    train, rng = data["train"], data["rng"]
    shifted = _shift1(train.images[data["probe"]], rng)
    assert memorization(shifted, train)["rate"] == 1.0
    assert memorization(_noisy(shifted, 0.2, rng), train)["rate"] >= 0.97


def test_fresh_real_images_are_not_memorized(data: dict) -> None:
    res = memorization(data["fresh"], data["train"])
    assert res["rate"] <= 0.01
    assert np.median(res["ratio"]) > 0.8


def test_ratio_is_configurable_and_monotone(data: dict) -> None:
    copies = _noisy(data["train"].images[data["probe"]], 0.3, data["rng"])
    rates = [memorization(copies, data["train"], ratio=r)["rate"] for r in (0.1, 1 / 3, 0.6)]
    assert rates[0] <= rates[1] <= rates[2]
    assert rates[2] == 1.0


def test_noise_sigma_estimates_added_noise(data: dict) -> None:
    clean = data["train"].images[:200]
    rng = np.random.default_rng(1)
    est = noise_sigma(clean + rng.normal(0, 0.2, clean.shape).astype(np.float32))
    assert abs(float(np.median(est)) - 0.2) < 0.03
    # texture and edges read as a little noise on clean images (measured median 0.059)
    assert float(np.median(noise_sigma(clean))) < 0.08


def test_reid_rate_counts_threshold_crossings(data: dict) -> None:
    train = data["train"]

    def embed(images: np.ndarray) -> np.ndarray:
        f = pixel_features(images, sigma=1.0, pool=2)
        f = f - f.mean(1, keepdims=True)
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    train_emb = embed(train.images)
    copies = _noisy(train.images[data["probe"][:100]], 0.1, data["rng"])
    samples = np.concatenate([copies, data["fresh"][:100]])
    assert reid_rate(samples, train_emb, embed=embed, threshold=1.0 + 1e-6) == 0.0
    assert reid_rate(samples, train_emb, embed=embed, threshold=-1.0) == 1.0
    # small chunks give the same answer as one pass
    r1 = reid_rate(samples, train_emb, embed=embed, threshold=0.97)
    assert r1 == reid_rate(samples, train_emb, embed=embed, threshold=0.97, chunk=37)
    assert 0.45 <= r1 <= 0.75  # copies cross, most fresh images do not


def test_classifier_is_deterministic_and_learns(data: dict, one_thread: None) -> None:
    xtr, ytr = _idx("train")
    xte, yte = _idx("t10k")
    rng = np.random.default_rng(0)
    tr, te = rng.choice(len(xtr), 2000, replace=False), rng.choice(len(xte), 500, replace=False)
    a = train_classifier(xtr[tr], ytr[tr], 10, steps=200, batch_size=64, seed=3)
    b = train_classifier(xtr[tr], ytr[tr], 10, steps=200, batch_size=64, seed=3)
    acc = accuracy(a, xte[te], yte[te])
    assert acc == accuracy(b, xte[te], yte[te])
    assert acc > 0.62  # measured 0.668 (chance: 0.1)
    fa = features(a, xte[te[:16]])
    assert fa.shape == (16, 128)
    np.testing.assert_array_equal(fa, features(b, xte[te[:16]]))


def test_frechet_distance_closed_form() -> None:
    rng = np.random.default_rng(0)
    d = 4
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = np.diag([1.0, 2.0, 0.5, 3.0]), np.diag([4.0, 1.0, 2.0, 0.25])
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(np.diag(s1)) - np.sqrt(np.diag(s2))) ** 2).sum())
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    # singular covariances: the eps fix keeps the answer finite
    z = np.zeros((d, d))
    assert frechet_distance(mu1, z, mu1, z) == pytest.approx(0.0, abs=1e-4)


def test_fid_domain_identical_vs_shifted() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 8))
    b = rng.normal(size=(4000, 8))
    same = fid_domain(a, b)
    shifted = fid_domain(a, b + 1.0)
    assert same < 0.05
    assert shifted == pytest.approx(8.0 + same, abs=0.1)  # ‖Δμ‖² = 8
    assert fid_domain(a, a) == pytest.approx(0.0, abs=1e-6)
