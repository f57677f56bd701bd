"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _private_state_dir(tmp_path_factory: pytest.TempPathFactory):
    """The privacy-budget ledger (privdistill.budget) of every test lives in a temporary state directory,
    never in the user's ~/.local/state."""
    import os

    from privdistill.budget import STATE_ENV

    before = os.environ.get(STATE_ENV)
    os.environ[STATE_ENV] = str(tmp_path_factory.mktemp("privdistill-state"))
    yield
    if before is None:
        os.environ.pop(STATE_ENV, None)
    else:
        os.environ[STATE_ENV] = before


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
def reid_src(tmp_path_factory: pytest.TempPathFactory):
    from test_export_gate import build_reid

    return build_reid(tmp_path_factory.mktemp("reid"))


@pytest.fixture
def site(tmp_path, reid_src):
    from test_export_gate import make_site

    return make_site(tmp_path / "site", reid_src)
