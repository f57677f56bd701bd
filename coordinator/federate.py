"""`privdistill-coordinator federate`: start (or target) a Flower SuperLink with TLS and SuperNode
authentication, register the provisioned sites' node keys, submit the Flower App with `flwr run`, wait."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from coordinator.config import CoordinatorConfig, load_coordinator_config
from privdistill.errors import ConfigError, RetryableNetworkError, StageError
from privdistill.federated import DEFAULT_SUPERLINK_PORT, NODE_PUBS_DIR, SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_S
from privdistill.procs import bound_to_this_process

log = structlog.get_logger(__name__)
APP_DIR = Path(__file__).resolve().parent / "flower_app"
CONNECTION = "privdistill"
FLOWER_HOME = "flower"  # under the coordinator's state_dir: Flower CLI config, installed app bundles, logs


def flower_env(home: Path) -> dict[str, str]:
    """Every Flower process: its own FLWR_HOME, telemetry off, this environment's tools first on PATH
    (the SuperLink starts `flower-superexec` by name)."""
    bin_dir = str(Path(sys.executable).parent)
    return {SUPEREXEC_POLL_ENV: SUPEREXEC_POLL_S, **os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


def tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def write_connection(home: Path, address: str, ca: Path) -> None:
    """The Flower CLI's config.toml: one SuperLink connection, TLS verified with the provisioned CA."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = {json.dumps(address)}\nroot-certificates = {json.dumps(str(ca))}\n')


def _flwr(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """One `flwr` CLI call; one that does not finish within ``timeout`` is killed and reported as retryable."""
    try:
        return subprocess.run([tool("flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RetryableNetworkError(f"`flwr {' '.join(args[:2])}` did not finish within {timeout:.0f} s (SuperLink "
                                    "unreachable or the machine overloaded?); rerun the command") from None


def _json_out(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON document a `flwr ... --format json` command printed (after any banner lines)."""
    text = proc.stdout
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}


@dataclass
class SuperLink:
    """A SuperLink this command started (stopped again when the federation ends)."""

    proc: subprocess.Popen
    address: str
    log_path: Path

    def stop(self) -> None:
        """SIGTERM to the SuperLink's process group (it and the SuperExec / ServerApp processes it started), then
        SIGKILL to whatever of the group is left after 15 s."""
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        _signal_group(self.proc.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def start_superlink(cfg: CoordinatorConfig, env: dict[str, str], *, host: str, port: int, log_path: Path,
                    ready_timeout: float = 60) -> SuperLink:
    """flower-superlink with the coordinator's TLS certificate, SuperNode authentication on, no runtime installs."""
    cmd = [tool("flower-superlink"), "--ssl-certfile", str(cfg.tls.cert), "--ssl-keyfile", str(cfg.tls.key),
           "--ssl-ca-certfile", str(cfg.tls.ca), "--enable-supernode-auth",
           "--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as fh:
        # its own session (a Ctrl-C meant for this command reaches it only through stop()), bound to this process
        # (a killed `federate` takes it down with it: no SuperLink left holding the port)
        proc = subprocess.Popen(bound_to_this_process(cmd), stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    link = SuperLink(proc, f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}", log_path)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RetryableNetworkError(f"flower-superlink exited with {proc.returncode} (port {port} in use?); "
                                        f"see {log_path}")
        try:
            with socket.create_connection((link.address.rsplit(":", 1)[0], port), timeout=1):
                return link
        except OSError:
            time.sleep(0.3)
    link.stop()
    raise RetryableNetworkError(f"flower-superlink did not listen on port {port} within {ready_timeout:.0f} s; "
                                f"see {log_path}")


def register_nodes(env: dict[str, str], pubs_dir: Path) -> dict[str, str]:
    """`flwr supernode register` every provisioned site's Flower node key; {site: node id or 'already'}."""
    pubs = sorted(pubs_dir.glob("*.pub")) if pubs_dir.is_dir() else []
    if not pubs:
        raise ConfigError([f"{pubs_dir}: no site Flower node keys (*.pub); provision the sites with "
                           "`privdistill-coordinator provision` (it writes them) or copy each site's flower-node.pub "
                           "there as SITE.pub"])
    out: dict[str, str] = {}
    for pub in pubs:
        proc = _flwr(env, "supernode", "register", str(pub), CONNECTION, "--name", pub.stem, "--format", "json")
        doc = _json_out(proc)
        if proc.returncode == 0 and doc.get("success"):
            out[pub.stem] = str(doc.get("node-id"))
        elif "already" in (proc.stdout + proc.stderr).lower() or "in use" in (proc.stdout + proc.stderr).lower():
            out[pub.stem] = "already"
        else:
            raise RetryableNetworkError(f"registering {pub.stem}'s SuperNode key failed: "
                                        f"{(proc.stdout + proc.stderr).strip()[-400:]}")
    return out


def _stage_app(app_dir: Path, overrides: dict[str, str], into: Path) -> tuple[Path, Path]:
    """A clean copy of the app definition (only pyproject.toml) and a TOML file of run-config overrides."""
    src = app_dir / "pyproject.toml"
    if not src.is_file():
        raise ConfigError([f"{app_dir}: no pyproject.toml (the Flower App definition)"])
    stage = into / "app"
    stage.mkdir(parents=True)
    shutil.copyfile(src, stage / "pyproject.toml")
    run_config = into / "run-config.toml"
    run_config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in overrides.items()))
    return stage, run_config


def run_app(env: dict[str, str], app_dir: Path, overrides: dict[str, str], *, timeout: float,
            log_path: Path) -> dict[str, Any]:
    """Submit the app with `flwr run`, poll its status until it finishes (stopping it after ``timeout``)."""
    with tempfile.TemporaryDirectory(prefix="privdistill-flwr-") as tmp:
        stage, run_config = _stage_app(app_dir, overrides, Path(tmp))
        proc = _flwr(env, "run", str(stage), CONNECTION, "--run-config", str(run_config), "--format", "json",
                     timeout=120)
    doc = _json_out(proc)
    with open(log_path, "a") as fh:
        fh.write(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not doc.get("success"):
        raise StageError(f"`flwr run` failed: {(proc.stdout + proc.stderr).strip()[-600:]}")
    run_id = str(doc["run-id"])
    log.info("federate.submitted", run_id=run_id)
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while True:
        try:
            ls = _json_out(_flwr(env, "ls", CONNECTION, "--run-id", run_id, "--format", "json"))
        except RetryableNetworkError:  # one slow status call (a loaded machine) is not the run's end: ask again
            log.warning("federate.status_timeout", run_id=run_id)
            ls = {}
        runs = ls.get("runs") or [status]
        status = runs[0]
        if str(status.get("status", "")).startswith("finished"):
            break
        if time.monotonic() > deadline:
            try:
                _flwr(env, "stop", run_id, CONNECTION)
                stopped = "it was stopped"
            except RetryableNetworkError:
                stopped = f"stopping it did not answer either: run `flwr stop {run_id}` (a SuperLink this command " \
                          "started is stopped in any case)"
            raise StageError(f"run {run_id} did not finish within {timeout:.0f} s (status "
                             f"{status.get('status')!r}; too few sites joined?); {stopped}")
        time.sleep(2)
    try:  # the ServerApp's log, for the operator; the run's result does not depend on it
        logs = _flwr(env, "log", run_id, CONNECTION, "--show", timeout=60)
        text = logs.stdout + logs.stderr
    except RetryableNetworkError as err:
        text = f"(no ServerApp log: {err})\n"
    with open(log_path, "a") as fh:
        fh.write(text)
    return {"run_id": run_id, "status": status.get("status"), "details": status.get("status-details")}


def federate(config_path: Path, training: Path, out: Path, *, superlink: str | None = None,
             port: int = DEFAULT_SUPERLINK_PORT, timeout: float = 3600, app_dir: Path = APP_DIR,
             on_ready: Any = None) -> dict[str, Any]:
    """The whole command; returns the run's federated.json. ``on_ready(address)`` is called once the
    SuperLink listens and the site keys are registered (sites may join from then on)."""
    from coordinator.student import load_training_config

    cfg = load_coordinator_config(config_path)
    load_training_config(training)  # every problem now, before anything starts
    out = Path(out).absolute()
    problems = []
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        problems.append(f"--out {out} exists and is not empty; federated runs never overwrite (choose a new dir)")
    ca = cfg.tls.ca
    if ca is None or not ca.is_file():
        problems.append("tls.ca: federated mode needs the CA certificate (the SuperNodes verify the SuperLink with it)")
    for name in ("cert", "key"):
        if not getattr(cfg.tls, name).is_file():
            problems.append(f"tls.{name}: {getattr(cfg.tls, name)} does not exist")
    if problems or ca is None:
        raise ConfigError(problems, str(config_path))
    home = cfg.state_dir / FLOWER_HOME
    env = flower_env(home)
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    link = None
    try:
        if superlink is None:
            link = start_superlink(cfg, env, host=cfg.listen.host, port=port, log_path=logs / "superlink.log")
            address = link.address
        else:
            address = superlink
        write_connection(home, address, ca)
        nodes = register_nodes(env, config_path.resolve().parent / NODE_PUBS_DIR)
        log.info("federate.ready", superlink=address, registered=sorted(nodes))
        if on_ready is not None:
            on_ready(address)
        overrides = {"training": str(Path(training).absolute()), "coordinator": str(Path(config_path).absolute()),
                     "out": str(out)}
        run = run_app(env, app_dir, overrides, timeout=timeout, log_path=logs / "runs.log")
    finally:
        if link is not None:
            link.stop()
    result_path = out / "federated.json"
    result = json.loads(result_path.read_text()) if result_path.is_file() else None
    if run["status"] != "finished:completed" or result is None or result.get("status") != "completed":
        reasons = sorted({r["reason"] for r in (result or {}).get("refusals", [])})
        raise StageError(f"federated run {run['run_id']} ended {run['status']!r} ({run['details']}); "
                         f"{'refusals: ' + ', '.join(reasons) if reasons else 'no federated.json written'}; "
                         f"ServerApp log: {logs / 'runs.log'}")
    return result | {"run_id": run["run_id"]}
