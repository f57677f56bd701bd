"""Federated mode end to end with real processes on 127.0.0.1: `privdistill-coordinator federate` starts a
Flower SuperLink (TLS with the provisioned CA, SuperNode authentication with the provisioned node keys) and
submits the app with `flwr run`; three sites `privdistill-site join` (two with an approved shard, one
without); an unregistered SuperNode tries to join. Two FedAvg rounds on a tiny class-conditioned UNet."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from _fixtures import FMNIST, process_running
from test_export_gate import CLASSES, Site, approved_shard, build_reid, make_site

from coordinator.provision import provision, write_flower_node_key
from site_agent.audit_log import read_audit

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SITES = ("site-a", "site-b", "site-c")  # site-c packages a shard but nobody approved it

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST not installed")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0",
            "PATH": str(BIN) + os.pathsep + os.environ.get("PATH", "")}


def spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env(), cwd=ROOT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """End a process this test started, and its process group (the SuperNode it runs)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def wait_for(path: Path, needle: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and needle in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    raise AssertionError(f"{needle!r} not seen (exit {proc.poll()}):\n{path.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("federated")
    prov = provision(root / "provision", list(SITES))
    reid = build_reid(root / "reid")
    sites: dict[str, Site] = {}
    for sid in SITES:
        sites[sid] = make_site(root / sid, reid, name=f"run-{sid}",
                               extra={"id": sid, "ca_file": str(prov.site_dirs[sid] / "ca.pem")})
        if sid == "site-c":
            sites[sid].package()
        else:
            approved_shard(sites[sid])
    write_flower_node_key(root / "rogue", root / "rogue-pubs", "rogue")  # never registered
    training = root / "training.yaml"
    training.write_text(yaml.safe_dump({
        "name": "fed-tiny", "seed": 0, "resolution": 28, "channels": 1,
        "student": {"model": {"conditioning": "class", "block_out_channels": [8, 16], "norm_num_groups": 4,
                              "num_train_timesteps": 50},
                    "train": {"batch_size": 4, "learning_rate": 1.0e-3, "warmup_steps": 0, "mixed_precision": "no"}},
        "federated": {"rounds": 2, "local_steps": 3, "min_nodes": 3, "class_names": list(CLASSES),
                      "round_timeout_s": 150},
    }))
    port, out, logs = free_port(), root / "federated-out", root / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    t0 = time.monotonic()
    try:
        coord = spawn([str(BIN / "privdistill-coordinator"), "federate", "--config", str(prov.config), "--training",
                       str(training), "--out", str(out), "--port", str(port), "--timeout", "240"],
                      logs / "federate.log")
        procs.append(coord)
        wait_for(logs / "federate.log", "SuperLink ready", coord, timeout=90)
        for sid, s in sites.items():
            procs.append(spawn([str(BIN / "privdistill-site"), "join", str(s.config_path), "--workdir", str(s.workdir),
                                "--superlink", f"127.0.0.1:{port}",
                                "--node-key", str(prov.site_dirs[sid] / "flower-node.key")], logs / f"{sid}.log"))
        rogue = spawn([str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--root-certificates",
                       str(prov.ca_cert), "--auth-supernode-private-key", str(root / "rogue" / "flower-node.key"),
                       "--port", str(free_port()), "--max-wait-time", "30"], logs / "rogue.log")
        procs.append(rogue)
        rogue_rc = rogue.wait(timeout=90)
        coord_rc = coord.wait(timeout=300)
        seconds = time.monotonic() - t0
    finally:
        for p in reversed(procs):
            stop(p)
    return {"root": root, "prov": prov, "sites": sites, "out": out, "logs": logs, "coord_rc": coord_rc,
            "rogue_rc": rogue_rc, "seconds": seconds}


@pytest.mark.timeout(420)
def test_two_rounds_with_both_approved_sites_produce_a_new_student(federation: dict[str, Any]) -> None:
    from privdistill.config import ModelConfig
    from privdistill.models import DiffusionModel

    out, logs = federation["out"], federation["logs"]
    assert federation["coord_rc"] == 0, (logs / "federate.log").read_text()[-4000:]
    res = json.loads((out / "federated.json").read_text())
    assert res["status"] == "completed" and res["rounds_completed"] == 2 and len(res["rounds"]) == 2
    assert res["participating_sites"] == ["site-a", "site-b"]
    for rnd in res["rounds"]:
        assert rnd["aggregated"] and len(rnd["sampled_node_ids"]) == 3
        assert sorted(p["site"] for p in rnd["participants"]) == ["site-a", "site-b"]
        assert all(p["num_examples"] == 5 and p["shard_id"].startswith(p["site"]) for p in rnd["participants"])
    assert res["server_evaluation"]["enabled"] is False and "skipped" in res["server_evaluation"]["note"]
    # the saved student loads and differs from the initial weights
    model = DiffusionModel.load(out / "model")
    fresh = DiffusionModel.from_config(ModelConfig(block_out_channels=[8, 16], norm_num_groups=4,
                                                   num_train_timesteps=50), resolution=28, channels=1,
                                       class_names=list(CLASSES), seed=0)
    trained, initial = model.unet.state_dict(), fresh.unet.state_dict()
    assert trained.keys() == initial.keys() and model.class_names == list(CLASSES)
    assert sum(not np.allclose(trained[k].numpy(), initial[k].numpy()) for k in trained) > len(trained) // 2
    assert res["final_sha256"] != res["initial_sha256"]
    for sid in ("site-a", "site-b"):
        rounds = [r for r in read_audit(federation["sites"][sid].workdir) if r["event"] == "federated_round"]
        assert [r["server_round"] for r in rounds] == [1, 2]
    assert federation["seconds"] < 240


def test_the_site_without_an_approved_shard_refused_every_round_and_sent_no_weights(
        federation: dict[str, Any]) -> None:
    res = json.loads((federation["out"] / "federated.json").read_text())
    refusals = [r for r in res["refusals"] if r["site"] == "site-c"]
    assert [r["round"] for r in refusals] == [1, 2]
    assert all(r["reason"] == "no_approved_shard" and "approve" in r["detail"] for r in refusals)
    c_node = refusals[0]["node_id"]
    assert c_node not in res["participating_node_ids"] and len(res["participating_node_ids"]) == 2
    audit = read_audit(federation["sites"]["site-c"].workdir)
    assert [r["reason"] for r in audit if r["event"] == "federated_refused"] == ["no_approved_shard"] * 2
    assert not [r for r in audit if r["event"] == "federated_round"]


def test_an_unregistered_supernode_is_refused_by_the_superlink(federation: dict[str, Any]) -> None:
    logs = federation["logs"]
    rogue = (logs / "rogue.log").read_text()
    assert federation["rogue_rc"] != 0
    assert "Failed to activate SuperNode" in rogue, rogue[-2000:]
    superlink = (federation["prov"].root / "coordinator" / "state" / "flower" / "logs" / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink
    res = json.loads((federation["out"] / "federated.json").read_text())
    assert all(len(r["sampled_node_ids"]) == 3 for r in res["rounds"]), "the rogue node was never sampled"
    provisioned = {p.stem for p in (federation["prov"].root / "coordinator" / "flower-nodes").glob("*.pub")}
    assert provisioned == set(SITES)


def _running_with(*needles: str) -> list[int]:
    """Pids of running processes (not zombies) whose command line contains every needle."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(n in cmdline for n in needles) and process_running(int(proc.name)):
            found.append(int(proc.name))
    return found


@pytest.mark.timeout(240)
def test_killed_federate_and_join_leave_no_superlink_supernode_or_trainer(federation: dict[str, Any]) -> None:
    """SIGKILL (the OOM killer, a crashed terminal) to `federate` and to `join`, not to their process groups: the
    SuperLink must not stay on the port and the site's SuperNode and warm trainer must not keep taking part."""
    prov, root, site = federation["prov"], federation["root"], federation["sites"]["site-a"]
    port, logs = free_port(), federation["logs"]
    workdir = str(site.workdir.resolve())
    procs = []
    try:
        coord = spawn([str(BIN / "privdistill-coordinator"), "federate", "--config", str(prov.config), "--training",
                       str(root / "training.yaml"), "--out", str(root / "killed-out"), "--port", str(port),
                       "--timeout", "200"], logs / "killed-federate.log")
        procs.append(coord)
        wait_for(logs / "killed-federate.log", "SuperLink ready", coord, timeout=90)
        join = spawn([str(BIN / "privdistill-site"), "join", str(site.config_path), "--workdir", workdir,
                      "--superlink", f"127.0.0.1:{port}", "--node-key", str(prov.site_dirs["site-a"] / "flower-node.key")],
                     logs / "killed-join.log")
        procs.append(join)
        deadline = time.monotonic() + 60
        while not (_running_with("site_agent.supernode", f"127.0.0.1:{port}") and _running_with("site_agent.trainer",
                                                                                             workdir)):
            assert join.poll() is None and time.monotonic() < deadline, (logs / "killed-join.log").read_text()[-2000:]
            time.sleep(0.2)
        assert _running_with("flower-superlink", str(port))
        os.kill(coord.pid, signal.SIGKILL)
        os.kill(join.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while left := (_running_with("flower-superlink", str(port)) + _running_with("site_agent.supernode", f":{port}")
                       + _running_with("site_agent.trainer", workdir)):
            assert time.monotonic() < deadline, f"still running after their parents were killed: {left}"
            time.sleep(0.2)
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # the port is free for the next `federate`
    finally:
        for p in reversed(procs):
            stop(p)
