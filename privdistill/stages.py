"""Stage bookkeeping: each stage writes into a temporary directory, then renames it into place with
``_stage.json`` (resolved config, input hashes, output hashes); unchanged inputs mean the stage is
skipped, so a killed run resumes where it stopped."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from privdistill import __version__
from privdistill.config import config_hash
from privdistill.errors import PrivacyPolicyError, StageError

log = structlog.get_logger(__name__)

STAGE_FILE = "_stage.json"
MAC_FIELD = "record_mac"  # HMAC-SHA256 of the record under a key only the running agent holds (optional)


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except the stage record, keyed by relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != STAGE_FILE:
            out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see either the old or the new content, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


@dataclass
class StageContext:
    """What a stage function gets: where to write, where its inputs are, and its scratch space."""

    name: str
    workdir: Path
    out: Path  # temporary output directory; renamed into place on success
    checkpoint_dir: Path  # survives a kill; keyed by the stage fingerprint
    inputs: dict[str, Path]  # upstream stage name -> its final directory

    def input(self, stage: str) -> Path:
        return self.inputs[stage]


StageFn = Callable[[StageContext], dict[str, Any] | None]


@dataclass
class Stage:
    name: str
    fn: StageFn
    upstream: tuple[str, ...]
    config: dict[str, Any]  # the resolved config sections this stage depends on


def stage_dir(workdir: Path, name: str) -> Path:
    return workdir / name


def read_record(workdir: Path, name: str) -> dict[str, Any] | None:
    p = stage_dir(workdir, name) / STAGE_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def record_mac(key: bytes, record: dict[str, Any]) -> str:
    """HMAC-SHA256 over the record as stored (JSON round trip, sorted keys), the MAC field left out."""
    body = json.loads(json.dumps({k: v for k, v in record.items() if k != MAC_FIELD}, default=str))
    return hmac.new(key, json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), hashlib.sha256).hexdigest()


def mac_valid(key: bytes, record: dict[str, Any] | None) -> bool:
    if record is None:
        return False
    mac = record.get(MAC_FIELD)
    return isinstance(mac, str) and hmac.compare_digest(mac, record_mac(key, record))


def authenticated_record(workdir: Path, name: str, key: bytes, *, check_outputs: bool = True) -> dict[str, Any]:
    """The record of stage ``name`` if this agent's key authenticates it and (``check_outputs``) every output file
    it lists still has its recorded hash; else PrivacyPolicyError. A record written by anything else (a forged
    stage over real images, a copy from another site) is refused."""
    rec = read_record(workdir, name)
    if rec is None or rec.get("stage") != name or not mac_valid(key, rec):
        raise PrivacyPolicyError(
            f"the '{name}' stage record is not authenticated by this site's agent (written or edited by something "
            "else, or by a version that did not authenticate records); its outputs cannot be trusted: re-run the "
            "pipeline with `privdistill-site run --force`")
    if check_outputs:
        root = stage_dir(workdir, name)
        outputs = rec.get("outputs") or {}
        for rel, digest in outputs.items():
            path = root / rel
            if path.is_symlink() or not path.is_file() or sha256_file(path) != digest:
                raise PrivacyPolicyError(f"an output of the '{name}' stage changed after the stage wrote it; re-run "
                                         "the pipeline with `privdistill-site run --force`")
    return rec


def fingerprint(stage: Stage, workdir: Path) -> tuple[str, dict[str, str]]:
    """Hash of the stage's config, its upstream outputs and the software version."""
    inputs: dict[str, str] = {}
    for up in stage.upstream:
        rec = read_record(workdir, up)
        if rec is None:
            raise StageError(
                f"stage '{stage.name}' needs stage '{up}' first: run `privdistill {up}` "
                f"(or `privdistill run`) with the same --workdir"
            )
        inputs[up] = rec["outputs_hash"]
    fp = config_hash({"stage": stage.name, "config": stage.config, "inputs": inputs, "version": __version__})
    return fp, inputs


def is_current(stage: Stage, workdir: Path) -> bool:
    rec = read_record(workdir, stage.name)
    if rec is None:
        return False
    try:
        fp, _ = fingerprint(stage, workdir)
    except StageError:
        return False
    return rec.get("fingerprint") == fp


@contextlib.contextmanager
def workdir_lock(workdir: Path):
    """Exclusive lock on a work directory: two runs never write the same stages at once."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / ".privdistill.lock", "a+") as fh:  # closing it releases the lock
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageError(
                f"another privdistill process is using {workdir}; wait for it or use another --workdir"
            ) from None
        yield


def remove_stale(workdir: Path, name: str) -> None:
    """Delete temporaries a killed run of stage ``name`` left behind (caller holds the lock)."""
    for p in list(workdir.glob(f".{name}.tmp-*")) + list(workdir.glob(f".{name}.old-*")):
        shutil.rmtree(p, ignore_errors=True)


def run_stage(stage: Stage, workdir: Path, *, force: bool = False, record_key: bytes | None = None) -> dict[str, Any]:
    """Run ``stage`` unless its record matches the current fingerprint; return its record.

    With ``record_key`` every upstream record must be authenticated by it (and its outputs unchanged), a record
    it does not authenticate is never taken as current, and the new record is authenticated.
    The caller should hold ``workdir_lock(workdir)``."""
    workdir.mkdir(parents=True, exist_ok=True)
    remove_stale(workdir, stage.name)
    fp, input_hashes = fingerprint(stage, workdir)
    if record_key is not None:
        for up in stage.upstream:
            authenticated_record(workdir, up, record_key)
    rec = read_record(workdir, stage.name)
    trusted = record_key is None or mac_valid(record_key, rec)
    if rec is not None and rec.get("fingerprint") == fp and not force and trusted:
        log.info("stage.skipped", stage=stage.name, reason="inputs unchanged")
        return rec
    final = stage_dir(workdir, stage.name)
    ckpt = workdir / ".checkpoints" / stage.name / fp[:16]
    ckpt.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stage.name}.tmp-", dir=workdir))
    ctx = StageContext(
        name=stage.name,
        workdir=workdir,
        out=tmp,
        checkpoint_dir=ckpt,
        inputs={u: stage_dir(workdir, u) for u in stage.upstream},
    )
    log.info("stage.start", stage=stage.name)
    t0 = time.time()
    try:
        report = stage.fn(ctx) or {}
        record = {
            "stage": stage.name,
            "fingerprint": fp,
            "version": __version__,
            "config": stage.config,
            "inputs": input_hashes,
            "outputs": hash_tree(tmp),
            "report": report,
            "seconds": round(time.time() - t0, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        record["outputs_hash"] = config_hash(record["outputs"])
        if record_key is not None:
            record[MAC_FIELD] = record_mac(record_key, record)
        atomic_write_json(tmp / STAGE_FILE, record)
        _swap_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(ckpt.parent, ignore_errors=True)  # finished: checkpoints no longer needed
    log.info("stage.done", stage=stage.name, seconds=record["seconds"])
    return record


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Replace ``final`` with ``tmp``; a reader never sees a half-written stage directory."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
