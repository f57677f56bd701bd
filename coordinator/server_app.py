"""The coordinator's Flower ServerApp: FedAvg over the student UNet's weights, counting every site's
refusal, evaluating on the coordinator's accepted shards when it has any; writes the final student
(diffusers save_pretrained layout) and federated.json into the run's output directory."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from coordinator.student import TrainingConfig, load_training_config
from privdistill.data.types import ImageSet
from privdistill.errors import ConfigError, StageError
from privdistill.federated import (
    ARRAYS_KEY,
    CONFIG_KEY,
    LAYOUT_FIELD,
    METRICS_KEY,
    PROVENANCE_KEY,
    SPEC_FIELD,
    WEIGHT_FIELD,
    StudentSpec,
    pack_weights,
    parse_refusal,
    unpack_weights,
    weights_layout,
)
from privdistill.seeds import derive_seed
from privdistill.stages import atomic_write_json

log = structlog.get_logger(__name__)
app = ServerApp()
RESULT_FILE, MODEL_DIR = "federated.json", "model"
EVAL_SAMPLES = 256
REPLY_POLL_S = 0.25  # how often the ServerApp asks the SuperLink for this round's replies


class PromptGrid(Grid):
    """The run's Grid, but ``send_and_receive`` asks for replies every ``interval`` seconds: Flower 1.41's HttpGrid
    sleeps 3 s between pulls, so a round ended on average 1.5 s (at most 3 s) after the last site's reply arrived.
    Everything else is the wrapped grid's own (same messages, same timeout semantics)."""

    def __init__(self, grid: Grid, interval: float = REPLY_POLL_S) -> None:
        self._grid, self.interval = grid, interval

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies += got
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.interval if deadline is None else max(0.0, min(self.interval,
                                                                               deadline - time.monotonic())))
        return replies


def arrays_sha256(arrays: ArrayRecord) -> str:
    """sha256 over the arrays in key order: tells two weight sets apart in federated.json."""
    h = hashlib.sha256()
    for key, arr in sorted(arrays.items()):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arr.numpy()).tobytes())
    return h.hexdigest()


class GatedFedAvg(FedAvg):
    """FedAvg that aggregates only well-formed updates and records, per round, who trained and who refused."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(arrayrecord_key=ARRAYS_KEY, configrecord_key=CONFIG_KEY, weighted_by_key=WEIGHT_FIELD,
                         **kwargs)
        self.rounds: list[dict[str, Any]] = []
        self._sampled: list[int] = []
        self._shapes: dict[str, tuple[int, ...]] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.begin_round([m.metadata.dst_node_id for m in messages], arrays)
        return messages

    def begin_round(self, sampled: list[int], arrays: ArrayRecord) -> None:
        """Remember who was asked and the global parameters' shapes, to check this round's replies against."""
        self._sampled = [int(n) for n in sampled]
        self._shapes = {k: tuple(a.shape) for k, a in arrays.items()}

    def _well_formed(self, msg: Message) -> str | None:
        """Why a non-error reply cannot be aggregated, or None."""
        content = msg.content
        if (PROVENANCE_KEY not in content.config_records or METRICS_KEY not in content.metric_records
                or ARRAYS_KEY not in content.array_records):
            return "the reply lacks the privdistill provenance, metrics or arrays records"
        shapes = {k: tuple(a.shape) for k, a in content.array_records[ARRAYS_KEY].items()}
        if shapes != self._shapes:
            return "the reply's arrays do not match the global student's parameters"
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return "the reply carries extra records"
        metrics = content.metric_records[METRICS_KEY]
        if _number(metrics.get(WEIGHT_FIELD)) is None or _number(metrics.get("train-loss")) is None:
            return "the reply's metrics lack a numeric example count or training loss"
        return None

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        accepted: list[Message] = []
        participants: list[dict[str, Any]] = []
        refusals: list[dict[str, Any]] = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                parsed = parse_refusal(msg.error.reason)
                refusals.append({"node_id": node, "code": int(msg.error.code),
                                 **(parsed or {"site": None, "reason": "node_error",
                                               "detail": (msg.error.reason or "")[-500:]})})
                continue
            problem = self._well_formed(msg)
            if problem is not None:
                refusals.append({"node_id": node, "code": None, "site": None, "reason": "malformed_reply",
                                 "detail": problem})
                continue
            prov, reply = msg.content.config_records[PROVENANCE_KEY], msg.content.metric_records[METRICS_KEY]
            accepted.append(msg)
            participants.append({"node_id": node, "site": prov["site"], "shard_id": prov["shard-id"],
                                 "tar_sha256": prov["tar-sha256"], "num_examples": int(_number(reply[WEIGHT_FIELD]) or 0),
                                 "train_loss": _number(reply["train-loss"])})
        replied = {int(m.metadata.src_node_id) for m in replies}
        for node in self._sampled:
            if node not in replied:
                refusals.append({"node_id": node, "code": None, "site": None, "reason": "no_reply",
                                 "detail": "no reply within the round timeout"})
        arrays, metrics = super().aggregate_train(server_round, accepted) if accepted else (None, None)
        self.rounds.append({"round": server_round, "sampled_node_ids": sorted(self._sampled),
                            "participants": participants, "refusals": refusals, "aggregated": arrays is not None,
                            "train_metrics": None if metrics is None else {k: _number(v) for k, v in metrics.items()}})
        log.info("federated.round", round=server_round, participants=len(participants), refusals=len(refusals))
        return arrays, metrics


def _number(value: object) -> float | None:
    """A metric value that is one finite-or-not number (not a bool, not a list), else None."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def unpacked(arrays: ArrayRecord, model: Any) -> dict[str, Any]:
    """The state_dict of the flat weights ``arrays`` for ``model`` (the same student, built from the spec)."""
    import torch

    return {k: torch.from_numpy(v) for k, v in unpack_weights(arrays, model.unet.state_dict()).items()}


# ----------------------------------------------------------------------------- server-side evaluation
def _eval_loss_fn(spec: StudentSpec, data: ImageSet | None):
    """evaluate_fn(round, arrays) -> MetricRecord: the DDPM loss on the coordinator's accepted shards with
    fixed timesteps and noise (lower is better); None without accepted shards."""
    if data is None:
        return None
    import torch

    from privdistill.models import DiffusionModel
    from privdistill.train import diffusion_loss

    if data.labels is None:
        raise StageError("server-side evaluation needs class labels on the accepted shards (federated mode trains "
                         "class-conditioned students only)")
    n = min(EVAL_SAMPLES, len(data))
    g = torch.Generator().manual_seed(derive_seed(spec.seed, "federated-eval-picks"))
    pick = torch.randperm(len(data), generator=g)[:n].numpy()
    labels = torch.as_tensor([spec.class_names.index(data.class_names[i]) for i in data.labels[pick]])
    x0 = torch.from_numpy(np.ascontiguousarray(data.images[pick], dtype=np.float32))
    model = DiffusionModel.from_config(spec.model, resolution=spec.resolution, channels=spec.channels,
                                       class_names=spec.class_names, seed=spec.seed)
    t = torch.randint(0, model.scheduler.config.num_train_timesteps, (n,), generator=g)
    noise = torch.randn(x0.shape, generator=g)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.unet.load_state_dict(unpacked(arrays, model), strict=True)
        model.unet.eval()
        with torch.no_grad():
            loss = float(diffusion_loss(model, model.unet, x0, t, noise, {"class_labels": labels}))
        return MetricRecord({"eval_loss": loss, "eval_samples": n})

    return evaluate


def _accepted_data(coordinator_config: str, cfg: TrainingConfig) -> ImageSet | None:
    if not coordinator_config:
        return None
    from coordinator.student import load_accepted
    from coordinator.student_cli import _accepted

    _, refs = _accepted(Path(coordinator_config))
    if not refs:
        return None
    data, _ = load_accepted(refs, resolution=cfg.resolution, channels=cfg.channels)  # re-verified on read
    return data


def student_spec(cfg: TrainingConfig, eval_data: ImageSet | None) -> StudentSpec:
    if cfg.student.model.conditioning != "class":
        raise ConfigError(["student.model.conditioning: federated mode trains class-conditioned students only "
                           "(a text encoder's tokenizer would have to be shared by every site)"])
    names = cfg.federated.class_names or (eval_data.class_names if eval_data is not None else None)
    if not names:
        raise ConfigError(["federated.class_names: required when the coordinator holds no accepted shard to take "
                           "the class list from (list the classes every site's shard uses)"])
    fed, tr = cfg.federated, cfg.student.train
    local = tr.model_copy(update={"steps": fed.local_steps, "warmup_steps": min(tr.warmup_steps, fed.local_steps),
                                  "log_every": min(tr.log_every, fed.local_steps),
                                  "checkpoint_every": fed.local_steps + 1})
    return StudentSpec(model=cfg.student.model, train=local, resolution=cfg.resolution, channels=cfg.channels,
                       class_names=list(names), seed=cfg.seed)


# ----------------------------------------------------------------------------- the run
def _publish(out: Path, model_arrays: ArrayRecord | None, spec: StudentSpec, result: dict[str, Any]) -> None:
    """Write model/ and federated.json into a sibling temp dir, then rename it to ``out`` (all or nothing)."""
    from privdistill.models import DiffusionModel

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if model_arrays is not None:
            model = DiffusionModel.from_config(spec.model, resolution=spec.resolution, channels=spec.channels,
                                               class_names=spec.class_names, seed=spec.seed)
            model.unet.load_state_dict(unpacked(model_arrays, model), strict=True)
            model.save(tmp / MODEL_DIR)
        atomic_write_json(tmp / RESULT_FILE, result)
        if out.exists():
            out.rmdir()  # only an empty directory (the CLI refuses a non-empty one before starting)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_federation(grid: Grid, run_config: dict[str, Any]) -> dict[str, Any]:
    """The ServerApp's body; run_config: training (path), coordinator (path or ""), out (path)."""
    import flwr

    from privdistill.models import DiffusionModel

    cfg = load_training_config(str(run_config["training"]))
    out = Path(str(run_config["out"]))
    eval_data = _accepted_data(str(run_config.get("coordinator", "")), cfg)
    spec = student_spec(cfg, eval_data)
    model = DiffusionModel.from_config(spec.model, resolution=spec.resolution, channels=spec.channels,
                                       class_names=spec.class_names, seed=spec.seed)
    initial = pack_weights(model.unet.state_dict())  # one flat vector: one object per hop, not one per tensor
    fed = cfg.federated
    strategy = GatedFedAvg(fraction_train=fed.fraction, fraction_evaluate=0.0, min_train_nodes=fed.min_nodes,
                           min_available_nodes=fed.min_nodes)
    res = strategy.start(grid=PromptGrid(grid), initial_arrays=initial, num_rounds=fed.rounds, timeout=fed.round_timeout_s,
                         train_config=ConfigRecord({SPEC_FIELD: spec.to_json(),
                                                    LAYOUT_FIELD: weights_layout(model.unet.state_dict())}),
                         evaluate_fn=_eval_loss_fn(spec, eval_data))
    trained = any(r["aggregated"] for r in strategy.rounds)
    participants = [p for r in strategy.rounds for p in r["participants"]]
    result: dict[str, Any] = {
        "status": "completed" if trained else "failed",
        "name": cfg.name, "flwr_version": flwr.__version__,
        "rounds_planned": fed.rounds, "rounds_completed": len(strategy.rounds),
        "rounds": strategy.rounds,
        "participating_node_ids": sorted({p["node_id"] for p in participants}),
        "participating_sites": sorted({p["site"] for p in participants}),
        "refusals": [{"round": r["round"], **x} for r in strategy.rounds for x in r["refusals"]],
        "server_evaluation": {
            "enabled": eval_data is not None,
            "note": ("DDPM loss on the coordinator's accepted shards (fixed timesteps and noise)" if eval_data is not None
                     else "skipped: the coordinator holds no accepted shard to evaluate on"),
            "per_round": {str(k): {m: _number(v) for m, v in rec.items()}
                          for k, rec in res.evaluate_metrics_serverapp.items()},
        },
        "student": {"resolution": spec.resolution, "channels": spec.channels, "class_names": spec.class_names,
                    "seed": spec.seed, "local_steps": fed.local_steps, "model": spec.model.model_dump(mode="json")},
        "initial_sha256": arrays_sha256(initial),
        "final_sha256": arrays_sha256(res.arrays) if trained else None,
    }
    _publish(out, res.arrays if trained else None, spec, result)
    if not trained:
        raise StageError(f"no site contributed to any of the {len(strategy.rounds)} round(s); refusals: "
                         f"{sorted({x['reason'] for x in result['refusals']})} (details in {out / RESULT_FILE})")
    log.info("federated.done", rounds=len(strategy.rounds), sites=result["participating_sites"], out=str(out))
    return result


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, dict(context.run_config))
