"""The site's Flower ClientApp: every train message passes the export gate before any training and any
reply; the site trains the server's global student only on its verified, approved synthetic shard.

The first round of a run runs the whole export gate and takes a private snapshot of the shard, verified against
what was approved (site_agent.export). The snapshot is kept for the run in WORKDIR/.export/federated/ with a
sidecar recording the run, the approved hashes and the (inode, size, mtime_ns, ctime_ns, mode) of every file and
folder the full check read. Every later round of the same run re-reads the register (state, approval, policy),
re-hashes the snapshot's manifest against the approved one and compares those fingerprints; any difference, a
new run, or a missing sidecar means the whole gate and a fresh snapshot again. Whatever trains reads the
snapshot's tar into memory and checks its sha256 against the approved manifest before decoding anything, so the
bytes trained on are the approved bytes whichever way the check went."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import time
import zlib
from collections.abc import Mapping
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
    FLAT_ARRAY,
    LAYOUT_FIELD,
    METRICS_KEY,
    NODE_SITE_CONFIG,
    NODE_WORKDIR,
    PROVENANCE_KEY,
    REFUSED_CODE,
    SPEC_FIELD,
    WEIGHT_FIELD,
    StudentSpec,
    pack_weights,
    refusal_reason,
    unpack_weights,
    weights_layout,
)
from privdistill.shard import MANIFEST, SHARD_TAR, SIGNATURE, Manifest, decode_png, parse_manifest
from site_agent import trainer
from site_agent.audit_log import audit
from site_agent.config import SiteConfig, load_site_config
from site_agent.gate import check_export, exportable

RUN_SNAPSHOT, SIDECAR = "federated", "verified.json"  # WORKDIR/.export/federated/: this run's verified snapshot

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
    cfg_path: Path | None = None


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
    return _Site(cfg, Path(str(workdir)), Path(str(cfg_path)))


def _spec(msg: Message) -> StudentSpec:
    try:
        return StudentSpec.from_json(str(msg.content[CONFIG_KEY][SPEC_FIELD]))
    except Exception as err:
        raise Refusal("bad_request", f"the train message carries no valid student spec ({type(err).__name__})") from None


def gated_shard(site: _Site, run_id: int | None = None) -> tuple[Manifest, Path]:
    """The newest approved shard, through the export gate, as a private snapshot the gate verified. With a
    ``run_id`` the snapshot is kept for the run and later rounds re-check it cheaply (``_reuse``); without, the
    caller removes it."""
    candidates = exportable(site.workdir, for_federation=True)
    if not candidates:
        raise Refusal("no_approved_shard", "this site has no approved shard: run `privdistill-site run` and have a "
                                           "data steward `privdistill-site approve` the shard")
    if run_id is not None:
        reused = _reuse(site, run_id, candidates[-1])
        if reused is not None:
            return reused
    return _full_check(site, candidates[-1], run_id)


def _full_check(site: _Site, shard_id: str, run_id: int | None) -> tuple[Manifest, Path]:
    from site_agent.export import snapshot_approved

    if run_id is not None:  # whatever was kept for this run is not trusted again until this check passes
        (run_snapshot_dir(site.workdir) / SIDECAR).unlink(missing_ok=True)
    before = _fingerprints(_watched(site, shard_id))  # taken before the check: a change during it shows later
    try:
        checked = check_export(site.workdir, shard_id, site.cfg, for_federation=True)  # audits refusals
        snap, manifest, _ = snapshot_approved(site.workdir, checked.shard_id, site.cfg)
    except (PrivacyPolicyError, ShardVerificationError) as err:
        raise Refusal(err.reason, str(err)) from None
    if run_id is None:
        return manifest, snap
    keep = run_snapshot_dir(site.workdir)
    shutil.rmtree(keep, ignore_errors=True)
    os.rename(snap, keep)
    if _fingerprints(_watched(site, shard_id)) == before:  # else: no sidecar, the next round checks in full again
        from site_agent.state import SiteState

        row = SiteState(site.workdir).require(shard_id)
        sidecar = {"run_id": int(run_id), "shard_id": shard_id, "approved": [row.manifest_sha256, row.tar_sha256],
                   "row": _row_facts(row), "files": before, "snapshot": _fingerprints(_snapshot_files(keep))}
        tmp = keep / f".{SIDECAR}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(sidecar, fh)
        os.replace(tmp, keep / SIDECAR)
    return manifest, keep


def run_snapshot_dir(workdir: Path) -> Path:
    from site_agent.export import SNAPSHOT_DIR

    return Path(workdir) / SNAPSHOT_DIR / RUN_SNAPSHOT


def _snapshot_files(snap: Path) -> list[Path]:
    return [snap / name for name in (SHARD_TAR, MANIFEST, SIGNATURE)]


def _watched(site: _Site, shard_id: str) -> list[Path]:
    """Every file and folder the full check reads besides the register (re-read every round): the shard's folder,
    the folders of the stages behind it (not following links), the work directory's id, the site config, the key."""
    from privdistill.workdir import WorkDir
    from site_agent.gate import shard_dir
    from site_agent.records import SHARD_STAGES
    from site_agent.state import WORKDIR_ID_FILE

    paths = [site.workdir / WORKDIR_ID_FILE, site.cfg.site.key_file]
    if site.cfg_path is not None:
        paths.append(site.cfg_path)
    for root in [shard_dir(site.workdir, shard_id), *(WorkDir(site.workdir).stage(n) for n in SHARD_STAGES)]:
        paths.append(root)
        if root.is_dir() and not root.is_symlink():
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                paths += [Path(dirpath) / n for n in sorted(dirnames + filenames)]
    return paths


def _fingerprints(paths: list[Path]) -> dict[str, list[int] | None]:
    """(inode, size, mtime_ns, ctime_ns, mode) of each path, not following links; None for a missing one. Writing
    a file's bytes changes its ctime, which no unprivileged process can set back."""
    out: dict[str, list[int] | None] = {}
    for p in paths:
        try:
            st = os.stat(p, follow_symlinks=False)
        except FileNotFoundError:
            out[str(p)] = None
            continue
        out[str(p)] = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode]
    return out


def _row_facts(row: Any) -> dict[str, Any]:
    """The register's facts about the shard that the full check relies on (its state is checked every round)."""
    return json.loads(json.dumps({k: getattr(row, k) for k in (
        "shard_id", "site_id", "dir", "policy", "policy_passed", "manifest_sha256", "tar_sha256", "sample_count",
        "filter_record_sha256", "kept_sha256", "workdir_id", "approved_by")}, default=str))


def _reuse(site: _Site, run_id: int, shard_id: str) -> tuple[Manifest, Path] | None:
    """This run's kept snapshot, if nothing the full check read has changed since; None means check in full (a
    refusal, too, is left to the full check, which audits it)."""
    from site_agent.gate import _check_state
    from site_agent.package import evaluate_policy
    from site_agent.state import SiteState

    keep = run_snapshot_dir(site.workdir)
    try:
        side = json.loads((keep / SIDECAR).read_text())
        if side.get("run_id") != int(run_id) or side.get("shard_id") != shard_id:
            return None
        row = SiteState(site.workdir).get(shard_id)
        if row is None or [row.manifest_sha256, row.tar_sha256] != side.get("approved") or \
                _row_facts(row) != side.get("row"):
            return None
        _check_state(row, site.cfg, for_federation=True)
        if side.get("files") != _fingerprints(_watched(site, shard_id)) or \
                side.get("snapshot") != _fingerprints(_snapshot_files(keep)):
            return None
        body = (keep / MANIFEST).read_bytes()
        if hashlib.sha256(body).hexdigest() != row.manifest_sha256:
            return None
        manifest = parse_manifest(body)
        if manifest.tar_sha256 != row.tar_sha256 or manifest.shard_id != shard_id or \
                not evaluate_policy(manifest.privacy, site.cfg.site.policy)["passed"]:
            return None
    except (OSError, ValueError, TypeError, PrivacyPolicyError, ShardVerificationError):
        return None
    log.debug("federated.snapshot_reused", shard_id=shard_id, run_id=run_id)
    return manifest, keep


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


def read_verified(tar: Path, manifest: Manifest) -> bytes:
    """The snapshot's tar, read once into memory and checked against the (approved) manifest's size and sha256:
    what is decoded and trained on is exactly what was verified, whatever happens to the file afterwards."""
    blob = Path(tar).read_bytes()
    if len(blob) != manifest.tar_size or hashlib.sha256(blob).hexdigest() != manifest.tar_sha256:
        raise Refusal("changed_during_export", "the shard snapshot differs from the approved shard; nothing was "
                                               "trained or sent")
    return blob


def _decode(blob: bytes, manifest: Manifest, channels: int) -> ImageSet:
    """Samples of a verified canonical shard tar (``{key}.png`` then ``{key}.json`` per sample)."""
    names = list(manifest.conditioning.class_names)
    images: list[np.ndarray] = []
    labels: list[int] = []
    png: bytes | None = None
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
        for info in tar:
            member = tar.extractfile(info)
            data = member.read() if member is not None else b""
            if info.name.endswith(".png"):
                png = data
            elif info.name.endswith(".json") and png is not None:
                images.append(decode_png(png, channels))
                cname = json.loads(data).get("class_name")
                labels.append(names.index(cname) if cname in names else -1)
                png = None
    if not images:
        raise Refusal("empty_shard", "the approved shard holds no sample")
    if any(v < 0 for v in labels):
        raise Refusal("conditioning_mismatch", "federated training supports class-conditioned students on "
                                               "class-labelled shards only")
    return ImageSet(np.stack(images).astype(np.float32), labels=np.asarray(labels, np.int64), class_names=names)


def load_gated(tar: Path, manifest: Manifest, spec: StudentSpec) -> ImageSet:
    """The gated snapshot's samples (its bytes checked against ``manifest`` as read), labels re-indexed into the
    federation's classes (a refusal otherwise)."""
    return _remap(_decode(read_verified(tar, manifest), manifest, spec.channels), spec)


def train_state(spec: StudentSpec, state: Mapping[str, Any], data: ImageSet, seed: int,
                layout: str | None = None) -> tuple[dict, dict]:
    """Rebuild the student, load ``state`` (the global weights, strictly: a state_dict, or the one flat vector
    of ``pack_weights`` checked against the announced ``layout``), train locally; (state_dict, report)."""
    import torch

    from privdistill.models import DiffusionModel
    from privdistill.train import Dist, Trainer

    model = DiffusionModel.from_config(spec.model, resolution=spec.resolution, channels=spec.channels,
                                       class_names=spec.class_names, seed=spec.seed)
    try:
        if list(state) == [FLAT_ARRAY]:
            own = model.unet.state_dict()
            if layout != weights_layout(own):
                raise ValueError("the server's parameter layout differs from this site's student (another "
                                 "diffusers version?)")
            state = {k: torch.from_numpy(v) for k, v in unpack_weights(state, own).items()}
        model.unet.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, ValueError) as err:
        raise Refusal("bad_global_model", f"the global weights do not fit the announced student ({err})",
                      code=FAILED_CODE) from None
    report = Trainer(model, data, spec.train, seed=seed, dist_info=Dist()).fit()
    return {k: v.detach().cpu() for k, v in model.unet.state_dict().items()}, report


def train_local(spec: StudentSpec, global_arrays: ArrayRecord, data: ImageSet, seed: int,
                layout: str | None = None) -> tuple[dict, dict]:
    """``train_state`` on the server's global weights, in this process."""
    state = {FLAT_ARRAY: global_arrays[FLAT_ARRAY].numpy()} if list(global_arrays) == [FLAT_ARRAY] else \
        global_arrays.to_torch_state_dict()
    return train_state(spec, state, data, seed, layout)


def handle_train(msg: Message, context: Context) -> Message:
    """Gate, then train, then reply; every refusal is an error reply (no weights) and an audit record."""
    config = msg.content.config_records.get(CONFIG_KEY)
    announced = config.get("server-round", 0) if config is not None else 0
    rnd = announced if isinstance(announced, int) and not isinstance(announced, bool) else 0
    where: dict[str, Any] = {"server_round": rnd, "run_id": msg.metadata.run_id}
    site: _Site | None = None
    t0, started = time.perf_counter(), time.time()
    timing: dict[str, float] = {}
    try:
        site = _site(context)
        spec = _spec(msg)
        announced_layout = msg.content[CONFIG_KEY].get(LAYOUT_FIELD)
        layout = announced_layout if isinstance(announced_layout, str) else None
        manifest, snap = gated_shard(site, int(msg.metadata.run_id))
        timing["gate_s"] = round(time.perf_counter() - t0, 3)
        where |= {"shard_id": manifest.shard_id, "tar_sha256": manifest.tar_sha256}
        seed = spec.seed * 1000 + rnd * 7919 + zlib.crc32(site.cfg.site.id.encode()) % 997
        conn = trainer.connect(site.workdir)
        try:
            if conn is not None:  # the warm trainer loads, checks and trains: this process never imports torch
                arrays, report, n_examples = trainer.train_round(conn, spec, msg.content.array_records[ARRAYS_KEY],
                                                                 snap / SHARD_TAR, manifest, seed, layout)
            else:
                data = load_gated(snap / SHARD_TAR, manifest, spec)
                weights, report = train_local(spec, msg.content.array_records[ARRAYS_KEY], data, seed, layout)
                arrays, n_examples = pack_weights(weights), len(data)
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
    timing["train_s"] = round(time.perf_counter() - t0 - timing["gate_s"], 3)
    loss = float(report["final_loss"]) if report.get("final_loss") is not None else float("nan")
    audit(site.workdir, "federated_round", site_id=site.cfg.site.id, num_examples=n_examples, local_steps=report["steps"],
          train_loss=loss, **where)
    content = RecordDict({
        ARRAYS_KEY: arrays,
        METRICS_KEY: MetricRecord({WEIGHT_FIELD: n_examples, "train-loss": loss}),
        PROVENANCE_KEY: ConfigRecord({"site": site.cfg.site.id, "shard-id": where["shard_id"],
                                      "tar-sha256": where["tar_sha256"]}),
    })
    timing |= {"handler_s": round(time.perf_counter() - t0, 3), "started_at": round(started, 3)}
    if "trainer_seconds" in report:
        timing["trainer_s"] = float(report["trainer_seconds"])
    # timing: gate (+ snapshot or its cheap re-check), local training incl. hand-off, the whole handler; local only
    log.info("federated.trained", site_id=site.cfg.site.id, server_round=rnd, samples=n_examples, loss=round(loss, 5),
             timing=timing)
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context)
