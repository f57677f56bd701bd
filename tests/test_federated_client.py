"""The site's ClientApp handler, called directly with constructed Flower Messages: it trains only on the
approved shard that passes the export gate, and refuses (an error reply carrying no weights, plus an audit
record) when there is none or the gate fails."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from _fixtures import FMNIST
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from test_export_gate import CLASSES, Site, approved_shard, flip_png_byte, rewrite_tar

from privdistill.config import ModelConfig, TrainConfig
from privdistill.federated import FAILED_CODE, REFUSED_CODE, StudentSpec, pack_weights, parse_refusal, weights_layout
from privdistill.models import DiffusionModel
from site_agent import client_app
from site_agent.audit_log import read_audit

pytestmark = [pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST not installed"),
              pytest.mark.usefixtures("one_thread")]

SPEC = StudentSpec(model=ModelConfig(block_out_channels=[8, 16], norm_num_groups=4, num_train_timesteps=50),
                   train=TrainConfig(steps=2, batch_size=4, warmup_steps=0, learning_rate=1e-3, log_every=1,
                                     checkpoint_every=100, mixed_precision="no"),
                   resolution=28, channels=1, class_names=list(CLASSES), seed=3)


def global_arrays(spec: StudentSpec = SPEC) -> ArrayRecord:
    """The global weights as the ServerApp sends them: one flat vector."""
    return pack_weights(student(spec).unet.state_dict())


def student(spec: StudentSpec = SPEC) -> DiffusionModel:
    return DiffusionModel.from_config(spec.model, resolution=spec.resolution, channels=spec.channels,
                                      class_names=spec.class_names, seed=spec.seed)


LAYOUT = weights_layout(student().unet.state_dict())


def delivered(content: RecordDict, run_id: int = 5) -> Message:
    """A train message as the SuperNode hands it to the ClientApp (metadata set by the SuperLink)."""
    meta = Metadata(run_id=run_id, message_id="m1", src_node_id=1, dst_node_id=11, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=600, message_type=MessageType.TRAIN)
    return Message(content, metadata=meta)


def train_message(arrays: ArrayRecord, spec: StudentSpec = SPEC, server_round: int = 1, run_id: int = 5,
                  layout: str | None = None) -> Message:
    config = ConfigRecord({"student-spec": spec.to_json(), "server-round": server_round,
                           "weights-layout": layout or weights_layout(student(spec).unet.state_dict())})
    return delivered(RecordDict({"arrays": arrays, "config": config}), run_id)


def context(site: Site | None) -> Context:
    node_config: dict[str, Any] = {} if site is None else {"site-config": str(site.config_path),
                                                           "workdir": str(site.workdir)}
    return Context(run_id=5, node_id=11, node_config=node_config, state=RecordDict(), run_config={})


def events(site: Site, name: str) -> list[dict[str, Any]]:
    return [r for r in read_audit(site.workdir) if r["event"] == name]


def assert_refused(reply: Message, site: Site | None, reason: str, code: int = REFUSED_CODE) -> dict[str, Any]:
    assert reply.has_error() and not reply.has_content(), "a refusal carries no weights"
    assert reply.error.code == code
    parsed = parse_refusal(reply.error.reason)
    assert parsed is not None and parsed["reason"] == reason, reply.error.reason
    if site is not None:
        assert parsed["site"] == "site-a"
        rec = events(site, "federated_refused")[-1]
        assert rec["reason"] == reason and rec["server_round"] == 1 and rec["run_id"] == reply.metadata.run_id
        assert events(site, "federated_round") == []
        assert str(site.root) not in reply.error.reason, "refusal reasons never carry local paths"
    return parsed


def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_: Any, **__: Any) -> None:
        raise AssertionError("training ran although the gate refused")
    monkeypatch.setattr(client_app, "train_local", fail)


# ----------------------------------------------------------------------------- the one case that trains
def test_trains_the_global_student_on_the_approved_shard_only(site: Site) -> None:
    sid = approved_shard(site)
    arrays = global_arrays()
    before = {k: a.numpy().copy() for k, a in arrays.items()}
    reply = client_app.handle_train(train_message(arrays), context(site))
    assert not reply.has_error()
    out = reply.content["arrays"]
    assert list(out.keys()) == ["flat"] and out["flat"].numpy().shape == before["flat"].shape
    changed = np.mean(out["flat"].numpy() != before["flat"])
    assert changed > 0.5, "local training changed the weights"
    metrics, prov = reply.content["metrics"], reply.content["provenance"]
    assert metrics["num-examples"] == 5 and np.isfinite(metrics["train-loss"])
    assert prov["site"] == "site-a" and prov["shard-id"] == sid
    rec = events(site, "federated_round")[-1]
    assert rec["shard_id"] == sid and rec["num_examples"] == 5 and rec["local_steps"] == 2
    kept = list((site.workdir / ".export").iterdir())
    assert kept == [client_app.run_snapshot_dir(site.workdir)], "only this run's verified snapshot stays"
    assert sorted(p.name for p in kept[0].iterdir()) == sorted(["shard.tar", "manifest.json", "manifest.sig",
                                                                 client_app.SIDECAR])


def test_start_weights_are_the_servers_and_a_mismatching_global_model_is_refused(site: Site) -> None:
    approved_shard(site)
    arrays = global_arrays()
    short = pack_weights({"w": arrays["flat"].numpy()[:-1]})  # one value short of the student
    reply = client_app.handle_train(train_message(short), context(site))
    assert_refused(reply, site, "bad_global_model", code=FAILED_CODE)
    other = train_message(arrays, layout="0" * 64)  # the server's student is laid out differently
    parsed = assert_refused(client_app.handle_train(other, context(site)), site, "bad_global_model", code=FAILED_CODE)
    assert "layout" in parsed["detail"]


# ----------------------------------------------------------------------------- refusals
def test_refuses_without_an_approved_shard(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    no_training(monkeypatch)
    site.package()  # packaged, not approved
    parsed = assert_refused(client_app.handle_train(train_message(global_arrays()), context(site)), site,
                            "no_approved_shard")
    assert "approve" in parsed["detail"]


def test_refuses_when_the_approved_shard_fails_the_gate(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    no_training(monkeypatch)
    sid = approved_shard(site)
    rewrite_tar(site.workdir / "shards" / sid, flip_png_byte)
    assert_refused(client_app.handle_train(train_message(global_arrays()), context(site)), site, "hash_mismatch")
    assert events(site, "export_refused")[-1]["reason"] == "hash_mismatch", "the gate audits its own refusal"


def test_an_exported_shard_still_trains_but_a_rejected_one_never(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    from site_agent.state import SiteState

    calls: list[int] = []
    monkeypatch.setattr(client_app, "train_local", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(
        client_app.Refusal("stop_here", "training reached", code=FAILED_CODE)))
    sid = approved_shard(site)
    SiteState(site.workdir).mark_exported(sid, destination="https://127.0.0.1:9", upload_id="u1")
    # already shared with the coordinator, so the gate lets it train the federated student too
    assert_refused(client_app.handle_train(train_message(global_arrays()), context(site)), site, "stop_here",
                   code=FAILED_CODE)
    assert calls == [1]
    with SiteState(site.workdir)._db() as db:
        db.execute("UPDATE shards SET state = 'rejected', reason = 'steward said no' WHERE shard_id = ?", (sid,))
    assert_refused(client_app.handle_train(train_message(global_arrays()), context(site)), site, "no_approved_shard")
    assert calls == [1]


def test_refuses_classes_the_federation_does_not_have(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    no_training(monkeypatch)
    approved_shard(site)
    spec = StudentSpec(model=SPEC.model, train=SPEC.train, resolution=28, channels=1,
                       class_names=["Trouser", "Sneaker"], seed=3)
    parsed = assert_refused(client_app.handle_train(train_message(global_arrays(spec), spec), context(site)), site,
                            "class_mismatch")
    assert "Bag" in parsed["detail"]


def test_refuses_a_request_without_a_student_spec(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    no_training(monkeypatch)
    approved_shard(site)
    msg = delivered(RecordDict({"arrays": global_arrays(), "config": ConfigRecord({"server-round": 1})}))
    assert_refused(client_app.handle_train(msg, context(site)), site, "bad_request")


def test_refuses_on_a_supernode_started_without_the_site_config(monkeypatch: pytest.MonkeyPatch) -> None:
    no_training(monkeypatch)
    reply = client_app.handle_train(train_message(global_arrays()), context(None))
    assert parse_refusal(reply.error.reason)["site"] == "unknown"
    assert_refused(reply, None, "node_misconfigured")


# ----------------------------------------------------------------------------- the per-round re-check
def counting_gate(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every full export-gate check the ClientApp runs; training is replaced by a cheap stand-in that
    checks and decodes the snapshot exactly as the real one does."""
    calls: list[str] = []
    real = client_app.check_export

    def check(workdir: Any, ref: Any, cfg: Any, **kw: Any) -> Any:
        calls.append(str(ref))
        return real(workdir, ref, cfg, **kw)

    def train(spec: StudentSpec, arrays: ArrayRecord, data: Any, seed: int, layout: str | None) -> tuple[dict, dict]:
        assert len(data) == 5 and data.images.shape[1:] == (1, 28, 28) and layout == LAYOUT
        return {"w": arrays["flat"].numpy() * 0}, {"final_loss": 0.5, "steps": 1}

    monkeypatch.setattr(client_app, "check_export", check)
    monkeypatch.setattr(client_app, "train_local", train)
    monkeypatch.setattr(client_app.trainer, "connect", lambda workdir: None)
    return calls


def round_(site: Site, server_round: int, run_id: int = 5) -> Message:
    return client_app.handle_train(train_message(global_arrays(), server_round=server_round, run_id=run_id),
                                   context(site))


def test_later_rounds_of_a_run_reuse_the_verified_snapshot_a_new_run_checks_in_full(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_gate(monkeypatch)
    sid = approved_shard(site)
    for rnd in (1, 2, 3):
        assert not round_(site, rnd).has_error()
    assert calls == [sid], "the whole gate runs once per run"
    assert not round_(site, 1, run_id=6).has_error()
    assert calls == [sid, sid], "a new run checks in full again"
    assert [r["server_round"] for r in events(site, "federated_round")] == [1, 2, 3, 1]


def test_a_shard_modified_between_rounds_is_refused(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_gate(monkeypatch)
    sid = approved_shard(site)
    assert not round_(site, 1).has_error()
    rewrite_tar(site.workdir / "shards" / sid, flip_png_byte)
    reply = round_(site, 2)
    assert reply.has_error() and parse_refusal(reply.error.reason)["reason"] == "hash_mismatch"
    assert calls == [sid, sid]
    assert not (client_app.run_snapshot_dir(site.workdir) / client_app.SIDECAR).exists(), \
        "a refused check leaves nothing to reuse"
    assert round_(site, 3).has_error(), "and the next round checks in full again"


def test_an_in_place_edit_that_restores_size_and_mtime_is_still_caught(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    calls = counting_gate(monkeypatch)
    sid = approved_shard(site)
    assert not round_(site, 1).has_error()
    tar = site.workdir / "shards" / sid / "shard.tar"
    st = os.stat(tar)
    time.sleep(0.01)  # past the file system's timestamp granularity
    data = bytearray(tar.read_bytes())
    data[600] ^= 1  # inside the first member's bytes: same size, same inode
    with open(tar, "r+b") as fh:
        fh.write(bytes(data))
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime cannot be
    assert os.stat(tar).st_ino == st.st_ino and os.stat(tar).st_size == st.st_size
    reply = round_(site, 2)
    assert reply.has_error() and parse_refusal(reply.error.reason)["reason"] == "hash_mismatch"
    assert calls == [sid, sid]


def test_a_rejected_shard_is_refused_in_the_next_round_of_the_same_run(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    from site_agent.state import SiteState

    counting_gate(monkeypatch)
    sid = approved_shard(site)
    assert not round_(site, 1).has_error()
    with SiteState(site.workdir)._db() as db:
        db.execute("UPDATE shards SET state = 'rejected', reason = 'steward said no' WHERE shard_id = ?", (sid,))
    reply = round_(site, 2)
    assert reply.has_error() and parse_refusal(reply.error.reason)["reason"] == "no_approved_shard"


def test_a_register_edit_between_rounds_means_the_full_check_again(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    from site_agent.state import SiteState

    calls = counting_gate(monkeypatch)
    sid = approved_shard(site)
    assert not round_(site, 1).has_error()
    with SiteState(site.workdir)._db() as db:  # the register now points at another filter record
        db.execute("UPDATE shards SET filter_record_sha256 = ? WHERE shard_id = ?", ("0" * 64, sid))
    reply = round_(site, 2)
    assert reply.has_error() and parse_refusal(reply.error.reason)["reason"] == "stale_filter"
    assert calls == [sid, sid]


def test_a_tampered_kept_snapshot_is_never_trained_on(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    calls = counting_gate(monkeypatch)
    sid = approved_shard(site)
    assert not round_(site, 1).has_error()
    keep = client_app.run_snapshot_dir(site.workdir)
    rewrite_tar(keep, flip_png_byte)  # the kept copy changes: the re-check notices and takes a fresh snapshot
    assert not round_(site, 2).has_error()
    assert calls == [sid, sid]
    # even if the re-check were fooled (fingerprints rewritten to match), the bytes read are checked before use
    rewrite_tar(keep, flip_png_byte)
    side = json.loads((keep / client_app.SIDECAR).read_text())
    side["snapshot"] = client_app._fingerprints(client_app._snapshot_files(keep))
    (keep / client_app.SIDECAR).write_text(json.dumps(side))
    reply = round_(site, 3)
    assert reply.has_error() and parse_refusal(reply.error.reason)["reason"] == "changed_during_export"
    assert calls == [sid, sid], "the fooled re-check passed; the read check refused"
    assert [r["server_round"] for r in events(site, "federated_round")] == [1, 2]
