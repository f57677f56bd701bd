"""Re-identification model: learns patients from repeat visits, calibrates, exports to ONNX, round-trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures import FMNIST, fashion, with_visits

from privdistill.config import ReidConfig
from privdistill.data.types import ImageSet
from privdistill.reid import (
    PAIR_TARGET_TPR,
    OnnxEmbedder,
    ReidModel,
    ReidNet,
    augment,
    distinct_pairs,
    export_onnx,
    load_reid,
    save_reid,
    train_reid,
)

pytestmark = [
    pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST not installed"),
    pytest.mark.usefixtures("one_thread"),
]


CFG = ReidConfig(width=16, embedding_dim=32, steps=150, batch_size=64)


@pytest.fixture(scope="module")
def train_set() -> ImageSet:
    return with_visits(fashion("train", 0, 100), visits=3, seed=0)


@pytest.fixture(scope="module")
def model(train_set: ImageSet) -> ReidModel:
    return train_reid(train_set, CFG, seed=0)


def test_calibration_meets_target_tpr_with_low_fpr(model: ReidModel) -> None:
    # Prepare / Execute: done by the fixture (80 training patients, 20 held out for calibration)
    cal = model.calibration
    # Assert: 20 calibration patients x 3 visits: 20 x 3 same-patient pairs and C(60, 2) - 60 = 1710 distinct
    # different-patient pairs, each counted once
    assert set(cal) == {"tpr", "fpr", "threshold", "auc", "n_pos", "n_neg", "target_tpr", "n_patients"}
    assert cal["n_pos"] == 60 and cal["n_neg"] == 1710 and cal["n_patients"] == 20
    assert cal["target_tpr"] == PAIR_TARGET_TPR and cal["tpr"] >= PAIR_TARGET_TPR - 0.02
    assert cal["fpr"] <= 0.03
    assert cal["auc"] >= 0.98
    assert model.threshold == cal["threshold"]
    assert 0.0 < model.threshold < 1.0


def test_distinct_pairs_are_drawn_without_replacement() -> None:
    owner = np.repeat(np.arange(6), 3)  # 6 patients x 3 images: 6 x 3 = 18 same, C(18, 2) - 18 = 135 different
    rng = np.random.default_rng(0)
    for same, total in ((True, 18), (False, 135)):
        every = distinct_pairs(owner, same=same, limit=1000, rng=rng)
        assert len(every) == total and len({tuple(p) for p in every}) == total
        assert ((owner[every[:, 0]] == owner[every[:, 1]]) == same).all() and (every[:, 0] < every[:, 1]).all()
        some = distinct_pairs(owner, same=same, limit=10, rng=rng)
        assert len({tuple(p) for p in some}) == 10
    # too many to list (n(n-1)/2 > 50 x limit): sampled, still distinct and different-patient
    big = np.repeat(np.arange(200), 2)
    pairs = distinct_pairs(big, same=False, limit=500, rng=rng)
    assert len({tuple(p) for p in pairs}) == 500 and (big[pairs[:, 0]] != big[pairs[:, 1]]).all()


def test_target_tpr_moved_to_the_filter_with_a_clear_error() -> None:
    from privdistill.config import parse_config
    from privdistill.errors import ConfigError

    for section in ("reid", "filter"):
        with pytest.raises(ConfigError, match=rf"{section}.target_tpr: removed: .*set filter.max_fresh_drop instead"):
            parse_config({"data": {"source": {"type": "npz", "path": "x.npz"}}, section: {"target_tpr": 0.8}})


def test_threshold_generalises_to_new_patients(model: ReidModel) -> None:
    # Prepare: 50 patients the model never saw (test split), 3 visits each
    fresh = with_visits(fashion("t10k", 0, 50), visits=3, seed=1, prefix="q-")
    # Execute
    emb = model.embed(fresh.images)
    sim = emb @ emb.T
    same = fresh.patient_ids[:, None] == fresh.patient_ids[None, :]
    off_diag = ~np.eye(len(emb), dtype=bool)
    tpr = (sim[same & off_diag] >= model.threshold).mean()
    fpr = (sim[~same] >= model.threshold).mean()
    # Assert: seen tpr 0.86, fpr 0.003 on items the model never saw
    assert tpr >= 0.8
    assert fpr <= 0.03


def test_onnx_matches_torch_with_dynamic_batch(model: ReidModel, train_set: ImageSet, tmp_path: Path) -> None:
    path = export_onnx(model, tmp_path / "reid.onnx")
    embedder = OnnxEmbedder(path, threads=1)
    x = train_set.images[:37]
    onnx_emb = embedder.embed(x, batch_size=16)  # batches of 16, 16 and 5: none is the export batch
    assert onnx_emb.shape == (37, CFG.embedding_dim) and onnx_emb.dtype == np.float32
    np.testing.assert_allclose(onnx_emb, model.embed(x), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(onnx_emb, axis=1), 1.0, atol=1e-5)
    assert embedder.embed(x[:0]).shape == (0, CFG.embedding_dim)


def test_save_load_round_trip(model: ReidModel, train_set: ImageSet, tmp_path: Path) -> None:
    save_reid(model, tmp_path / "reid")
    loaded = load_reid(tmp_path / "reid")
    assert loaded.arch == "convnet" and loaded.cfg == CFG and loaded.resolution == 28
    assert loaded.threshold == model.threshold
    assert loaded.calibration == model.calibration
    np.testing.assert_array_equal(loaded.embed(train_set.images[:20]), model.embed(train_set.images[:20]))


def test_training_is_deterministic_for_a_seed(train_set: ImageSet) -> None:
    short = CFG.model_copy(update={"steps": 15})
    a = train_reid(train_set, short, seed=3)
    b = train_reid(train_set, short, seed=3)
    c = train_reid(train_set, short, seed=4)
    for pa, pb in zip(a.net.state_dict().values(), b.net.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    assert a.calibration == b.calibration
    assert not torch.equal(a.net.head.weight, c.net.head.weight)


def test_resnet_trains_and_exports(train_set: ImageSet, tmp_path: Path) -> None:
    m = train_reid(train_set, CFG.model_copy(update={"steps": 20}), seed=1, arch="resnet")
    assert m.arch == "resnet" and m.calibration["auc"] > 0.9  # only 20 steps: a smoke test of the resnet path
    emb = OnnxEmbedder(export_onnx(m, tmp_path / "r.onnx")).embed(train_set.images[:9])
    np.testing.assert_allclose(emb, m.embed(train_set.images[:9]), atol=1e-4)


@pytest.mark.parametrize("arch", ["convnet", "resnet"])
@pytest.mark.parametrize("size", [20, 28, 64])
def test_any_resolution_gives_unit_embeddings(arch: str, size: int) -> None:
    net = ReidNet(arch, channels=3, embedding_dim=16, width=8).eval()
    with torch.no_grad():
        z = net(torch.randn(4, 3, size, size))
    assert z.shape == (4, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="convnet"):
        ReidNet("vit")


def test_augment_is_a_small_change(train_set: ImageSet) -> None:
    x = torch.from_numpy(train_set.images[:64])
    y = augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    rel = ((y - x).flatten(1).norm(dim=1) / (x + 1).flatten(1).norm(dim=1)).median().item()
    assert 0.02 < rel < 0.6
