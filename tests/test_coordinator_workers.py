"""The coordinator with two worker processes over one state directory: concurrent uploads of the same shard and of
different shards, in small chunks (so one upload's chunks land on both workers), end with every shard accepted
exactly once, stored byte for byte, and a tampered chunk still refused."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from _fixtures import process_running

from coordinator.ledger import Ledger
from coordinator.provision import Provisioned, provision
from privdistill.data.types import ImageSet
from privdistill.identity import load_private_key
from privdistill.shard import write_shard
from site_agent import upload as upload_mod
from site_agent.upload import upload_shard

ROOT = Path(__file__).resolve().parents[1]
SITES = ["site-a", "site-b", "site-c"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == str(pid):
            out.append(int(stat.parent.name))
    return out


def _start(prov: Provisioned, port: int, log: Any, workers: int = 2) -> tuple[subprocess.Popen, str]:
    """`serve --workers N` in its own session; returns it and its URL once /healthz answers."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from coordinator.cli import main; sys.exit(main())",
                             "serve", "--config", str(prov.config), "--port", str(port), "--workers", str(workers)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"https://127.0.0.1:{port}"
    ctx = ssl.create_default_context(cafile=str(prov.root / "ca" / "ca.pem"))
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, Path(log.name).read_text()[-2000:]
        assert time.monotonic() < deadline, "coordinator not healthy in 60 s"
        try:
            if httpx.get(url + "/healthz", verify=ctx, trust_env=False, timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Provisioned, str, subprocess.Popen]]:
    port = _free_port()
    prov = provision(tmp_path_factory.mktemp("workers") / "kit", SITES, host="127.0.0.1", port=port)
    with open(prov.root / "coordinator.log", "wb") as log:
        proc, url = _start(prov, port, log)
        try:
            yield prov, url, proc
        finally:
            _stop(proc)


def _shard(root: Path, site: str, shard_id: str, seed: int, prov: Provisioned) -> Path:
    rng = np.random.default_rng(seed)
    n = 6
    kept = ImageSet(rng.uniform(-1, 1, (n, 1, 28, 28)).astype(np.float32), labels=rng.integers(0, 2, n),
                    class_names=["normal", "finding"])
    out = root / shard_id
    write_shard(kept, out, site_id=site, shard_id=shard_id, config_hash="cd" * 32, privacy={"kept": n},
                key=load_private_key(prov.site_dirs[site] / "site.key"))
    return out


def _upload(prov: Provisioned, url: str, site: str, shard: Path, **kw: Any) -> Any:
    return upload_shard(shard, url=url, ca_file=prov.root / "ca" / "ca.pem", site_id=site,
                        key=load_private_key(prov.site_dirs[site] / "site.key"), chunk_size=2048, backoff_s=0.05,
                        max_attempts=20, **kw)


def test_two_workers_accept_each_shard_exactly_once(server, tmp_path: Path) -> None:
    prov, url, proc = server
    assert len(_children(proc.pid)) == 2  # the parent forked two workers
    same = _shard(tmp_path, "site-a", "same", 1, prov)
    others = [_shard(tmp_path, s, f"other-{i}", 10 + i, prov) for i, s in enumerate(SITES)]
    jobs = [("site-a", same)] * 4 + [(s, sh) for s, sh in zip(SITES, others, strict=True)]
    results: list[Any] = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = _upload(prov, url, *jobs[i])
        except BaseException as err:  # reported by the assertion below
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not [r for r in results if isinstance(r, BaseException) or r is None], results
    assert all(r.state == "accepted" for r in results), [(r.state, r.reason) for r in results]
    ledger = Ledger(prov.root / "coordinator" / "state" / "ledger.sqlite")
    shards = ledger.accepted_shards()
    assert sorted(s.shard_id for s in shards) == sorted(["same", "other-0", "other-1", "other-2"])
    for s in shards:  # stored byte for byte
        src = same if s.shard_id == "same" else tmp_path / s.shard_id
        assert (s.dir / "shard.tar").read_bytes() == (src / "shard.tar").read_bytes()
    added = [e for e in ledger.events("accepted") if e.reason is None]
    assert len(added) == 4  # one "accepted" per shard; any other acceptance of the same bytes is a duplicate
    assert ledger.open_uploads() == []


@pytest.mark.parametrize("at", [0, 2048])  # 0: the first chunk, whose body digest becomes the shard's hash state
def test_a_tampered_chunk_is_refused_by_the_streaming_check(server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            at: int) -> None:
    prov, url, _ = server
    shard = _shard(tmp_path, "site-b", f"tampered-{at}", 99, prov)
    real_request = upload_mod._Uploader._request

    def flip(self: Any, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> Any:
        if method == "PATCH" and body and int((headers or {}).get("Upload-Offset", -1)) == at:
            body = body[:100] + bytes([body[100] ^ 1]) + body[101:]  # signed as sent: only the content is wrong
        return real_request(self, method, path, body, headers)

    monkeypatch.setattr(upload_mod._Uploader, "_request", flip)
    res = _upload(prov, url, "site-b", shard)
    assert (res.state, res.reason) == ("rejected", "hash_mismatch")
    ledger = Ledger(prov.root / "coordinator" / "state" / "ledger.sqlite")
    assert f"tampered-{at}" not in {s.shard_id for s in ledger.all_shards()}


def test_kept_thread_connections_serve_many_threads_and_all_close(tmp_path: Path) -> None:
    """The server's ledger keeps one SQLite connection per thread: concurrent writers from 16 threads commit every
    offset move exactly once, an ended thread's connection is closed with it, ``close`` closes the rest, and the
    ledger still works after it (it opens new ones)."""
    from privdistill.identity import generate_key, public_key_b64

    ledger = Ledger(tmp_path / "ledger.sqlite", keep_open=True)
    ledger.add_site("site-a", public_key_b64(generate_key()))
    ids = [f"u{i}" for i in range(8)]
    for i, up in enumerate(ids):
        ledger.create_upload(up, "site-a", f"{i:064x}", 100, "{}", "sig")
    moved: list[bool] = []

    def advance(up: str) -> None:
        for n in range(100):  # each step is a compare-and-set: it holds only if no other write raced it
            moved.append(ledger.set_offset(up, n, n + 1))

    threads = [threading.Thread(target=advance, args=(up,)) for up in ids for _ in range(2)]  # two per upload
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [r.offset for r in map(ledger.upload, ids) if r is not None] == [100] * 8
    assert moved.count(True) == 800  # every step taken once, by one of its two threads
    assert ledger._threads is not None
    assert len(ledger._threads.open_connections()) == 1  # the 16 ended threads' connections closed with them
    kept = ledger._threads.open_connections()
    ledger.close()  # from any thread
    for db in kept:
        with pytest.raises(Exception, match="closed"):
            db.execute("SELECT 1")
    row = ledger.upload("u0")  # the ledger opens this thread's connection again
    assert row is not None and row.offset == 100


def test_chunks_alternating_between_two_workers_are_verified_as_one_stream(tmp_path: Path) -> None:
    """Two app instances over one state directory stand for two worker processes: each catches its streaming
    check up from the staging file when the other took the previous chunk."""
    from fastapi.testclient import TestClient
    from test_coordinator_api import CHUNK, A, call, make_app, shard_files, start

    from privdistill.identity import generate_key, public_key_b64

    key = generate_key()
    rng = np.random.default_rng(3)
    kept = ImageSet(images=rng.uniform(-1, 1, (6, 1, 8, 8)).astype(np.float32), labels=np.array([0, 1] * 3),
                    class_names=["cat", "dog"])
    write_shard(kept, tmp_path / "s1", site_id=A, shard_id="s1", config_hash="0" * 64, privacy={"kept": 6}, key=key)
    tar, manifest, sig = shard_files(tmp_path / "s1")
    apps = [make_app(tmp_path), make_app(tmp_path)]
    apps[0].state.ledger.add_site(A, public_key_b64(key))
    with TestClient(apps[0]) as c0, TestClient(apps[1]) as c1:
        clients = [c0, c1]
        up = start(c0, key, A, manifest, sig).json()["upload_id"]
        offsets = list(range(0, len(tar), CHUNK))
        assert len(offsets) >= 3
        for i, off in enumerate(offsets):
            r = call(clients[i % 2], key, A, "PATCH", f"/v1/uploads/{up}", tar[off:off + CHUNK],
                     {"Upload-Offset": str(off), "Content-Type": "application/offset+octet-stream"})
            assert r.status_code == 204, r.text
        assert r.headers["Upload-State"] == "accepted"
    (shard,) = apps[1].state.ledger.accepted_shards()
    assert (shard.dir / "shard.tar").read_bytes() == tar


def test_admin_page_keeps_one_worker_and_refuses_more(tmp_path: Path) -> None:
    from coordinator.config import parse_coordinator_config
    from privdistill.errors import ConfigError

    base = {"tls": {"cert": "c.pem", "key": "k.pem"}, "state_dir": "state"}
    plain = parse_coordinator_config(base, base_dir=tmp_path)
    admin = parse_coordinator_config({**base, "admin_token_file": "admin_token"}, base_dir=tmp_path)
    # default: 2 server processes, but 1 with the /admin page (its login sessions live in one process)
    assert (plain.server_processes(), admin.server_processes(), plain.server_processes(3)) == (2, 1, 3)
    assert admin.server_processes(1) == 1
    with pytest.raises(ConfigError, match="listen.workers: 2 with the /admin page on"):
        admin.server_processes(2)
    explicit = parse_coordinator_config({**base, "admin_token_file": "t", "listen": {"workers": 4}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="run 1 worker"):
        explicit.server_processes()


@pytest.mark.timeout(120)
def test_workers_end_when_the_master_is_killed(tmp_path: Path) -> None:
    """SIGKILL to the serving master (the OOM killer, a crashed supervisor) must not leave workers serving the port."""
    port = _free_port()
    prov = provision(tmp_path / "kit", SITES, host="127.0.0.1", port=port)
    with open(tmp_path / "coordinator.log", "wb") as log:
        proc, _url = _start(prov, port, log)
        try:
            workers = _children(proc.pid)
            assert len(workers) == 2
            proc.kill()  # the master only, not its process group
            proc.wait(timeout=10)
            deadline = time.monotonic() + 20
            while [w for w in workers if process_running(w)]:
                assert time.monotonic() < deadline, f"workers {workers} outlived their killed master"
                time.sleep(0.1)
            with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
                pass  # nobody listens any more
        finally:
            _stop(proc)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_stops_serve_gracefully_and_says_nothing_false(tmp_path: Path, workers: int) -> None:
    """`docker stop` sends SIGTERM: the coordinator shuts down and ends as terminated (143), without reporting the
    port as taken (uvicorn re-raises the signal after its graceful shutdown)."""
    port = _free_port()
    prov = provision(tmp_path / "kit", SITES, host="127.0.0.1", port=port)
    with open(tmp_path / "coordinator.log", "wb") as log:
        proc, _url = _start(prov, port, log, workers=workers)
        try:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
        finally:
            _stop(proc)
    text = (tmp_path / "coordinator.log").read_text()
    assert rc in (0, 128 + signal.SIGTERM), text[-2000:]
    assert "could not serve" not in text and "Traceback" not in text, text[-2000:]
