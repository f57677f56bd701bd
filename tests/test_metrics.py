"""Memorization on real Fashion-MNIST, validated at 16x16 and 28x28 against realistic copies (noisy,
blurred, correlated-noise, teacher-like, shifted; a homogeneous class; a shared texture) and fresh
images, with Wilson intervals; the data-copying AUC; re-identification rate, classifier determinism and the domain Fréchet distance."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from privdistill.classifier import accuracy, features, train_classifier
from privdistill.data.types import ImageSet
from privdistill.metrics import (
    binomial_ci,
    data_copying,
    fid_domain,
    frechet_distance,
    memorization,
    noise_sigma,
    reid_rate,
)
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


# ---------------------------------------------------------------- validation against realistic copies
# The requirement, fixed before measuring (README, "Evaluation"): the metric catches at least 90% of
# each realistic kind of copy and flags at most 1% of fresh real images, each *supported by its 95%
# Wilson interval* (lower bound >= 0.90, upper bound <= 0.02 for fresh images at n = 600). Kinds where
# it is not met are strict xfails carrying the measured rate, so a fix shows up as an XPASS.
RECALL_MIN, FRESH_MAX = 0.90, 0.02
N_PROBE, N_FRESH = 200, 600


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    return pixel_features(images, sigma=sigma, pool=1).reshape(images.shape)


def _correlated(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise smoothed by a 1-px Gaussian (spatially correlated), per-pixel std sigma."""
    field = _blur(rng.normal(0, 1, images.shape).astype(np.float32), 1.0)
    return np.clip(images + field / field.std() * sigma, -1, 1).astype(np.float32)


COPIES = {  # kind -> how a copy of a training image is made
    "exact": lambda x, rng: x.copy(),
    "noise 0.1": lambda x, rng: _noisy(x, 0.1, rng),
    "noise 0.2": lambda x, rng: _noisy(x, 0.2, rng),
    "blur 0.5 px": lambda x, rng: _blur(x, 0.5),
    "blur 0.7 px": lambda x, rng: _blur(x, 0.7),
    "blur 1 px": lambda x, rng: _blur(x, 1.0),
    "correlated noise 0.1": lambda x, rng: _correlated(x, 0.1, rng),
    # a denoiser's reconstruction: smoothed, with a little correlated and white error
    "teacher-like": lambda x, rng: _noisy(_correlated(_blur(x, 0.7), 0.05, rng), 0.05, rng),
    "1-px shift + noise 0.1": lambda x, rng: _noisy(_shift1(x, rng), 0.1, rng),
}
# (scenario, kind) -> measured rate where the requirement is NOT met (seeds below; README table)
UNMET = {
    ("diverse 16", "noise 0.2"): 0.810, ("diverse 16", "correlated noise 0.1"): 0.550,
    ("diverse 16", "teacher-like"): 0.845,
    ("homogeneous 16", "noise 0.1"): 0.810, ("homogeneous 16", "noise 0.2"): 0.390,
    ("homogeneous 16", "correlated noise 0.1"): 0.105, ("homogeneous 16", "teacher-like"): 0.295,
    ("homogeneous 16", "1-px shift + noise 0.1"): 0.870,
}
SCENARIOS = {"diverse 28": (28, CLASSES), "diverse 16": (16, CLASSES), "homogeneous 16": (16, [1])}  # 1: trousers


def _resize(images: np.ndarray, res: int) -> np.ndarray:
    from privdistill.data.preprocess import preprocess_images

    if images.shape[-1] == res:
        return images
    return preprocess_images([((x[0] + 1) * 127.5).round().astype(np.uint8) for x in images], resolution=res, channels=1)


_CACHE: dict = {}


def _scenario(name: str) -> dict:
    """A training set of 400 patients (50 with 3 visits, the others 1) of the scenario's classes at
    its resolution, the probes (training images to copy) and fresh test images of the same classes."""
    if name not in _CACHE:
        if not FMNIST.is_dir():
            pytest.skip("Fashion-MNIST not installed")
        res, classes = SCENARIOS[name]
        rng = np.random.default_rng(7)
        xtr, ytr = _idx("train")
        xte, yte = _idx("t10k")
        pick = rng.choice(np.flatnonzero(np.isin(ytr, classes)), N_PATIENTS, replace=False)
        base = _resize(xtr[pick], res)
        images, pids = [base], [np.array([f"p{i}" for i in range(N_PATIENTS)])]
        for _ in range(2):
            images.append(_shift1(base[:N_MULTI], rng))
            pids.append(np.array([f"p{i}" for i in range(N_MULTI)]))
        train = ImageSet(images=np.concatenate(images), labels=None, patient_ids=np.concatenate(pids))
        fresh = _resize(xte[rng.choice(np.flatnonzero(np.isin(yte, classes)), N_FRESH, replace=False)], res)
        _CACHE[name] = {"train": train, "fresh": fresh, "probe": rng.choice(len(train), N_PROBE, replace=False)}
    return _CACHE[name]


def _rate_row(name: str, kind: str, res: dict) -> str:
    lo, hi = binomial_ci(res["count"], res["n"], k_high=res["count"] + res["undecidable"])
    return f"{name:15s} {kind:24s} {res['rate']:.3f} [{lo:.3f}, {hi:.3f}] n={res['n']} undecidable={res['undecidable']}"


@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.parametrize("kind", list(COPIES))
def test_realistic_copies_are_memorized(name: str, kind: str) -> None:
    sc = _scenario(name)
    rng = np.random.default_rng([list(SCENARIOS).index(name), list(COPIES).index(kind)])
    copies = COPIES[kind](sc["train"].images[sc["probe"]], rng)
    res = memorization(copies, sc["train"])
    print(_rate_row(name, kind, res))
    lo = binomial_ci(res["count"], res["n"])[0]
    if (name, kind) in UNMET:  # a strict xfail: fails once the requirement is met, to update README and UNMET
        assert lo < RECALL_MIN, f"requirement now met ({_rate_row(name, kind, res)}): remove it from UNMET"
        pytest.xfail(f"requirement not met: measured {res['rate']:.3f} (lower bound {lo:.3f}) < {RECALL_MIN}")
    assert lo >= RECALL_MIN, _rate_row(name, kind, res)
    # a copy is attributed to its source patient
    hit = res["memorized"]
    src = sc["train"].patient_ids[sc["probe"]]
    assert (sc["train"].patient_ids[res["nearest_index"][hit]] == src[hit]).mean() >= 0.99


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fresh_real_images_are_not_memorized(name: str) -> None:
    sc = _scenario(name)
    res = memorization(sc["fresh"], sc["train"])
    print(_rate_row(name, "fresh (false positives)", res))
    assert res["ci"][1] <= FRESH_MAX  # undecidable samples count as memorized in the upper bound
    assert np.nanmedian(res["ratio"]) > 0.5


def test_shared_texture_neither_hides_copies_nor_makes_them_undecidable() -> None:
    """A texture every image shares (a scanner pattern) reads as noise in a sample on its own; the
    noise estimate must not let it swallow the distance to other patients."""
    sc = _scenario("diverse 16")
    texture = np.random.default_rng(99).normal(0, 0.3, sc["train"].images.shape[1:]).astype(np.float32)
    train = ImageSet(np.clip(sc["train"].images + texture, -1, 1), patient_ids=sc["train"].patient_ids)
    exact = memorization(train.images[sc["probe"]], train)
    print(_rate_row("texture 16", "exact", exact))
    assert exact["undecidable"] == 0 and binomial_ci(exact["count"], exact["n"])[0] >= RECALL_MIN
    fresh = memorization(np.clip(sc["fresh"] + texture, -1, 1), train)
    print(_rate_row("texture 16", "fresh (false positives)", fresh))
    assert fresh["ci"][1] <= FRESH_MAX


def test_noisy_copies_of_multi_visit_patients_are_memorized(data: dict) -> None:
    train = data["train"]
    res = memorization(_noisy(train.images[data["multi"]], 0.1, data["rng"]), train)
    assert binomial_ci(res["count"], res["n"])[0] >= RECALL_MIN


def test_undecidable_samples_are_counted_not_passed() -> None:
    """Two patients with the same image: a copy of it cannot be told from the other patient's image,
    so it is undecidable — reported, and counted as memorized in the interval's upper end."""
    rng = np.random.default_rng(3)
    imgs = rng.uniform(-1, 1, (6, 1, 16, 16)).astype(np.float32)
    imgs[1] = imgs[0]
    train = ImageSet(imgs, patient_ids=np.array(["a", "b", "c", "d", "e", "f"]))
    res = memorization(np.stack([imgs[0], imgs[2]]), train)
    assert res["memorized"].tolist() == [False, True]
    assert res["undecidable_mask"].tolist() == [True, False]
    assert res["undecidable"] == 1 and res["count"] == 1 and res["rate"] == 0.5
    lo, hi = res["ci"]
    assert hi == pytest.approx(binomial_ci(2, 2)[1]) and lo == pytest.approx(binomial_ci(1, 2)[0])


def test_degenerate_reference_is_refused() -> None:
    from privdistill.errors import DataError

    rng = np.random.default_rng(0)
    imgs = rng.uniform(-1, 1, (4, 1, 16, 16)).astype(np.float32)
    with pytest.raises(DataError, match="1 patient"):
        memorization(imgs[:1], ImageSet(imgs, patient_ids=np.array(["a"] * 4)))
    with pytest.raises(DataError, match="at least 2 patients"):
        memorization(imgs[:1], ImageSet(imgs[:1]))
    same = np.repeat(imgs[:1], 4, axis=0)
    with pytest.raises(DataError, match="identical"):
        memorization(imgs[:1], ImageSet(same, patient_ids=np.array(["a", "b", "c", "d"])))


def test_feature_detector_runs_the_ratio_test_in_feature_space(data: dict) -> None:
    """With ``embed``, a copy the pixel detectors miss (no blur matches, heavy noise) is caught when its
    feature is close to its source's: here a stand-in embedding that ignores the noise entirely."""
    train = data["train"]
    idx = data["probe"][:40]
    noisy = _noisy(train.images[idx], 0.6, np.random.default_rng(2))
    lookup = {noisy[i].tobytes(): train.images[j] for i, j in enumerate(idx)}

    def embed(images: np.ndarray) -> np.ndarray:
        clean = np.stack([lookup.get(x.tobytes(), x) for x in images])
        return clean.reshape(len(images), -1) + 2.0  # positive offset: cosine geometry keeps images apart

    pixel_only = memorization(noisy, train)
    both = memorization(noisy, train, embed=embed)
    assert pixel_only["rate"] < 0.5  # σ = 0.6 drowns the pixel detectors
    assert both["rate"] == 1.0 and both["by_detector"]["feature"] == 40


def test_ratio_is_configurable_and_monotone(data: dict) -> None:
    copies = _noisy(data["train"].images[data["probe"]], 0.3, data["rng"])
    rates = [memorization(copies, data["train"], ratio=r)["rate"] for r in (0.1, 1 / 3, 0.6)]
    assert rates[0] <= rates[1] <= rates[2]
    assert rates[2] >= RECALL_MIN


def test_noise_sigma_estimates_added_noise(data: dict) -> None:
    clean = data["train"].images[:200]
    rng = np.random.default_rng(1)
    est = noise_sigma(clean + rng.normal(0, 0.2, clean.shape).astype(np.float32))
    assert abs(float(np.median(est)) - 0.2) < 0.03
    # texture and edges read as a little noise on clean images (measured median 0.059)
    assert float(np.median(noise_sigma(clean))) < 0.08


def test_data_copying_auc_separates_copies_from_fresh(data: dict) -> None:
    """0.5 for samples from the same distribution as fresh images, ~1 for copies; its interval and n.
    Samples of worse quality that copy nothing (heavy noise) stay near 0.5 on the scale-free statistic
    while the plain nearest distance calls them far from copying."""
    train, fresh = data["train"], data["fresh"]
    same = data_copying(fresh[:300], train, fresh[300:600], n_boot=200)
    assert same["n_samples"] == 300 and same["n_fresh"] == 300
    assert same["ci"][0] <= 0.5 <= same["ci"][1]
    copies = _noisy(train.images[data["probe"]], 0.1, data["rng"])
    copied = data_copying(copies, train, fresh[:300], n_boot=200)
    assert copied["ci"][0] > 0.9 and copied["ci"][0] <= copied["auc"] <= copied["ci"][1]
    poor = data_copying(_noisy(fresh[:300], 0.3, data["rng"]), train, fresh[300:600], n_boot=200)
    assert abs(poor["auc"] - 0.5) < abs(poor["distance_auc"] - 0.5)
    assert data_copying(copies[:0], train, fresh)["auc"] is None


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
    # exactly the share of samples whose best cosine similarity reaches the threshold
    best = (embed(samples) @ train_emb.T).max(1)
    for threshold in (0.9, 0.97, float(np.median(best))):
        r = reid_rate(samples, train_emb, embed=embed, threshold=threshold)
        assert r == pytest.approx(float((best >= threshold).mean()), abs=1 / len(samples) + 1e-9)
        assert r == reid_rate(samples, train_emb, embed=embed, threshold=threshold, chunk=37)


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


@pytest.mark.slow
@pytest.mark.parametrize("name", ["diverse 16", "homogeneous 16"])
def test_feature_detector_with_a_trained_reid_model(name: str, one_thread: None) -> None:
    """The evaluation's second detector, in a trained re-identification model's feature space (the
    independent ResNet-style model of `evaluate`): fresh images stay within the false-positive bound
    and it adds, never removes, recall (minutes on 2 cores: slow tier)."""
    from privdistill.config import ReidConfig
    from privdistill.reid import train_reid

    sc = _scenario(name)
    reid = train_reid(sc["train"], ReidConfig(steps=200, batch_size=64, width=16, embedding_dim=32), seed=1000, arch="resnet")
    fresh = memorization(sc["fresh"], sc["train"], embed=reid.embed)
    print(_rate_row(name, "fresh, with features", fresh), fresh["by_detector"])
    assert fresh["ci"][1] <= FRESH_MAX
    copies = COPIES["teacher-like"](sc["train"].images[sc["probe"]], np.random.default_rng(5))
    both = memorization(copies, sc["train"], embed=reid.embed)
    print(_rate_row(name, "teacher-like, with features", both), both["by_detector"])
    assert both["memorized"].sum() >= memorization(copies, sc["train"])["memorized"].sum()


def test_blend_of_one_patients_two_visits_is_memorized_with_patient_ids(data: dict) -> None:
    """A blend of one person's two images copies that person; with patient ids the other visit is not
    "another patient". Requirement not met (measured 0.28 of 50, the two visits being 1-px shifts in
    independent directions, so the blend is a ghosted double image): a strict xfail, as above."""
    train = data["train"]
    pairs = [np.flatnonzero(train.patient_ids == f"p{i}")[1:3] for i in range(N_MULTI)]
    blends = np.stack([0.5 * (train.images[a] + train.images[b]) for a, b in pairs]).astype(np.float32)
    res = memorization(blends, train)
    print(_rate_row("diverse 28", "blend of 2 visits", res))
    lo = binomial_ci(res["count"], res["n"])[0]
    assert lo < RECALL_MIN, f"requirement now met ({res['rate']:.3f}): make this a plain assertion and update README"
    pytest.xfail(f"requirement not met: measured {res['rate']:.3f} (lower bound {lo:.3f}) < {RECALL_MIN}")
