"""The pixel detector's prefiltered search takes exactly the exhaustive search's decisions, planted copies included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _fixtures import FMNIST, fashion, with_visits

from privdistill import nearsearch, pixel

pytestmark = [
    pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST not installed"),
    pytest.mark.usefixtures("one_thread"),
]


def exhaustive(query: np.ndarray, ref: np.ndarray, max_shift: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest training image over shifts by the plain chunked search (the reference implementation)."""
    d, i, _, _ = pixel.knn_over_shifts(query, ref, max_shift, k=1)
    return d[:, 0], i[:, 0]


@pytest.fixture(scope="module")
def data() -> dict:
    """150 patients x 2 visits; queries: 10 exact copies, 10 copies shifted by 1 px, 10 with noise (sd 0.1),
    10 shifted by 2 px (beyond the tolerance) and 60 fresh items."""
    gallery = with_visits(fashion("train", 0, 150), visits=2, seed=0).images
    rng = np.random.default_rng(1)
    src = rng.choice(len(gallery), 40, replace=False)
    copies = gallery[src[:10]]
    shifted = np.roll(gallery[src[10:20]], (1, -1), axis=(2, 3))
    noisy = np.clip(gallery[src[20:30]] + rng.normal(0, 0.1, (10, 1, 28, 28)), -1, 1).astype(np.float32)
    far = np.roll(gallery[src[30:40]], 2, axis=3)
    fresh = fashion("t10k", 0, 60)
    query = np.concatenate([copies, shifted, noisy, far, fresh])
    d, i = exhaustive(query, gallery, 1)
    return {"gallery": gallery, "query": query, "src": src, "d": d, "i": i}


@pytest.mark.parametrize("dims", [2, 16])
def test_decisions_equal_exhaustive_search(data: dict, dims: int) -> None:
    index = nearsearch.ShiftIndex(data["gallery"], 1, dims=dims)
    d_ex, i_ex = data["d"], data["i"]
    fresh_d = d_ex[40:]
    # radii from "copies only" to "a quarter of the fresh items" (quantiles of the exhaustive distances)
    for radius in (0.5, float(np.quantile(fresh_d, 0.05)), float(np.quantile(fresh_d, 0.25))):
        near = nearsearch.near_over_shifts(data["query"], index, radius, query_block=32)
        within = d_ex < radius
        np.testing.assert_array_equal(near.within, within)
        np.testing.assert_array_equal(near.index[within], i_ex[within])
        # knn's |q|^2 - 2qr + |r|^2 rounds squared distances by ~1e-4 where |q|^2 ~ 100 (a copy reads 0.0055 there, 0 here)
        np.testing.assert_allclose(near.distance[within] ** 2, d_ex[within] ** 2, rtol=1e-4, atol=1e-4)
        assert np.isinf(near.distance[~within]).all() and (near.index[~within] == -1).all()
    # every exact, 1-px shifted and noisy copy is found (nearest: its source, or the other visit of its patient)
    near = nearsearch.near_over_shifts(data["query"], index, float(np.quantile(fresh_d, 0.05)))
    assert near.within[:30].all()
    assert (near.index[:30] // 2 == data["src"][:30] // 2).all()
    assert near.candidates < 0.2 * 9 * len(data["query"]) * len(data["gallery"])  # the prefilter prunes


def test_copy_whose_low_resolution_neighbour_is_another_image_is_still_found(data: dict) -> None:
    """With 2 principal directions the prefilter's nearest (by its lower bound) is the wrong training image for
    some planted copies; the search still returns the true one, because it checks every candidate exactly."""
    index = nearsearch.ShiftIndex(data["gallery"], 1, dims=2)
    s = index.shift
    q_aug = index.bound_vectors(torch.from_numpy(pixel.pixel_features(
        pixel.shifted_crop(data["query"][:30], 0, 0, s))).double() - index.mean)
    low_res_nearest = torch.cdist(q_aug, index.ref_aug).argmin(1).numpy()
    missed = np.flatnonzero(low_res_nearest // 2 != data["src"][:30] // 2)  # not even the same patient
    assert len(missed) >= 3, missed
    near = nearsearch.near_over_shifts(data["query"][missed], index, 0.5)
    np.testing.assert_array_equal(near.index, data["i"][missed])
    assert (near.index // 2 == data["src"][missed] // 2).all()


def test_empty_inputs_and_zero_radius() -> None:
    gallery = fashion("train", 0, 5)
    index = nearsearch.ShiftIndex(gallery, 1)
    assert len(nearsearch.near_over_shifts(gallery[:0], index, 1.0).distance) == 0
    none = nearsearch.near_over_shifts(gallery, index, 0.0)
    assert not none.within.any() and (none.index == -1).all()
