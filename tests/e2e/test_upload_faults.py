"""Uploads to a real TLS coordinator process on loopback under faults: random connection cuts, kill -9 of the
coordinator and of the client, an HTTPS_PROXY CONNECT tunnel, a revoked site and an untrusted certificate."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import structlog
import yaml
from structlog.testing import capture_logs

from privdistill.data.types import ImageSet
from privdistill.errors import PrivacyPolicyError, RetryableNetworkError, ShardVerificationError
from privdistill.identity import generate_key, load_private_key
from privdistill.shard import write_shard
from site_agent.upload import UploadResult, upload_shard

from ._flaky_proxy import ConnectProxy, FlakyProxy

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "import sys; from coordinator.cli import main; sys.exit(main())"]
SITES = ["site-a", "site-b", "site-c", "site-revoked"]
KiB = 1024

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


# ----------------------------------------------------------------------------- harness
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _provision(out: Path, port: int, sites: list[str]) -> Path:
    """In-process (the CLI spends seconds importing diffusers for its logging set-up; serve runs the real CLI)."""
    from coordinator.provision import provision

    provision(out, sites, host="127.0.0.1", port=port)
    # every chunk durable (fsync'd, offset committed): these tests kill processes mid-upload and check where the
    # ledger stood; the default commits every 32 MiB, past the end of these small shards
    cfg_file = out / "coordinator" / "coordinator.yaml"
    cfg = yaml.safe_load(cfg_file.read_text())
    cfg.setdefault("limits", {})["durable_every_bytes"] = 0
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


class Coordinator:
    """`privdistill-coordinator serve` as a child process (own session, so kill -9 hits only it)."""

    def __init__(self, bundle: Path, port: int) -> None:
        self.bundle, self.port = bundle, port
        self.config = bundle / "coordinator" / "coordinator.yaml"
        self.state = bundle / "coordinator" / "state"
        self.ca = bundle / "ca" / "ca.pem"
        self.url = f"https://127.0.0.1:{port}"
        self.log = bundle / "serve.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 45.0) -> Coordinator:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([*CLI, "serve", "--config", str(self.config), "--port", str(self.port)],
                                         cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        ctx = ssl.create_default_context(cafile=str(self.ca))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"coordinator exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", verify=ctx, trust_env=False, timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"coordinator not healthy within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def key(self, site: str):
        return load_private_key(self.bundle / site / "site.key")

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        db = sqlite3.connect(self.state / "ledger.sqlite", timeout=10)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def upload_rows(self, sha: str) -> list[tuple]:
        return self.query('SELECT id, state, "offset", size, reason FROM uploads WHERE tar_sha256 = ?', (sha,))

    def stored_tar(self, sha: str) -> bytes:
        return (self.state / "store" / sha[:2] / sha / "shard.tar").read_bytes()

    def staging(self) -> set[str]:
        return {p.name for p in (self.state / "staging").glob("*.part")}


def make_shard(out: Path, site: str, key, shard_id: str, n: int = 160, seed: int = 0) -> Path:
    """~2.5 KB per 28x28 noise sample in the tar: n=160 gives ~400 KB."""
    rng = np.random.default_rng(seed)
    kept = ImageSet(rng.uniform(-1, 1, (n, 1, 28, 28)).astype(np.float32), labels=rng.integers(0, 10, n),
                    class_names=[f"c{i}" for i in range(10)])
    write_shard(kept, out / shard_id, site_id=site, shard_id=shard_id, config_hash="ab" * 32,
                privacy={"kept": n}, key=key)
    return out / shard_id


def _up(coord: Coordinator, shard: Path, site: str, url: str | None = None, **kw) -> UploadResult:
    kw.setdefault("chunk_size", 16 * KiB)
    kw.setdefault("backoff_s", 0.05)
    kw.setdefault("timeout_s", 10.0)
    return upload_shard(shard, url=url or coord.url, ca_file=coord.ca, site_id=site, key=coord.key(site), **kw)


def _sha(shard: Path) -> str:
    return json.loads((shard / "manifest.json").read_text())["tar_sha256"]


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch):
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                 "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def coord(tmp_path_factory):
    port = _free_port()
    c = Coordinator(_provision(tmp_path_factory.mktemp("bundle"), port, SITES), port)
    try:
        yield c.start()
    finally:
        c.stop()


# ----------------------------------------------------------------------------- tests
def test_chunked_upload_is_accepted_byte_exact_and_reupload_is_a_noop(coord, tmp_path) -> None:
    shard = make_shard(tmp_path, "site-a", coord.key("site-a"), "plain", seed=1)
    local = (shard / "shard.tar").read_bytes()
    assert 250 * KiB < len(local) < 600 * KiB
    res = _up(coord, shard, "site-a")
    assert (res.state, res.duplicate, res.reason, res.resumed_from) == ("accepted", False, None, 0)
    assert res.bytes_sent == len(local) and res.requests == 1 + -(-len(local) // (16 * KiB))
    assert coord.stored_tar(res.shard_sha256) == local
    stored_dir = coord.state / "store" / res.shard_sha256[:2] / res.shard_sha256
    assert (stored_dir / "manifest.json").read_bytes() == (shard / "manifest.json").read_bytes()
    again = _up(coord, shard, "site-a")
    assert (again.state, again.duplicate, again.upload_id, again.bytes_sent) == ("accepted", True, res.upload_id, 0)
    assert coord.query("SELECT COUNT(*) FROM shards WHERE tar_sha256 = ?", (res.shard_sha256,)) == [(1,)]
    assert [r[:2] for r in coord.upload_rows(res.shard_sha256)] == [(res.upload_id, "accepted")]
    assert f"{res.upload_id}.part" not in coord.staging()


def test_random_connection_cuts_every_shard_accepted_exactly_once(coord, tmp_path) -> None:
    sites = ["site-a", "site-b", "site-c"]
    shards = {s: make_shard(tmp_path, s, coord.key(s), f"cut-{s}", seed=10 + i) for i, s in enumerate(sites)}
    results: dict[str, UploadResult | BaseException] = {}

    def run(site: str) -> None:
        try:
            results[site] = _up(coord, shards[site], site, url=f"https://127.0.0.1:{proxy.port}", max_attempts=12)
        except BaseException as err:
            results[site] = err

    with FlakyProxy(("127.0.0.1", coord.port), seed=20240917, p_cut=1.0, max_cuts=30, min_bytes=100,
                     max_bytes=64 * KiB) as proxy:
        structlog.reset_defaults()  # debug lines must reach the capture even if a CLI test configured logging
        with capture_logs() as logs:
            threads = [threading.Thread(target=run, args=(s,)) for s in sites]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=90)
    stats = proxy.stats
    print(f"proxy: {stats.connections} connections, {stats.cuts} cuts at {stats.cut_offsets}")
    assert all(isinstance(r, UploadResult) for r in results.values()), results
    assert stats.cuts >= 20, stats
    assert {d for d, _ in stats.cut_offsets} == {"up", "down"}  # requests and responses were both cut
    # after every break the client asked the server for its offset (HEAD) before sending again, so no PATCH
    # ever went to a stale offset (no 409)
    attempts = [e for e in logs if e["event"] == "upload_attempt"]
    assert sum("error" in e for e in attempts) >= 15
    for uid in {e["upload_id"] for e in attempts} - {None}:
        mine = [e for e in attempts if e["upload_id"] == uid]
        assert all(nxt["method"] == "HEAD" for e, nxt in itertools.pairwise(mine) if "error" in e)
        assert sum(e["method"] == "HEAD" for e in mine) >= sum("error" in e for e in mine[:-1])
    assert not [e for e in attempts if e.get("status") == 409], "a PATCH was sent at a stale offset"
    shas = {s: _sha(p) for s, p in shards.items()}
    for site, res in results.items():
        assert isinstance(res, UploadResult)
        assert res.state == "accepted" and not res.duplicate and res.shard_sha256 == shas[site]
        assert res.bytes_sent <= (shards[site] / "shard.tar").stat().st_size
        assert coord.stored_tar(shas[site]) == (shards[site] / "shard.tar").read_bytes()
        assert [r[1] for r in coord.upload_rows(shas[site])] == ["accepted"], "one upload per shard, accepted"
    marks = ",".join("?" * len(shas))
    assert coord.query(f"SELECT COUNT(*), COUNT(DISTINCT tar_sha256) FROM shards WHERE tar_sha256 IN ({marks})",
                       tuple(shas.values())) == [(3, 3)]
    assert coord.query("SELECT COUNT(*) FROM shards") == coord.query("SELECT COUNT(DISTINCT tar_sha256) FROM shards")
    assert coord.query("SELECT COUNT(*) FROM uploads WHERE state = 'receiving'") == [(0,)]
    accepted_ids = {r[0] for r in coord.query("SELECT id FROM uploads WHERE state = 'accepted'")}
    assert not {f"{i}.part" for i in accepted_ids} & coord.staging()


def test_kill9_coordinator_mid_upload_then_client_finishes(tmp_path) -> None:
    port = _free_port()
    coord = Coordinator(_provision(tmp_path / "bundle", port, ["site-a"]), port).start()
    shard = make_shard(tmp_path, "site-a", coord.key("site-a"), "crash", n=200, seed=3)
    size = (shard / "shard.tar").stat().st_size
    sha = _sha(shard)
    box: dict[str, object] = {}
    try:
        with FlakyProxy(("127.0.0.1", port), rate_bps=160 * KiB) as proxy:  # throttled: ~3 s per shard
            t = threading.Thread(target=lambda: box.update(res=_catch(
                lambda: _up(coord, shard, "site-a", url=f"https://127.0.0.1:{proxy.port}", backoff_s=0.2,
                            max_attempts=15))))
            t.start()
            offset = _wait_offset(coord, sha, 0.4 * size, timeout=40)
            coord.kill9()
            rows = coord.upload_rows(sha)
            assert len(rows) == 1 and rows[0][1] == "receiving" and 0.4 * size <= rows[0][2] < size, rows
            upload_id, offset = rows[0][0], rows[0][2]
            part = coord.state / "staging" / f"{upload_id}.part"
            assert part.stat().st_size >= offset  # the ledger is never ahead of the bytes on disk
            t_kill = time.monotonic()
            coord.start()
            print(f"killed at offset {offset}/{size}; restarted in {time.monotonic() - t_kill:.1f} s")
            t.join(timeout=60)
        res = box.get("res")
        assert isinstance(res, UploadResult), res
        assert (res.state, res.upload_id, res.duplicate) == ("accepted", upload_id, False)
        assert res.requests > 1 + -(-size // (16 * KiB))  # some attempts failed while the server was down
        assert coord.stored_tar(sha) == (shard / "shard.tar").read_bytes()
        assert coord.query("SELECT COUNT(*) FROM shards WHERE tar_sha256 = ?", (sha,)) == [(1,)]
        assert [r[:2] for r in coord.upload_rows(sha)] == [(upload_id, "accepted")]
        assert coord.staging() == set()
    finally:
        coord.stop()


CLIENT = """
import json, sys
from pathlib import Path
from privdistill.identity import load_private_key
from site_agent.upload import upload_shard
shard, url, ca, site, key = sys.argv[1:6]
res = upload_shard(Path(shard), url=url, ca_file=Path(ca), site_id=site, key=load_private_key(Path(key)),
                   chunk_size=16384, backoff_s=0.05)
print(json.dumps(res.__dict__))
"""


def test_client_killed_mid_upload_resumes_the_same_upload(coord, tmp_path) -> None:
    shard = make_shard(tmp_path, "site-b", coord.key("site-b"), "client-crash", n=200, seed=4)
    size = (shard / "shard.tar").stat().st_size
    sha = _sha(shard)
    with FlakyProxy(("127.0.0.1", coord.port), rate_bps=128 * KiB) as proxy:
        url = f"https://127.0.0.1:{proxy.port}"
        args = [str(shard), url, str(coord.ca), "site-b", str(coord.bundle / "site-b" / "site.key")]
        proc = subprocess.Popen([sys.executable, "-c", CLIENT, *args], cwd=ROOT, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            _wait_offset(coord, sha, 0.25 * size, timeout=40)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        [(upload_id, state, offset, _, _)] = coord.upload_rows(sha)
        assert state == "receiving" and 0 < offset < size
        proxy.rate_bps = None
        res = _up(coord, shard, "site-b", url=url)
    assert (res.state, res.upload_id, res.duplicate) == ("accepted", upload_id, False)
    assert res.resumed_from >= offset > 0
    # the killed client's last PATCH may still land after the restart's create (then a 409 skips it)
    assert size - res.resumed_from - 16 * KiB <= res.bytes_sent <= size - res.resumed_from
    assert coord.stored_tar(sha) == (shard / "shard.tar").read_bytes()
    assert [r[:2] for r in coord.upload_rows(sha)] == [(upload_id, "accepted")]


def test_https_proxy_is_used_and_no_proxy_bypasses_it(coord, tmp_path, monkeypatch) -> None:
    shard = make_shard(tmp_path, "site-c", coord.key("site-c"), "via-proxy", n=40, seed=5)
    with ConnectProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
        res = _up(coord, shard, "site-c")
        assert res.state == "accepted" and not res.duplicate
        assert proxy.connects and set(proxy.connects) == {f"127.0.0.1:{coord.port}"}
        seen = len(proxy.connects)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        again = _up(coord, shard, "site-c")
        assert again.duplicate and len(proxy.connects) == seen  # went direct
    # a dead proxy is a network failure (so the proxy really is on the path), retried then given up
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(RetryableNetworkError):
        _up(coord, shard, "site-c", max_attempts=2, backoff_s=0.01)


def test_revoked_and_unknown_sites_are_refused_without_retrying(coord, tmp_path) -> None:
    from coordinator.ledger import Ledger

    Ledger(coord.state / "ledger.sqlite").revoke_site("site-revoked")  # what `sites revoke` does, minus 8 s of imports
    shard = make_shard(tmp_path, "site-revoked", coord.key("site-revoked"), "revoked", n=20, seed=6)
    t0 = time.monotonic()
    with pytest.raises(PrivacyPolicyError, match="revoked_site") as info:
        _up(coord, shard, "site-revoked", max_attempts=8, backoff_s=1.0)
    assert info.value.reason == "revoked_site" and time.monotonic() - t0 < 5
    assert coord.query("SELECT COUNT(*) FROM uploads WHERE site = 'site-revoked'") == [(0,)]
    stranger = generate_key()
    other = make_shard(tmp_path, "site-x", stranger, "stranger", n=20, seed=7)
    with pytest.raises(ShardVerificationError) as info:
        upload_shard(other, url=coord.url, ca_file=coord.ca, site_id="site-x", key=stranger, backoff_s=1.0)
    assert info.value.reason == "bad_signature"  # the same answer as a registered site's wrong key


def test_untrusted_certificate_is_refused_without_retrying(coord, tmp_path) -> None:
    import certifi

    shard = make_shard(tmp_path, "site-a", coord.key("site-a"), "tls", n=20, seed=8)
    t0 = time.monotonic()
    with pytest.raises(ShardVerificationError) as info:
        upload_shard(shard, url=coord.url, ca_file=Path(certifi.where()), site_id="site-a", key=coord.key("site-a"),
                     backoff_s=1.0)
    assert info.value.reason == "tls_verification_failed" and time.monotonic() - t0 < 5


# ----------------------------------------------------------------------------- helpers
def _catch(fn):
    try:
        return fn()
    except BaseException as err:
        return err


def _wait_offset(coord: Coordinator, sha: str, at_least: float, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = coord.upload_rows(sha)
        if rows and rows[0][2] >= at_least:
            return rows[0][2]
        time.sleep(0.02)
    raise AssertionError(f"server offset did not reach {at_least:.0f} within {timeout} s: {coord.upload_rows(sha)}")
