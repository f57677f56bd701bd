"""The coordinator's FedAvg: only well-formed updates from sites that passed their gate are averaged;
refusals, malformed replies and silent nodes are recorded per round with their reasons."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, Metadata, MetricRecord, RecordDict

from coordinator.server_app import GatedFedAvg, PromptGrid, arrays_sha256
from privdistill.federated import REFUSED_CODE, pack_weights, refusal_reason, unpack_weights, weights_layout


def _meta(src: int) -> Metadata:
    return Metadata(run_id=1, message_id=f"r{src}", src_node_id=src, dst_node_id=0, reply_to_message_id="m",
                    group_id="1", created_at=time.time(), ttl=600, message_type=MessageType.TRAIN)


def update(src: int, value: float, n: int, *, shape: tuple[int, ...] = (2, 3)) -> Message:
    return Message(RecordDict({
        "arrays": ArrayRecord({"w": Array(np.full(shape, value, np.float32)), "b": Array(np.full(3, value, np.float32))}),
        "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5}),
        "provenance": ConfigRecord({"site": f"site-{src}", "shard-id": f"site-{src}-abc", "tar-sha256": "ab" * 32}),
    }), metadata=_meta(src))


def refused(src: int) -> Message:
    return Message(error=Error(REFUSED_CODE, refusal_reason(f"site-{src}", "no_approved_shard", "approve one")),
                   metadata=_meta(src))


def test_averages_only_well_formed_updates_and_records_every_refusal() -> None:
    # Prepare
    glob = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32)), "b": Array(np.zeros(3, np.float32))})
    strategy = GatedFedAvg(min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0)
    strategy.begin_round([1, 2, 3, 4, 5], glob)
    replies = [update(1, 1.0, 10), update(2, 3.0, 30), refused(3), update(5, 100.0, 1000, shape=(3, 2))]
    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)
    # Assert
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 3), 2.5))  # (1*10 + 3*30) / 40
    np.testing.assert_allclose(arrays["b"].numpy(), np.full(3, 2.5))
    assert dict(metrics) == {"train-loss": 0.5}
    rnd = strategy.rounds[0]
    assert rnd["aggregated"] and rnd["sampled_node_ids"] == [1, 2, 3, 4, 5]
    assert [(p["node_id"], p["site"], p["num_examples"]) for p in rnd["participants"]] == [(1, "site-1", 10),
                                                                                           (2, "site-2", 30)]
    by_node = {r["node_id"]: r for r in rnd["refusals"]}
    assert by_node[3]["reason"] == "no_approved_shard" and by_node[3]["site"] == "site-3"
    assert by_node[3]["code"] == REFUSED_CODE and by_node[3]["detail"] == "approve one"
    assert by_node[4]["reason"] == "no_reply"
    assert by_node[5]["reason"] == "malformed_reply"
    assert arrays_sha256(arrays) != arrays_sha256(glob)


def test_a_round_where_every_site_refuses_keeps_the_global_weights() -> None:
    glob = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32))})
    strategy = GatedFedAvg(min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0)
    strategy.begin_round([3], glob)
    arrays, metrics = strategy.aggregate_train(1, [refused(3)])
    assert arrays is None and metrics is None
    assert strategy.rounds[0]["aggregated"] is False and strategy.rounds[0]["participants"] == []


def test_server_side_evaluation_scores_weights_on_the_accepted_shards_and_the_spec_needs_classes() -> None:
    import pytest

    from coordinator.server_app import _eval_loss_fn, student_spec
    from coordinator.student import TrainingConfig
    from privdistill.data.types import ImageSet
    from privdistill.errors import ConfigError
    from privdistill.models import DiffusionModel

    cfg = TrainingConfig.model_validate({
        "resolution": 8, "student": {"model": {"block_out_channels": [8, 16], "norm_num_groups": 4,
                                               "num_train_timesteps": 20}, "train": {"steps": 99}},
        "federated": {"local_steps": 3}})
    with pytest.raises(ConfigError, match="federated.class_names"):
        student_spec(cfg, None)
    rng = np.random.default_rng(0)
    data = ImageSet(rng.uniform(-1, 1, (12, 1, 8, 8)).astype(np.float32), labels=np.arange(12) % 2,
                    class_names=["b", "a"])
    spec = student_spec(cfg, data)
    assert spec.class_names == ["b", "a"] and spec.train.steps == 3 and spec.train.checkpoint_every > 3
    evaluate = _eval_loss_fn(spec, data)
    assert _eval_loss_fn(spec, None) is None
    model = DiffusionModel.from_config(spec.model, resolution=8, channels=1, class_names=spec.class_names, seed=0)
    weights = pack_weights(model.unet.state_dict())
    first, again = evaluate(0, weights), evaluate(1, weights)
    assert first["eval_samples"] == 12 and first["eval_loss"] == again["eval_loss"] > 0  # fixed noise and timesteps
    zeroed = pack_weights({k: v * 0 for k, v in model.unet.state_dict().items()})
    assert evaluate(2, zeroed)["eval_loss"] != first["eval_loss"]


# ----------------------------------------------------------------------------- the round's transport
def test_weights_travel_as_one_flat_vector_and_unpack_exactly() -> None:
    import torch

    state = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.bias": torch.tensor([1.5, -2.0])}
    rec = pack_weights(state)
    assert list(rec.keys()) == ["flat"]
    assert rec["flat"].numpy().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 1.5, -2.0]
    out = unpack_weights(rec, state)
    assert list(out) == ["a.weight", "b.bias"] and out["a.weight"].shape == (2, 3)
    assert out["a.weight"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]] and out["b.bias"].tolist() == [1.5, -2.0]
    with pytest.raises(ValueError, match="7 values, the student has 8"):
        unpack_weights(pack_weights({"w": np.zeros(7, np.float32)}), state)
    with pytest.raises(ValueError, match="one array"):
        unpack_weights(ArrayRecord({"a.weight": Array(np.zeros((2, 3), np.float32))}), state)
    swapped = {"a.weight": torch.zeros(3, 2), "b.bias": torch.zeros(2)}  # same size, other shapes
    assert weights_layout(swapped) != weights_layout(state) == weights_layout({k: v + 1 for k, v in state.items()})


class SlowGrid:
    """Replies to message i after ``after[i]`` pulls; never to one whose ``after`` is None."""

    def __init__(self, after: list[int | None]) -> None:
        self.after, self.pulls = after, 0

    def push_messages(self, messages: Any) -> list[str]:
        return [f"m{i}" for i, _ in enumerate(list(messages))]

    def pull_messages(self, ids: Any) -> list[Any]:
        self.pulls += 1
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}"))
                for i, a in enumerate(self.after) if a == self.pulls and f"m{i}" in set(ids)]


def test_the_serverapp_collects_replies_promptly_and_keeps_the_round_timeout() -> None:
    grid = SlowGrid([2, 4])
    t = time.monotonic()
    replies = list(PromptGrid(grid, interval=0.01).send_and_receive(["a", "b"], timeout=30))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"] and grid.pulls == 4
    assert time.monotonic() - t < 2, "four pulls 0.01 s apart (Flower's HttpGrid sleeps 3 s between pulls)"
    silent = SlowGrid([1, None])
    t = time.monotonic()
    replies = list(PromptGrid(silent, interval=0.01).send_and_receive(["a", "b"], timeout=0.3))
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"] and 0.3 <= time.monotonic() - t < 3
    empty = SlowGrid([])
    assert list(PromptGrid(empty).send_and_receive([], timeout=30)) == [] and empty.pulls == 0
