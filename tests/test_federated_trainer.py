"""The site's warm trainer (site_agent.trainer): a round handed to it (load the gated snapshot, check it, train)
gives exactly what the ClientApp's own process gives; its refusals come back as the ClientApp's refusals."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_federated_client import LAYOUT, SPEC, global_arrays

from privdistill.data.types import ImageSet
from privdistill.federated import pack_weights
from privdistill.identity import generate_key
from privdistill.shard import SHARD_TAR, parse_manifest, write_shard
from site_agent import client_app, trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _snapshot(root: Path, class_names: list[str], name: str = "snap") -> tuple[Path, object]:
    rng = np.random.default_rng(0)
    kept = ImageSet(rng.uniform(-1, 1, (8, 1, 28, 28)).astype(np.float32), labels=rng.integers(0, 2, 8),
                    class_names=class_names)
    write_shard(kept, root / name, site_id="s", shard_id=name, config_hash="0" * 64, privacy={"kept": 8},
                key=generate_key())
    return root / name / SHARD_TAR, parse_manifest((root / name / "manifest.json").read_bytes())


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
    assert trainer.trainer_dir(running).stat().st_mode & 0o777 == 0o700
    assert (trainer.trainer_dir(running) / trainer.KEY_NAME).stat().st_mode & 0o777 == 0o600
    tar, manifest = _snapshot(running, list(SPEC.class_names))
    arrays = global_arrays()
    conn = trainer.connect(running)
    assert conn is not None
    remote, r_report, n = trainer.train_round(conn, SPEC, arrays, tar, manifest, seed=11, layout=LAYOUT)
    local, l_report = client_app.train_local(SPEC, arrays, client_app.load_gated(tar, manifest, SPEC), seed=11,
                                             layout=LAYOUT)
    assert n == 8 and r_report["steps"] == l_report["steps"] == SPEC.train.steps
    assert list(remote.keys()) == ["flat"]
    got, want = remote["flat"].numpy(), pack_weights(local)["flat"].numpy()
    assert got.shape == want.shape == arrays["flat"].numpy().shape and np.array_equal(got, want)
    assert not np.array_equal(want, arrays["flat"].numpy())  # it did train


def test_the_trainers_refusals_are_the_clientapps(running: Path) -> None:
    tar, manifest = _snapshot(running, ["cat", "dog"], "other")  # classes the student does not have
    conn = trainer.connect(running)
    assert conn is not None
    with pytest.raises(client_app.Refusal) as exc:
        trainer.train_round(conn, SPEC, global_arrays(), tar, manifest, seed=1)
    assert exc.value.reason == "class_mismatch"
    tar, manifest = _snapshot(running, list(SPEC.class_names))
    bad = pack_weights({"w": global_arrays()["flat"].numpy()[:-1]})  # one value short of the student
    conn = trainer.connect(running)
    assert conn is not None
    with pytest.raises(client_app.Refusal) as exc:
        trainer.train_round(conn, SPEC, bad, tar, manifest, seed=1, layout=LAYOUT)
    assert exc.value.reason == "bad_global_model"


def test_no_trainer_or_a_wrong_key_means_training_in_process(tmp_path: Path) -> None:
    assert trainer.connect(tmp_path) is None
    d = trainer.trainer_dir(tmp_path)
    d.mkdir(parents=True)
    (d / trainer.KEY_NAME).write_bytes(b"k" * 32)  # a key but no listener
    assert trainer.connect(tmp_path) is None
