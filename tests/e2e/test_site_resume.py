"""kill -9 the site agent in the middle of teacher training: `privdistill-site run` resumes without
redoing finished stages and ends with one approved shard (real process, tiny config)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from privdistill import identity

ROOT = Path(__file__).resolve().parents[2]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
SITE = [sys.executable, "-m", "site_agent.cli"]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed (make test installs it)"),
]


def _finished(workdir: Path) -> dict[str, str]:
    return {p.parent.name: json.loads(p.read_text())["finished_at"] for p in workdir.glob("*/_stage.json")}


@pytest.mark.timeout(900)
def test_killed_site_run_resumes_without_redoing_finished_stages(tmp_path: Path) -> None:
    identity.save_private_key(identity.generate_key(), tmp_path / "site.key")
    (tmp_path / "ca.pem").write_text("not used: this test never exports\n")
    cfg = yaml.safe_load((ROOT / "examples" / "site-tiny.yaml").read_text())
    cfg["teacher"]["train"]["steps"] = 300
    cfg["site"] = {"id": "site-a", "coordinator_url": "https://127.0.0.1:9", "ca_file": "ca.pem",
                   "key_file": "site.key", "approval": "auto"}
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(cfg))
    w = tmp_path / "w"
    cmd = [*SITE, "run", str(tmp_path / "site.yaml"), "--workdir", str(w)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list(w.glob(".checkpoints/train-teacher/*/train_state.pt")):
            assert proc.poll() is None, "site run exited before the teacher checkpointed"
            assert time.time() < deadline, "no teacher checkpoint within 300 s"
            time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    before = _finished(w)
    assert "ingest" in before and "train-teacher" not in before and "package" not in before

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    assert done.returncode == 0, done.stderr[-2000:]
    after = _finished(w)
    assert {k: after[k] for k in before} == before  # finished stages were not redone
    assert {"train-teacher", "train-reid", "sample", "filter", "package"} <= set(after)
    teacher = json.loads((w / "train-teacher" / "_stage.json").read_text())
    assert teacher["report"]["resumed_from"] >= 50 and teacher["report"]["steps"] == 300
    shards = json.loads(subprocess.run([*SITE, "shards", "--workdir", str(w), "--json"], cwd=ROOT, env=env,
                                       capture_output=True, text=True, check=True).stdout)
    assert [s["state"] for s in shards] == ["approved"]
    assert not list(w.glob(".*.tmp*")) and not list(w.glob("*.tmp"))
