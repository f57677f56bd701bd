"""Coordinator configuration: coordinator.yaml -> a typed model that rejects unknown keys and lists every problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from privdistill.config_loader import ConfigPath, Strict, load_model, parse_model
from privdistill.errors import ConfigError

KiB = 1 << 10
MiB = 1 << 20


class ListenConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8443, ge=0, le=65535)
    # server processes sharing the listening socket (the ledger, replay cache and upload locks are shared through
    # STATE); per-process limits (max_connections, max_buffered_bodies) then hold per worker. Default: 2, or 1 when
    # the /admin page is on (its login sessions live in one process's memory; more workers are refused with it)
    workers: int | None = Field(None, ge=1, le=64)


class TLSConfig(Strict):
    """Server certificate, its key and the CA that signed it (relative paths resolve against the yaml)."""

    cert: ConfigPath  # checked when serving (check_tls_files): provisioning writes the config first
    key: ConfigPath
    ca: ConfigPath | None = None


class LimitsConfig(Strict):
    max_chunk_bytes: int = Field(8 * MiB, ge=1, le=1 << 30)
    max_shard_bytes: int = Field(2 << 30, ge=1)
    # a manifest holds aggregate numbers and one sha256 per tar member (~180 bytes per sample): 1 MiB takes
    # shards of up to ~5,500 samples (split larger ones, or raise this)
    max_manifest_bytes: int = Field(1 * MiB, ge=1024, le=64 * MiB)
    max_clock_skew_s: int = Field(300, ge=1, le=3600)  # how old a signed request may be
    max_future_skew_s: int = Field(30, ge=1, le=3600)  # how far ahead of the coordinator's clock
    # per-site quotas
    # crash safety vs fsyncs: a chunk's bytes are fsync'd and its offset committed once this many bytes have come
    # since the last commit (and always at the last chunk); after a crash the site resends at most this much.
    # 0: every chunk (most resumable, one fsync per chunk)
    durable_every_bytes: int = Field(32 * MiB, ge=0, le=1 << 30)
    max_open_uploads_per_site: int = Field(8, ge=1)
    max_open_bytes_per_site: int = Field(8 << 30, ge=1)  # sum of the declared sizes of a site's open uploads
    max_requests_per_site: int = Field(20000, ge=10)  # signed requests per site inside the timestamp window
    # lifecycle
    upload_expiry_s: int = Field(24 * 3600, ge=60)  # an open upload without progress for this long is dropped
    rejected_retention_days: int = Field(30, ge=0)  # then a rejected upload's manifest is pruned from the ledger
    # the HTTP server
    max_connections: int = Field(128, ge=4, le=100000)  # uvicorn limit_concurrency: more are answered 503
    max_header_bytes: int = Field(16 * KiB, ge=4 * KiB, le=1 * MiB)  # request line + headers
    header_timeout_s: float = Field(10.0, gt=0, le=600)  # a request's headers must arrive within this
    body_timeout_s: float = Field(120.0, gt=0, le=3600)  # ... and its body within this (after the headers)
    max_buffered_bodies: int = Field(16, ge=1)  # authenticated bodies held in memory at once (then 503)


class CoordinatorConfig(Strict):
    listen: ListenConfig = ListenConfig()
    tls: TLSConfig
    state_dir: ConfigPath
    limits: LimitsConfig = LimitsConfig()
    # the monitoring page under /admin (absent: /admin answers 404). A file holding the admin token, mode 0600.
    admin_token_file: ConfigPath | None = None
    # what the monitoring page reads (each optional): `train-student --workdir`, `release --out`, `--training`
    student_workdir: ConfigPath | None = None
    releases_dir: ConfigPath | None = None
    training_config: ConfigPath | None = None

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite"

    def server_processes(self, override: int | None = None) -> int:
        """How many server processes `serve` runs: ``override`` (serve --workers), else listen.workers, else 2, or 1
        with the /admin page on. ConfigError when more than one is asked for with the page on."""
        n = override if override is not None else self.listen.workers
        if n is None:
            return 1 if self.admin_token_file is not None else 2
        if n > 1 and self.admin_token_file is not None:
            raise ConfigError([f"listen.workers: {n} with the /admin page on (admin_token_file): its login sessions "
                               "live in one process's memory; run 1 worker, or leave admin_token_file unset"])
        return n


def parse_coordinator_config(raw: Any, *, base_dir: Path, source: str | None = None) -> CoordinatorConfig:
    """Validate ``raw`` (parsed YAML) and resolve relative paths against ``base_dir``."""
    return parse_model(CoordinatorConfig, raw, source=source, base_dir=base_dir)


def load_coordinator_config(path: str | Path) -> CoordinatorConfig:
    """Read coordinator.yaml; raise ConfigError listing every problem."""
    return load_model(CoordinatorConfig, path, missing_hint=" (run `privdistill-coordinator provision` first)")


def check_tls_files(cfg: CoordinatorConfig) -> None:
    """Serving needs the certificate and key on disk; list every missing file."""
    missing = [f"tls.{name}: {p} does not exist" for name, p in
               (("cert", cfg.tls.cert), ("key", cfg.tls.key), ("ca", cfg.tls.ca)) if p is not None and not p.is_file()]
    if missing:
        raise ConfigError(missing)
