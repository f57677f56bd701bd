"""The site's warm federated trainer: one long-running local process that has the training stack (torch,
diffusers) imported once, so a federated round does not pay for it again.

Flower 1.41 runs every train message in a fresh ``flwr-clientapp`` process; importing diffusers there costs tens of
seconds per round on a small machine (benchmarks/flower_rounds.py). ``privdistill-site join`` starts this trainer
beside the SuperNode; the ClientApp still runs the export gate and the shard snapshot in its own process (in full
in a run's first round, re-checked cheaply after: site_agent.client_app), then hands only the student spec, the
global weights (one flat vector) and the gated snapshot's path to the trainer, which reads the tar once, checks its
sha256 against the approved manifest, trains and sends the trained weights back as one flat vector. Without a trainer (or if it is unreachable) the ClientApp trains in its own process as before.

Transport: a Unix socket in the site's work directory (directory 0700, socket 0600) with
``multiprocessing.connection``'s HMAC challenge on a 32-byte key in a 0600 file beside it, so only this site's own
user can connect; messages are pickled, which is why nothing but an authenticated local peer is ever read."""

from __future__ import annotations

import argparse
import importlib
import os
import secrets
import sys
import time
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import structlog

from privdistill.identity import write_private_file

log = structlog.get_logger(__name__)
SOCKET_NAME, KEY_NAME = "trainer.sock", "trainer.key"
CONNECT_TIMEOUT_S = 5.0


def trainer_dir(workdir: Path) -> Path:
    return Path(workdir) / ".flwr" / "trainer"


def _train(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    from privdistill.federated import StudentSpec
    from privdistill.shard import parse_manifest
    from site_agent.client_app import load_gated, train_state

    spec = StudentSpec.from_json(job["spec"])
    data = load_gated(Path(job["tar"]), parse_manifest(job["manifest"]), spec)  # the snapshot the gate passed
    state = {k: torch.from_numpy(v) for k, v in job["arrays"].items()}
    t0 = time.perf_counter()
    weights, report = train_state(spec, state, data, int(job["seed"]), job.get("layout"))
    report = {**report, "trainer_seconds": round(time.perf_counter() - t0, 3)}  # model build + Trainer + fit
    flat = np.concatenate([v.numpy().astype(np.float32, copy=False).ravel() for v in weights.values()])
    return {"weights": flat, "report": report, "n": len(data)}  # pack_weights' vector, built here


def _answer(conn: Connection) -> bool:
    """One job on ``conn``; False when asked to stop."""
    from site_agent.client_app import Refusal

    job = conn.recv()
    if job.get("op") == "stop":
        return False
    try:
        conn.send(_train(job))
    except Refusal as r:
        conn.send({"refusal": [r.reason, r.detail, r.code]})
    except Exception as err:  # reported to the ClientApp, which refuses the round as training_failed
        conn.send({"error": f"{type(err).__name__}: {err}"})
    return True


def serve_trainer(workdir: Path) -> None:
    """Import the training stack, then answer jobs one at a time until asked to stop (or killed)."""
    d = trainer_dir(workdir)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    key = secrets.token_bytes(32)
    sock = d / SOCKET_NAME
    sock.unlink(missing_ok=True)
    for module in ("privdistill.models", "privdistill.train"):  # the point of this process: imported once
        importlib.import_module(module)

    with Listener(str(sock), family="AF_UNIX", authkey=key) as listener:
        os.chmod(sock, 0o600)
        write_private_file(d / KEY_NAME, key)  # written last: a ClientApp that finds it finds a listener
        log.info("federated.trainer_ready")
        try:
            while True:
                try:
                    conn = listener.accept()
                except (OSError, EOFError) as err:  # a peer without the key, or one that hung up
                    log.warning("federated.trainer_refused_peer", error=type(err).__name__)
                    continue
                with conn:
                    if not _answer(conn):
                        break
        finally:
            (d / KEY_NAME).unlink(missing_ok=True)  # the socket file goes with the listener


def connect(workdir: Path) -> Connection | None:
    """A connection to this site's running trainer, or None when there is none (or it does not answer)."""
    d = trainer_dir(workdir)
    try:
        key = (d / KEY_NAME).read_bytes()
        conn = Client(str(d / SOCKET_NAME), family="AF_UNIX", authkey=key)
    except (OSError, EOFError, ValueError) as err:
        if not isinstance(err, FileNotFoundError):
            log.info("federated.trainer_unavailable", error=type(err).__name__)
        return None
    return conn


def train_round(conn: Connection, spec: Any, global_arrays: Any, tar: Path, manifest: Any,
                seed: int, layout: str | None = None) -> tuple[Any, dict[str, Any], int]:
    """One round in the trainer: it loads the gated snapshot ``tar`` (checked against ``manifest``), trains the
    global weights and returns (an ArrayRecord of the trained weights, report, examples). Refusals come back as
    the ClientApp's Refusal; other failures as RuntimeError."""
    from flwr.app import Array, ArrayRecord

    from privdistill.federated import FLAT_ARRAY
    from site_agent.client_app import Refusal

    job = {"spec": spec.to_json(), "arrays": {k: a.numpy() for k, a in global_arrays.items()},
           "tar": str(tar), "manifest": manifest.to_bytes(), "seed": seed, "layout": layout}
    with conn:
        conn.send(job)
        reply = conn.recv()
    if "refusal" in reply:
        reason, detail, code = reply["refusal"]
        raise Refusal(reason, detail, code=code)
    if "error" in reply:
        raise RuntimeError(reply["error"])
    arrays = ArrayRecord({FLAT_ARRAY: Array(reply["weights"])})
    return arrays, reply["report"], int(reply["n"])


def stop(workdir: Path) -> None:
    conn = connect(workdir)
    if conn is not None:
        with conn:
            conn.send({"op": "stop"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the site's warm federated trainer (started by privdistill-site join)")
    p.add_argument("--workdir", type=Path, required=True)
    args = p.parse_args(argv)
    if not args.workdir.is_dir():
        print(f"error: --workdir {args.workdir} does not exist", file=sys.stderr)
        return 2
    from privdistill.allocator import tune_malloc

    tune_malloc()
    serve_trainer(args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
