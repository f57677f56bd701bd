"""The site's Flower ClientApp: every train message passes the export gate before any training and any
reply; the site trains the server's global student only on its verified, approved synthetic shard."""

from __future__ import annotations

import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from privdistill.data.types import ImageSet
from privdistill.errors import ConfigError, PrivacyPolicyError, ShardVerificationError
from privdistill.federated import (
    ARRAYS_KEY,
    CONFIG_KEY,
    FAILED_CODE,
    METRICS_KEY,
    NODE_SITE_CONFIG,
    NODE_WORKDIR,
    PROVENANCE_KEY,
    REFUSED_CODE,
    SPEC_FIELD,
    WEIGHT_FIELD,
    StudentSpec,
    refusal_reason,
)
from privdistill.shard import SHARD_TAR, Manifest, load_shards
from site_agent import trainer
from site_agent.audit_log import audit
from site_agent.config import SiteConfig, load_site_config
from site_agent.gate import check_export, exportable

log = structlog.get_logger(__name__)
app = ClientApp()


class Refusal(Exception):
    """This site will not take part in this round; ``reason`` is a short code for the audit trail."""

    def __init__(self, reason: str, detail: str, *, code: int = REFUSED_CODE) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.code = reason, detail, code


@dataclass
class _Site:
    cfg: SiteConfig
    workdir: Path


def _site(context: Context) -> _Site:
    cfg_path, workdir = context.node_config.get(NODE_SITE_CONFIG), context.node_config.get(NODE_WORKDIR)
    if not cfg_path or not workdir:
        raise Refusal("node_misconfigured", f"the SuperNode was started without node config {NODE_SITE_CONFIG} and "
                                            f"{NODE_WORKDIR}; start it with `privdistill-site join`")
    if not Path(str(workdir)).is_dir():
        raise Refusal("no_workdir", "the site's work directory does not exist; run `privdistill-site run` first")
    try:
        cfg = load_site_config(Path(str(cfg_path)))
    except ConfigError as err:
        raise Refusal("site_config_invalid", f"the site configuration is invalid: {'; '.join(err.problems)}") from None
    return _Site(cfg, Path(str(workdir)))


def _spec(msg: Message) -> StudentSpec:
    try:
        return StudentSpec.from_json(str(msg.content[CONFIG_KEY][SPEC_FIELD]))
    except Exception as err:
        raise Refusal("bad_request", f"the train message carries no valid student spec ({type(err).__name__})") from None


def gated_shard(site: _Site) -> tuple[Manifest, Path]:
    """The newest approved shard, through the export gate, copied to a private snapshot the gate verified."""
    from site_agent.export import snapshot_approved

    candidates = exportable(site.workdir, for_federation=True)
    if not candidates:
        raise Refusal("no_approved_shard", "this site has no approved shard: run `privdistill-site run` and have a "
                                           "data steward `privdistill-site approve` the shard")
    try:
        checked = check_export(site.workdir, candidates[-1], site.cfg, for_federation=True)  # audits refusals
        snap, manifest, _ = snapshot_approved(site.workdir, checked.shard_id, site.cfg)
    except (PrivacyPolicyError, ShardVerificationError) as err:
        raise Refusal(err.reason, str(err)) from None
    return manifest, snap


def _remap(data: ImageSet, spec: StudentSpec) -> ImageSet:
    """Labels re-indexed into the federation's class list; a class the student does not know is refused."""
    if spec.model.conditioning != "class" or data.labels is None:
        raise Refusal("conditioning_mismatch", "federated training supports class-conditioned students on "
                                               "class-labelled shards only")
    unknown = [c for c in data.class_names if c not in spec.class_names]
    if unknown:
        raise Refusal("class_mismatch", f"this site's shard holds classes {unknown} the federation's student does "
                                        f"not have ({spec.class_names})")
    if data.images.shape[1:] != (spec.channels, spec.resolution, spec.resolution):
        raise Refusal("resolution_mismatch", f"this site's images are {tuple(data.images.shape[1:])}, the student "
                                             f"expects {(spec.channels, spec.resolution, spec.resolution)}")
    index = np.asarray([spec.class_names.index(c) for c in data.class_names], np.int64)
    return ImageSet(data.images, labels=index[data.labels], class_names=list(spec.class_names))


def load_gated(tar: Path, manifest: Manifest, spec: StudentSpec) -> ImageSet:
    """The gated snapshot's samples, labels re-indexed into the federation's classes (a refusal otherwise)."""
    try:
        data = load_shards([(tar, manifest)], channels=spec.channels)
    except ShardVerificationError as err:
        raise Refusal(err.reason, str(err)) from None
    return _remap(data, spec)


def train_state(spec: StudentSpec, state: dict[str, Any], data: ImageSet, seed: int) -> tuple[dict, dict]:
    """Rebuild the student, load ``state`` (the global weights, strictly), train locally; (state_dict, report)."""
    from privdistill.models import DiffusionModel
    from privdistill.train import Dist, Trainer

    model = DiffusionModel.from_config(spec.model, resolution=spec.resolution, channels=spec.channels,
                                       class_names=spec.class_names, seed=spec.seed)
    try:
        model.unet.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, ValueError) as err:
        raise Refusal("bad_global_model", f"the global weights do not fit the announced student ({err})",
                      code=FAILED_CODE) from None
    report = Trainer(model, data, spec.train, seed=seed, dist_info=Dist()).fit()
    return {k: v.detach().cpu() for k, v in model.unet.state_dict().items()}, report


def train_local(spec: StudentSpec, global_arrays: ArrayRecord, data: ImageSet, seed: int) -> tuple[dict, dict]:
    """``train_state`` on the server's global weights, in this process."""
    return train_state(spec, global_arrays.to_torch_state_dict(), data, seed)


def handle_train(msg: Message, context: Context) -> Message:
    """Gate, then train, then reply; every refusal is an error reply (no weights) and an audit record."""
    config = msg.content.config_records.get(CONFIG_KEY)
    announced = config.get("server-round", 0) if config is not None else 0
    rnd = announced if isinstance(announced, int) and not isinstance(announced, bool) else 0
    where: dict[str, Any] = {"server_round": rnd, "run_id": msg.metadata.run_id}
    site: _Site | None = None
    snap: Path | None = None
    try:
        site = _site(context)
        spec = _spec(msg)
        manifest, snap = gated_shard(site)
        where |= {"shard_id": manifest.shard_id, "tar_sha256": manifest.tar_sha256}
        seed = spec.seed * 1000 + rnd * 7919 + zlib.crc32(site.cfg.site.id.encode()) % 997
        conn = trainer.connect(site.workdir)
        try:
            if conn is not None:  # the warm trainer loads, checks and trains: this process never imports torch
                arrays, report, n_examples = trainer.train_round(conn, spec, msg.content.array_records[ARRAYS_KEY],
                                                                 snap / SHARD_TAR, manifest, seed)
            else:
                data = load_gated(snap / SHARD_TAR, manifest, spec)
                weights, report = train_local(spec, msg.content.array_records[ARRAYS_KEY], data, seed)
                arrays, n_examples = ArrayRecord(weights), len(data)
        except Refusal:
            raise
        except Exception as err:
            raise Refusal("training_failed", f"local training failed: {type(err).__name__}: {err}",
                          code=FAILED_CODE) from None
    except Refusal as r:
        site_id = site.cfg.site.id if site is not None else "unknown"
        if site is not None:
            audit(site.workdir, "federated_refused", site_id=site_id, reason=r.reason, detail=r.detail, **where)
        log.warning("federated.refused", site_id=site_id, reason=r.reason, server_round=rnd)
        return Message(Error(code=r.code, reason=refusal_reason(site_id, r.reason, r.detail)), reply_to=msg)
    finally:
        if snap is not None:
            shutil.rmtree(snap, ignore_errors=True)
    loss = float(report["final_loss"]) if report.get("final_loss") is not None else float("nan")
    audit(site.workdir, "federated_round", site_id=site.cfg.site.id, num_examples=n_examples, local_steps=report["steps"],
          train_loss=loss, **where)
    log.info("federated.trained", site_id=site.cfg.site.id, server_round=rnd, samples=n_examples, loss=round(loss, 5))
    content = RecordDict({
        ARRAYS_KEY: arrays,
        METRICS_KEY: MetricRecord({WEIGHT_FIELD: n_examples, "train-loss": loss}),
        PROVENANCE_KEY: ConfigRecord({"site": site.cfg.site.id, "shard-id": where["shard_id"],
                                      "tar-sha256": where["tar_sha256"]}),
    })
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context)
