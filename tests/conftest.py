"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core box, oversubscribed OpenMP threads make training ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- a site work directory
# (for the export gate, site CLI and federated client tests; built without training, see test_export_gate)
@pytest.fixture(scope="module")
def reid_src(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - Path
    from test_export_gate import build_reid

    return build_reid(tmp_path_factory.mktemp("reid"))


@pytest.fixture
def site(tmp_path, reid_src):  # noqa: ANN001, ANN201 - test_export_gate.Site
    from test_export_gate import make_site

    return make_site(tmp_path / "site", reid_src)
