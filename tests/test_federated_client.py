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
from privdistill.federated import FAILED_CODE, REFUSED_CODE, StudentSpec, parse_refusal
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
    model = DiffusionModel.from_config(spec.model, resolution=spec.resolution, channels=spec.channels,
                                       class_names=spec.class_names, seed=spec.seed)
    return ArrayRecord({k: v.detach().clone() for k, v in model.unet.state_dict().items()})


def delivered(content: RecordDict) -> Message:
    """A train message as the SuperNode hands it to the ClientApp (metadata set by the SuperLink)."""
    meta = Metadata(run_id=5, message_id="m1", src_node_id=1, dst_node_id=11, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=600, message_type=MessageType.TRAIN)
    return Message(content, metadata=meta)


def train_message(arrays: ArrayRecord, spec: StudentSpec = SPEC, server_round: int = 1) -> Message:
    return delivered(RecordDict({"arrays": arrays, "config": ConfigRecord({"student-spec": spec.to_json(),
                                                                           "server-round": server_round})}))


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
    assert set(out.keys()) == set(before)
    changed = [k for k in before if not np.array_equal(out[k].numpy(), before[k])]
    assert len(changed) > len(before) // 2, "local training changed the weights"
    metrics, prov = reply.content["metrics"], reply.content["provenance"]
    assert metrics["num-examples"] == 5 and np.isfinite(metrics["train-loss"])
    assert prov["site"] == "site-a" and prov["shard-id"] == sid
    rec = events(site, "federated_round")[-1]
    assert rec["shard_id"] == sid and rec["num_examples"] == 5 and rec["local_steps"] == 2
    assert not any((site.workdir / ".export").iterdir()), "the private snapshot is removed after the round"


def test_start_weights_are_the_servers_and_a_mismatching_global_model_is_refused(site: Site) -> None:
    approved_shard(site)
    arrays = global_arrays()
    del arrays[next(iter(arrays.keys()))]
    reply = client_app.handle_train(train_message(arrays), context(site))
    assert_refused(reply, site, "bad_global_model", code=FAILED_CODE)


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
