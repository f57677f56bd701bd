"""The site's warm trainer (site_agent.trainer): a round handed to it trains exactly as in the ClientApp's own
process; its refusals and failures come back as the ClientApp's; without it the ClientApp trains itself."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_federated_client import SPEC, global_arrays

from privdistill.data.types import ImageSet
from site_agent import federated, trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _data() -> ImageSet:
    rng = np.random.default_rng(0)
    return ImageSet(rng.uniform(-1, 1, (8, 1, 28, 28)).astype(np.float32), labels=rng.integers(0, 2, 8),
                    class_names=list(SPEC.class_names))


@pytest.fixture()
def running(tmp_path: Path):
    thread = threading.Thread(target=trainer.serve_trainer, args=(tmp_path,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (trainer.trainer_dir(tmp_path) / trainer.KEY_NAME).exists():
        assert time.monotonic() < deadline and thread.is_alive(), "trainer not ready in 60 s"
        time.sleep(0.05)
    yield tmp_path
    trainer.stop(tmp_path)
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_a_round_in_the_warm_trainer_equals_one_in_process(running: Path) -> None:
    arrays, data = global_arrays(), _data()
    assert trainer.trainer_dir(running).stat().st_mode & 0o777 == 0o700
    assert (trainer.trainer_dir(running) / trainer.KEY_NAME).stat().st_mode & 0o777 == 0o600
    remote, r_report = federated.train_local(SPEC, arrays, data, seed=11, workdir=running)
    local, l_report = federated.train_local(SPEC, arrays, data, seed=11)  # no workdir: this process
    assert sorted(remote) == sorted(local)
    assert all(torch.equal(remote[k], local[k]) for k in local)
    assert r_report["steps"] == l_report["steps"] == SPEC.train.steps
    assert not all(torch.equal(local[k], torch.from_numpy(arrays[k].numpy())) for k in local)  # it did train


def test_weights_that_do_not_fit_are_refused_by_the_trainer(running: Path) -> None:
    arrays = global_arrays()
    bad = {k: a.numpy() for k, a in arrays.items()}
    bad.pop(sorted(bad)[0])
    from flwr.app import ArrayRecord

    with pytest.raises(federated.Refusal) as exc:
        federated.train_local(SPEC, ArrayRecord({k: torch.from_numpy(v) for k, v in bad.items()}), _data(), seed=1,
                              workdir=running)
    assert exc.value.reason == "bad_global_model"


def test_no_trainer_or_a_wrong_key_means_training_in_process(tmp_path: Path) -> None:
    assert trainer.connect(tmp_path) is None
    d = trainer.trainer_dir(tmp_path)
    d.mkdir(parents=True)
    (d / trainer.KEY_NAME).write_bytes(b"k" * 32)  # a key but no listener
    assert trainer.connect(tmp_path) is None
