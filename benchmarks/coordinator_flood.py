"""Load test: the coordinator's memory under slow-body, huge-header and slow-header floods (no key needed) while a
registered site uploads a shard.

A real coordinator (`privdistill-coordinator serve`, TLS, loopback, default limits) runs as a child process. After
a warm-up upload, this process opens flood connections from asyncio, for ``--seconds``:
- slow-body: a registered site's name, well-formed headers with a wrong signature, Content-Length 16 MiB, then the
  body trickled (1 KiB every 50 ms);
- fast-body: an unknown site, 16 MiB sent as fast as the socket takes it;
- huge-header: a request line and then an endless header (64 KiB writes, up to 40 MiB);
- slow-header (slowloris): one header byte every 200 ms;
- (with --tls-stall N) N TCP connections that never start their TLS handshake;
each connection reopened as soon as the server closes it. Meanwhile ``site_agent.upload.upload_shard`` uploads a
shard for a registered site. The coordinator's RSS (/proc/PID/status VmRSS) is sampled every 100 ms.

Reported: RSS before (after warm-up) and its peak during the flood, the legitimate upload's outcome and time, and
per attack the connections made and how long the server kept one open at most. Loopback only; bounded in time.

Usage:
  python benchmarks/coordinator_flood.py                     # 24 connections per attack, 20 s
  python benchmarks/coordinator_flood.py --conns 8 --seconds 8
Writes benchmarks/results/coordinator_flood.json (--out elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "import sys; from coordinator.cli import main; sys.exit(main())"]
MiB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _shard(out: Path, site: str, key: Any, shard_id: str, n: int, seed: int) -> Path:
    from privdistill.data.types import ImageSet
    from privdistill.shard import write_shard

    rng = np.random.default_rng(seed)
    kept = ImageSet(rng.uniform(-1, 1, (n, 1, 28, 28)).astype(np.float32), labels=rng.integers(0, 10, n),
                    class_names=[f"c{i}" for i in range(10)])
    write_shard(kept, out / shard_id, site_id=site, shard_id=shard_id, config_hash="ab" * 32, privacy={"kept": n},
                key=key)
    return out / shard_id


# ----------------------------------------------------------------------------- attackers
class Attack:
    def __init__(self, name: str) -> None:
        self.name, self.connections, self.max_open_s, self.refused = name, 0, 0.0, 0

    def summary(self) -> dict[str, Any]:
        return {"connections": self.connections, "max_open_s": round(self.max_open_s, 2),
                "connect_refused_or_reset": self.refused}


def _headers(site: str, length: int | None) -> bytes:
    lines = ["POST /v1/uploads HTTP/1.1", "Host: 127.0.0.1", f"X-Privdistill-Site: {site}",
             f"X-Privdistill-Timestamp: {int(time.time())}", f"X-Privdistill-Nonce: {secrets.token_hex(16)}",
             f"X-Privdistill-Content-SHA256: {'0' * 64}",
             f"X-Privdistill-Signature: {base64.b64encode(secrets.token_bytes(64)).decode()}",
             "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _one(kind: str, port: int, ctx: ssl.SSLContext, attack: Attack, stop: float) -> None:
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), timeout=10)
    except (TimeoutError, OSError, ssl.SSLError):
        attack.refused += 1
        await asyncio.sleep(0.2)
        return
    attack.connections += 1
    try:
        if kind == "slow-body":
            writer.write(_headers("site-a", 16 * MiB))
            while time.monotonic() < stop and not reader.at_eof():
                writer.write(b"\0" * 1024)
                await writer.drain()
                await asyncio.sleep(0.05)
        elif kind == "fast-body":
            writer.write(_headers("no-such-site", 16 * MiB))
            block = b"\0" * (256 * 1024)
            for _ in range(64):
                if time.monotonic() > stop or reader.at_eof():
                    break
                writer.write(block)
                await asyncio.wait_for(writer.drain(), timeout=max(0.1, stop - time.monotonic()))
        elif kind == "huge-header":
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
            block = b"a" * (64 * 1024)
            for _ in range(640):  # 40 MiB
                if time.monotonic() > stop or reader.at_eof():
                    break
                writer.write(block)
                await asyncio.wait_for(writer.drain(), timeout=max(0.1, stop - time.monotonic()))
        else:  # slow-header
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            while time.monotonic() < stop and not reader.at_eof():
                writer.write(b"a")
                await writer.drain()
                await asyncio.sleep(0.2)
        # wait for the server's answer or close
        with contextlib.suppress(TimeoutError, OSError, ssl.SSLError):
            await asyncio.wait_for(reader.read(), timeout=max(0.1, stop - time.monotonic()))
    except (TimeoutError, OSError, ssl.SSLError, ConnectionError):
        pass
    finally:
        attack.max_open_s = max(attack.max_open_s, time.monotonic() - t0)
        writer.close()
        with contextlib.suppress(TimeoutError, OSError, ssl.SSLError, ConnectionError):
            await asyncio.wait_for(writer.wait_closed(), timeout=1)


async def _stall_tls(port: int, attack: Attack, stop: float) -> None:
    """A TCP connection that never starts its TLS handshake (held until the server drops it or the flood ends)."""
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout=10)
    except (TimeoutError, OSError):
        attack.refused += 1
        await asyncio.sleep(0.2)
        return
    attack.connections += 1
    try:
        await asyncio.wait_for(reader.read(), timeout=max(0.1, stop - time.monotonic()))
    except (TimeoutError, OSError):
        pass
    finally:
        attack.max_open_s = max(attack.max_open_s, time.monotonic() - t0)
        writer.close()


async def _flood(port: int, ca: Path, conns: int, seconds: float, attacks: dict[str, Attack],
                 tls_stall: int = 0) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    stop = time.monotonic() + seconds

    async def worker(kind: str) -> None:
        while time.monotonic() < stop:
            if kind == "tls-stall":
                await _stall_tls(port, attacks[kind], stop)
            else:
                await _one(kind, port, ctx, attacks[kind], stop)

    await asyncio.gather(*(worker(k) for k in attacks for _ in range(tls_stall if k == "tls-stall" else conns)))


# ----------------------------------------------------------------------------- the run
def run(*, conns: int = 24, seconds: float = 20.0, tls_stall: int = 0, workdir: Path | None = None) -> dict[str, Any]:
    from coordinator.provision import provision
    from privdistill.identity import load_private_key
    from site_agent.upload import upload_shard

    tmp = Path(tempfile.mkdtemp(prefix="flood-", dir=workdir))
    port = _free_port()
    bundle = provision(tmp / "kit", ["site-a", "site-b"], host="127.0.0.1", port=port)
    config = bundle.root / "coordinator" / "coordinator.yaml"
    ca = bundle.root / "ca" / "ca.pem"
    env = {**{k: v for k, v in os.environ.items() if "proxy" not in k.lower()}, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    log = open(tmp / "serve.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([*CLI, "--log-level", "warning", "serve", "--config", str(config), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"https://127.0.0.1:{port}"
    try:
        verify = ssl.create_default_context(cafile=str(ca))
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"coordinator did not start:\n{(tmp / 'serve.log').read_text()[-2000:]}")
            try:
                if httpx.get(url + "/healthz", verify=verify, trust_env=False, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        key = load_private_key(bundle.site_dirs["site-a"] / "site.key")
        warm = _shard(tmp / "shards", "site-a", key, "warm", 160, 1)
        legit = _shard(tmp / "shards", "site-a", key, "legit", 160, 2)
        kw = dict(url=url, ca_file=ca, site_id="site-a", key=key, chunk_size=64 * 1024, backoff_s=0.2,
                  max_attempts=20, timeout_s=30.0)
        assert upload_shard(warm, **kw).state == "accepted"

        samples: list[tuple[float, float]] = []
        sampling = threading.Event()

        def sample() -> None:
            t0 = time.monotonic()
            while not sampling.is_set():
                samples.append((time.monotonic() - t0, _rss_mib(proc.pid)))
                time.sleep(0.1)

        before = [_rss_mib(proc.pid) for _ in range(5)]
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        kinds = ("slow-body", "fast-body", "huge-header", "slow-header") if conns else ()
        attacks = {k: Attack(k) for k in (*kinds, *(("tls-stall",) if tls_stall else ()))}
        flood = threading.Thread(target=lambda: asyncio.run(_flood(port, ca, conns, seconds, attacks, tls_stall)),
                                 daemon=True)
        flood.start()
        time.sleep(min(3.0, seconds / 4))  # the flood is up before the site starts
        t0 = time.monotonic()
        result = upload_shard(legit, **kw)
        legit_s = time.monotonic() - t0
        flood.join(timeout=seconds + 30)
        sampling.set()
        sampler.join(timeout=5)
        after = _rss_mib(proc.pid)
        peak = max(r for _, r in samples)
        return {
            "benchmark": "coordinator_flood", "python": platform.python_version(), "cpus": os.cpu_count(),
            "flood": {"connections_per_attack": conns, "tls_stall": tls_stall, "seconds": seconds},
            "rss_mib": {"before": round(float(np.median(before)), 1), "peak": round(peak, 1),
                        "after": round(after, 1), "peak_minus_before": round(peak - float(np.median(before)), 1),
                        "samples": len(samples),
                        "peak_per_5s": [round(max((r for t, r in samples if i <= t < i + 5), default=0.0), 1)
                                        for i in range(0, int(samples[-1][0]) + 1, 5)]},
            "legit_upload": {"state": result.state, "seconds": round(legit_s, 2), "requests": result.requests,
                             "bytes": result.bytes_sent},
            "attacks": {k: a.summary() for k, a in attacks.items()},
            "coordinator_alive": proc.poll() is None,
        }
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conns", type=int, default=24, help="concurrent connections per attack kind (4 kinds)")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--tls-stall", type=int, default=0, help="also hold this many TCP connections that never start "
                   "TLS (0 with --conns 0: only these)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "coordinator_flood.json")
    args = p.parse_args()
    from privdistill.logs import configure_logging

    configure_logging("console", "warning")
    res = run(conns=args.conns, seconds=args.seconds, tls_stall=args.tls_stall)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
