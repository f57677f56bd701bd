"""The ViT / Semi-ViT downstream evaluator on real Fashion-MNIST (3 classes, 16x16): it learns from a few
labels, is deterministic for a seed, learns from unlabelled images through pseudo-labels, its config is
validated, and the evaluation stage reports tstr_/trtr_semi_vit."""

from __future__ import annotations

import gzip
import re

import numpy as np
import pytest
import torch
from _fixtures import FMNIST

from privdistill.config import DownstreamConfig, parse_config
from privdistill.data.types import ImageSet
from privdistill.downstream import accuracy, fit, split_labelled, train_vit
from privdistill.errors import ConfigError

CLASSES = [1, 7, 8]  # trouser, sneaker, bag: the headline benchmark's classes
# the default ViT (hidden 64, 3 layers, 4 heads, 4x4 patches of 4 px), fewer steps
TINY = {"batch_size": 16, "unlabelled_ratio": 2, "supervised_steps": 100, "semi_steps": 60, "warmup_steps": 5}


def _load(split: str, per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(FMNIST / f"{split}-images-idx3-ubyte.gz") as fh:
        x = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(FMNIST / f"{split}-labels-idx1-ubyte.gz") as fh:
        y = np.frombuffer(fh.read(), np.uint8, offset=8)
    pick = np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in CLASSES])
    small = torch.nn.functional.interpolate(torch.from_numpy(x[pick].astype(np.float32)), size=16, mode="area")
    return (small.numpy() / 127.5 - 1.0).astype(np.float32), np.searchsorted(CLASSES, y[pick]).astype(np.int64)


@pytest.fixture(scope="module")
def data(one_thread: None) -> dict:
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed")
    rng = np.random.default_rng(0)
    xtr, ytr = _load("train", 40, rng)
    xte, yte = _load("t10k", 60, rng)
    return {"xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte}


def test_split_labelled_is_stratified_and_disjoint() -> None:
    labels = np.repeat([0, 1, 2], [40, 40, 3])
    lab, unl = split_labelled(labels, 0.1, seed=1)
    assert np.bincount(labels[lab]).tolist() == [4, 4, 1]  # round(0.3) -> at least one per class
    assert len(np.intersect1d(lab, unl)) == 0 and len(lab) + len(unl) == len(labels)
    np.testing.assert_array_equal(lab, split_labelled(labels, 0.1, seed=1)[0])


def test_tiny_vit_learns_from_few_labels_and_is_deterministic(data: dict) -> None:
    # Prepare: a quarter of 120 images labelled (10 per class)
    cfg = DownstreamConfig(model="vit", label_fraction=0.25, **TINY)
    # Execute
    a = fit(data["xtr"], data["ytr"], 3, cfg, seed=3)
    b = fit(data["xtr"], data["ytr"], 3, cfg, seed=3)
    c = fit(data["xtr"], data["ytr"], 3, cfg, seed=4)
    # Assert
    assert a.stats == {"n_labelled": 30, "n_unlabelled": 0}
    acc = accuracy(a.model, data["xte"], data["yte"])
    assert acc > 0.6, acc  # chance 1/3
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.model.parameters(), c.model.parameters(), strict=True))


def test_pseudo_labels_from_unlabelled_images_are_learnt_from(data: dict) -> None:
    # Prepare: 4 labelled images per class; two unlabelled sets: the other training images, and the
    # same images with their pixels shuffled. The control has the pseudo-label loss weight 0, and the
    # random draws do not depend on the unlabelled images, so with it the two sets must give the same model.
    lab, unl = split_labelled(data["ytr"], 0.1, seed=0)
    shuffled = np.random.default_rng(1).permuted(data["xtr"][unl].reshape(len(unl), -1), axis=1)
    sets = {"real": data["xtr"][unl], "shuffled": shuffled.reshape(data["xtr"][unl].shape)}
    semi = DownstreamConfig(model="semi_vit", **TINY)
    control = semi.model_copy(update={"unlabelled_weight": 0.0})
    # Execute
    runs = {(name, c.unlabelled_weight): train_vit(data["xtr"][lab], data["ytr"][lab], 3, c, seed=0, unlabelled=u,
                                                   unlabelled_truth=data["ytr"][unl])
            for name, u in sets.items() for c in (semi, control)}
    # Assert: pseudo-labels were accepted and mostly right ...
    real = runs["real", 1.0]
    assert real.stats["n_labelled"] == 12 and real.stats["n_unlabelled"] == 108
    assert real.stats["pseudo_labels_used"] > 0.5 * 60 * 32  # measured 1,507 of 1,920
    assert real.stats["pseudo_label_accuracy"] > 0.8  # measured 0.897 (chance 1/3)
    # ... and the model depends on the unlabelled images only through them
    params = {k: torch.cat([p.flatten() for p in r.model.parameters()]) for k, r in runs.items()}
    assert torch.equal(params["real", 0.0], params["shuffled", 0.0])
    assert not torch.equal(params["real", 1.0], params["shuffled", 1.0])
    assert not torch.equal(params["real", 1.0], params["real", 0.0])
    accs = {k: accuracy(r.model, data["xte"], data["yte"]) for k, r in runs.items()}
    assert accs["real", 1.0] != accs["shuffled", 1.0], accs  # the unlabelled images move test accuracy


def _raw(tmp_path, downstream: dict, resolution: int = 16) -> dict:
    img = tmp_path / "x.gz"
    img.write_bytes(b"")
    return {"data": {"source": {"type": "idx", "images": str(img)}, "resolution": resolution},
            "teacher": {"model": {"block_out_channels": [16, 32]}},
            "evaluate": {"downstream": downstream}}


def test_downstream_config_is_validated(tmp_path) -> None:
    cfg = parse_config(_raw(tmp_path, {"model": "semi_vit"}))
    assert cfg.evaluate.downstream.label_fraction == 0.1 and cfg.evaluate.downstream.vit.patch_for(16) == 4
    assert parse_config(_raw(tmp_path, {})).evaluate.downstream.model == "cnn"
    with pytest.raises(ConfigError) as exc:
        parse_config(_raw(tmp_path, {"model": "resnet", "label_fraction": 0, "lable_fraction": 0.2,
                                     "vit": {"hidden_size": 30, "num_heads": 4}}))
    joined = "\n".join(exc.value.problems)
    assert len(exc.value.problems) == 4, joined
    assert "evaluate.downstream.model" in joined and "evaluate.downstream.label_fraction" in joined
    assert "evaluate.downstream.lable_fraction: unknown key" in joined
    assert "hidden_size=30 is not a multiple of num_heads=4" in joined
    with pytest.raises(ConfigError, match=r"evaluate.downstream.vit.patch_size: patch size 5 does not divide"):
        parse_config(_raw(tmp_path, {"model": "vit", "vit": {"patch_size": 5}}))
    parse_config(_raw(tmp_path, {"model": "cnn", "vit": {"patch_size": 5}}))  # unused ViT: not checked


def test_evaluation_reports_semi_vit_for_teacher_student_and_real(data: dict, tmp_path) -> None:
    from privdistill.evaluate import _downstream

    cfg = parse_config(_raw(tmp_path, {"model": "semi_vit", **TINY, "supervised_steps": 20, "semi_steps": 10}))
    names = ["Trouser", "Sneaker", "Bag"]
    real = ImageSet(data["xtr"], labels=data["ytr"], class_names=names)
    test = ImageSet(data["xte"], labels=data["yte"], class_names=names)
    synth = ImageSet(data["xtr"][::-1].copy(), labels=data["ytr"][::-1].copy(), class_names=names)
    unlabelled = ImageSet(data["xtr"], class_names=names)
    report: dict = {"real": {}, "teacher": {}, "student": {}}
    _downstream(report, real, test, {"teacher": synth, "student": unlabelled}, cfg)
    assert 0 <= report["real"]["trtr_semi_vit"] <= 1 and 0 <= report["teacher"]["tstr_semi_vit"] <= 1
    assert report["student"]["tstr_semi_vit"] is None  # samples without labels: nothing to train on
    assert report["downstream"]["model"] == "semi_vit" and report["downstream"]["label_fraction"] == 0.1
    assert report["downstream"]["teacher"]["n_labelled"] == 12 and report["downstream"]["teacher"]["n_unlabelled"] == 108


def test_report_page_puts_semi_vit_tstr_and_trtr_on_one_row() -> None:
    from privdistill.report import render_html

    report = {"teacher": {"tstr_accuracy": 0.8125, "tstr_semi_vit": 0.71875},
              "student": {"tstr_accuracy": 0.75, "tstr_semi_vit": 0.65625},
              "real": {"trtr_accuracy": 0.90625, "trtr_semi_vit": 0.84375}}
    page = render_html(report, {})
    row = re.search(r"<tr><th>Downstream accuracy, Semi-ViT, few labels[^<]*</th>(.*?)</tr>", page)
    assert row is not None and re.findall(r"class=\"?num\"?>([^<]*)<", row.group(1)) == ["0.7188", "0.6562", "0.8438"]
    assert "trtr_semi_vit" not in page and "Semi-ViT, few labels" not in render_html({"teacher": {}}, {})
