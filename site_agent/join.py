"""`privdistill-site join`: run this site's Flower SuperNode (TLS verified with the provisioned CA,
authenticated with the site's Flower node key, telemetry off); its ClientApp trains behind the export gate."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from privdistill.errors import ConfigError
from privdistill.federated import (
    DEFAULT_SUPERLINK_PORT,
    NODE_KEY_FILE,
    NODE_SITE_CONFIG,
    NODE_WORKDIR,
    SUPEREXEC_POLL_ENV,
    SUPEREXEC_POLL_S,
)
from privdistill.identity import loose_mode
from privdistill.procs import bound_to_this_process, exit_on_sigterm
from site_agent.config import SiteConfig


def default_superlink(cfg: SiteConfig) -> str:
    """The coordinator's host at the default SuperLink port."""
    return f"{urlsplit(cfg.site.coordinator_url).hostname}:{DEFAULT_SUPERLINK_PORT}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def supernode_command(cfg: SiteConfig, config_path: Path, workdir: Path, *, superlink: str | None = None,
                      node_key: Path | None = None, runtime_port: int | None = None,
                      max_wait_s: float | None = None) -> list[str]:
    """The SuperNode command line for this site (Flower's flower-supernode through site_agent.supernode, which
    shortens its idle pull); every missing file is listed at once."""
    key = Path(node_key) if node_key is not None else cfg.site.key_file.parent / NODE_KEY_FILE
    problems = []
    if not key.is_file():
        problems.append(f"--node-key: {key} not found (the site bundle's {NODE_KEY_FILE}, written by "
                        "`privdistill-coordinator provision`)")
    elif loose_mode(key) is not None:
        problems.append(f"--node-key: {key} is readable by group/others; chmod 600 it")
    if not cfg.site.ca_file.is_file():
        problems.append(f"site.ca_file: {cfg.site.ca_file} not found")
    if not Path(workdir).is_dir():
        problems.append(f"--workdir {workdir} does not exist; run `privdistill-site run` first")
    if problems:
        raise ConfigError(problems)
    node_config = f'{NODE_SITE_CONFIG}="{Path(config_path).resolve()}" {NODE_WORKDIR}="{Path(workdir).resolve()}"'
    cmd = [sys.executable, "-m", "site_agent.supernode", "--superlink", superlink or default_superlink(cfg),
           "--root-certificates", str(cfg.site.ca_file), "--auth-supernode-private-key", str(key),
           "--node-config", node_config, "--port", str(runtime_port or _free_port())]
    if max_wait_s is not None:
        cmd += ["--max-wait-time", str(max_wait_s)]
    return cmd


def supernode_env(workdir: Path) -> dict[str, str]:
    """FLWR_HOME inside the work directory (installed app bundles stay on this machine), telemetry off,
    this environment's tools first on PATH (the SuperNode starts `flower-superexec` by name)."""
    return {SUPEREXEC_POLL_ENV: SUPEREXEC_POLL_S, **os.environ, "FLWR_HOME": str(Path(workdir).resolve() / ".flwr"),
            "FLWR_TELEMETRY_ENABLED": "0", "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}


def trainer_command(workdir: Path) -> list[str]:
    """The site's warm federated trainer (site_agent.trainer) for ``workdir``."""
    return [sys.executable, "-m", "site_agent.trainer", "--workdir", str(Path(workdir).resolve())]


def join(cfg: SiteConfig, config_path: Path, workdir: Path, *, warm_trainer: bool = True, **kwargs: object) -> int:
    """Run the SuperNode in the foreground until it exits (Ctrl-C stops it); returns its exit code. With
    ``warm_trainer`` a trainer process runs beside it (the training stack imported once, not every round)."""
    cmd = supernode_command(cfg, config_path, workdir, **kwargs)  # type: ignore[arg-type]
    # both bound to this process: a killed `join` (SIGKILL, OOM) takes them down, so no SuperNode keeps taking part
    # in rounds after the site's admin stopped the site
    helper = (subprocess.Popen(bound_to_this_process(trainer_command(workdir)), env=supernode_env(workdir))
              if warm_trainer else None)
    proc = subprocess.Popen(bound_to_this_process(cmd), env=supernode_env(workdir))
    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)  # a stopped join stops both children
    try:
        return proc.wait()
    except (KeyboardInterrupt, SystemExit):
        proc.terminate()
        proc.wait(timeout=30)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if helper is not None:
            helper.terminate()
            try:
                helper.wait(timeout=30)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait(timeout=10)
