"""privdistill.measure: classes matched by name once, prompts.json read once, the real-side cache (a hit
returns what the miss computed, changed inputs miss, a torn entry is recomputed), and one measurement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from privdistill.config import EvaluateConfig
from privdistill.data.types import ImageSet
from privdistill.measure import (
    MeasureCache,
    RealSide,
    align_to_test,
    digest,
    load_prompt_labels,
    measure,
    relabel,
)


def _set(labels: list[int], names: list[str], seed: int = 0, pids: bool = False) -> ImageSet:
    rng = np.random.default_rng(seed)
    imgs = rng.uniform(-1, 1, (len(labels), 1, 12, 12)).astype(np.float32)
    return ImageSet(images=imgs, labels=np.array(labels, dtype=np.int64), class_names=names,
                    patient_ids=np.array([f"p{i}" for i in range(len(labels))]) if pids else None)


def test_relabel_matches_classes_by_name_and_drops_unknown_ones() -> None:
    student = _set([0, 1, 2, 2], ["Bag", "Sandal", "Coat"])
    out = relabel(student, ["Sandal", "Bag", "Trouser"])
    assert out.class_names == ["Sandal", "Bag", "Trouser"]
    assert out.labels is not None and list(out.labels) == [1, 0]  # Bag -> 1, Sandal -> 0, the two Coats dropped
    np.testing.assert_array_equal(out.images, student.images[[0, 1]])


def test_align_to_test_keeps_only_test_classes_the_samples_have() -> None:
    syn = _set([0, 0, 1], ["Bag", "Coat"])
    test = _set([0, 1, 2, 1], ["Sandal", "Bag", "Trouser"])
    aligned = align_to_test(syn, test)
    assert aligned is not None
    s, t = aligned
    assert s.labels is not None and t.labels is not None
    assert list(s.labels) == [1, 1] and list(t.labels) == [1, 1]
    assert align_to_test(_set([0], ["Coat"]), test) is None


def test_load_prompt_labels_takes_the_first_folder_that_has_one(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (b / "prompts.json").write_text(json.dumps({"a bag": 1}))
    assert load_prompt_labels(a, b) == {"a bag": 1}
    assert load_prompt_labels(a) is None


def test_cache_hit_returns_what_the_miss_computed_and_changed_inputs_miss(tmp_path: Path) -> None:
    cache = MeasureCache(tmp_path / "c")
    calls: list[int] = []
    data = _set([0, 1], ["a", "b"])

    def make() -> dict:
        calls.append(1)
        return {"rate": np.float64(0.25), "ci": (0.1, 0.4)}

    first = cache.json("t", {"data": data}, make)
    second = cache.json("t", {"data": data}, make)
    assert first == second == {"rate": 0.25, "ci": [0.1, 0.4]} and len(calls) == 1
    changed = ImageSet(images=data.images.copy(), labels=data.labels, class_names=data.class_names)
    changed.images[0, 0, 0, 0] += 0.5
    cache.json("t", {"data": changed}, make)
    assert len(calls) == 2 and cache.hits == ["t"]
    # a torn entry is recomputed, not trusted
    for p in (tmp_path / "c").glob("t-*.json"):
        p.write_text("{not json")
    assert cache.json("t", {"data": data}, make) == first and len(calls) == 3
    assert digest({"x": data}) != digest({"x": changed})


def test_cached_classifier_predicts_like_the_trained_one(tmp_path: Path) -> None:
    from privdistill.classifier import features

    data = _set([0, 1] * 8, ["a", "b"], seed=1)
    assert data.labels is not None
    fresh = MeasureCache(tmp_path).classifier(data.images, data.labels, 2, steps=3, batch_size=8, seed=5)
    cache = MeasureCache(tmp_path)
    again = cache.classifier(data.images, data.labels, 2, steps=3, batch_size=8, seed=5)
    assert cache.hits == ["classifier"]
    np.testing.assert_allclose(features(fresh, data.images), features(again, data.images), atol=1e-6)


def test_measure_flags_copies_of_the_training_set_and_skips_what_has_no_input() -> None:
    train = _set([0, 1, 0, 1, 0, 1], ["a", "b"], seed=2, pids=True)
    assert train.labels is not None
    copies = ImageSet(images=train.images[:3].copy(), labels=train.labels[:3], class_names=train.class_names)
    out = measure(copies, RealSide(train=train), EvaluateConfig.model_validate({}), analysis_resolution=None, seed=0)
    assert out["n_samples"] == 3 and out["memorization_rate"] == 1.0
    assert "tstr_accuracy" not in out and "fid_domain" not in out and "reid_rate" not in out


def test_no_cache_root_caches_nothing() -> None:
    cache = MeasureCache(None)
    n: list[int] = []

    def make() -> dict[str, int]:
        n.append(1)
        return {"v": 1}

    for _ in range(2):
        cache.json("t", {"k": 1}, make)
    assert len(n) == 2


@pytest.mark.parametrize("bad", [None])
def test_relabel_refuses_unlabelled_images(bad: None) -> None:
    with pytest.raises(ValueError, match="labelled"):
        relabel(ImageSet(images=np.zeros((1, 1, 4, 4), np.float32), labels=bad, class_names=["a"]), ["a"])
