"""Benchmark: shard ingest throughput of the coordinator vs a bare HTTPS upload server.

20 simulated sites (threads in this process, each with its own provisioned Ed25519 key) upload one
shard each, at the same time, to a real coordinator (`privdistill-coordinator serve`, TLS, loopback)
through ``site_agent.upload.upload_shard``: signed create, chunked signed PATCHes, fsync before the ledger offset
moves, ledger (sqlite, WAL) updates, every member verified as it arrives, content-addressed store.

Baseline, same run, same machine, same TLS certificate, same 20 client threads and the SAME shard
bytes: a bare uvicorn/starlette app that takes ``PUT /upload/{name}`` and writes the body to a file
(no auth, no fsync, no verification), one request per shard with a fresh httpx client per shard
(as upload_shard uses one per shard). For context only (not in the ratio): ``bare_fsync``, the same
with an fsync of each file.

After one unrecorded warm-up pass of each kind, passes alternate bare/ours (order flipped every
repetition) so drift on a shared CPU hits both; throughput = total shard bytes / wall time from the
start barrier to the last upload's end; the median over repetitions is reported, plus server and
client CPU seconds per pass (from /proc and getrusage), their medians per MiB, and the load average.

Usage:
  .venv/bin/python benchmarks/ingest.py                       # 20 sites x 2 MiB, 3 repetitions (~1 min)
  .venv/bin/python benchmarks/ingest.py --shard-mib 1 --reps 5
  .venv/bin/python benchmarks/ingest.py --quick               # seconds; smoke test
Writes benchmarks/results/ingest.json (use --out to write elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "ingest.json"
MiB = 1 << 20
SAMPLE_BYTES = 256 * 256 + 2 * 512 + 1024  # one incompressible 256x256 PNG + tar headers + its JSON

BASELINE_DESCRIPTION = (
    "bare: uvicorn + starlette, PUT /upload/{name}, body written to a file in a worker thread (no fsync, no auth, "
    "no verification, no ledger); same TLS cert/key and uvicorn settings as the coordinator; one PUT per shard "
    "with a fresh httpx.Client (verify=CA) per shard")
OURS_DESCRIPTION = (
    "ours: `privdistill-coordinator serve` (FastAPI/uvicorn with httptools on uvloop, TLS, listen.workers processes) "
    "+ site_agent.upload.upload_shard: local manifest/tar hash check, signed POST /v1/uploads (manifest signature "
    "verified), signed PATCH chunks (body hash + request signature checked, written to staging, fsync'd before the "
    "sqlite ledger offset moves), every member checked as it arrives (sha256, canonical tar header, PNG structure, "
    "CRCs and bounded inflate, JSON schema, prompts), shard sha256, install into the content-addressed store "
    "(fsyncs), ledger accept, audit log")

BARE_APP = r'''
import os, sys
from pathlib import Path
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.routing import Route

port, cert, key, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])

def _write(path, body, durable):
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(body)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    tmp.replace(path)

async def put(request):
    body = await request.body()
    await run_in_threadpool(_write, out / request.path_params["name"], body, "fsync" in request.query_params)
    return Response(status_code=201)

async def health(request):
    return Response("ok")

app = Starlette(routes=[Route("/upload/{name}", put, methods=["PUT"]), Route("/healthz", health)])
uvicorn.run(app, host="127.0.0.1", port=port, ssl_certfile=cert, ssl_keyfile=key, log_config=None,
            access_log=False, server_header=False, lifespan="off")
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its live child processes (the coordinator's workers)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def wait_healthy(proc: subprocess.Popen, url: str, ca: Path, log: Path, timeout: float = 120.0) -> None:
    import httpx

    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", verify=ctx, trust_env=False, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server at {url} not healthy within {timeout} s")


def make_shards(work: Path, sites: list[str], keys: dict, reps: int, shard_bytes: int) -> dict[tuple[int, str], Path]:
    """One distinct shard per (repetition, site): incompressible 256x256 grey PNGs, ~shard_bytes in the tar."""
    import numpy as np

    from privdistill.data.types import ImageSet
    from privdistill.shard import write_shard

    n = max(1, round(shard_bytes / SAMPLE_BYTES))
    shards = {}
    for r in range(reps):
        for i, site in enumerate(sites):
            rng = np.random.default_rng(1000 * r + i)
            kept = ImageSet(rng.uniform(-1, 1, (n, 1, 256, 256)).astype(np.float32), labels=rng.integers(0, 2, n),
                            class_names=["normal", "finding"])
            sid = f"bench-r{r}-{site}"
            shards[(r, site)] = work / "shards" / sid
            write_shard(kept, shards[(r, site)], site_id=site, shard_id=sid, config_hash="cd" * 32,
                        privacy={"kept": n}, key=keys[site])
    return shards


def client_cpu_seconds() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_pass(fn, jobs: list) -> tuple[float, list[float], list]:
    """Run ``fn(job)`` for every job in its own thread, released together; wall time, per-job latencies, results."""
    barrier = threading.Barrier(len(jobs) + 1)
    lat: list[float] = [0.0] * len(jobs)
    out: list = [None] * len(jobs)

    def worker(i: int) -> None:
        barrier.wait()
        t0 = time.perf_counter()
        try:
            out[i] = fn(jobs[i])
        except BaseException as err:
            out[i] = err
        lat[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, lat, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=20)
    p.add_argument("--shard-mib", type=float, default=2.0, help="approximate shard.tar size per site and pass")
    p.add_argument("--chunk-mib", type=float, default=None, help="upload_shard chunk_size (default: its default)")
    p.add_argument("--workers", type=int, default=None, help="coordinator worker processes (default: listen.workers)")
    p.add_argument("--reps", type=int, default=3, help="bare/ours pass pairs")
    p.add_argument("--quick", action="store_true", help="4 sites x 0.25 MiB, 1 repetition")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    if args.quick:
        args.sites, args.shard_mib, args.reps = 4, 0.25, 1

    import logging

    import httpx
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))  # no per-chunk lines

    from coordinator.provision import provision
    from privdistill.identity import load_private_key
    from site_agent.upload import upload_shard

    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="privdistill-ingest-"))
    procs: list[subprocess.Popen] = []
    try:
        sites = [f"site-{i:02d}" for i in range(args.sites)]
        port, bare_port = free_port(), free_port()
        bundle = work / "bundle"
        provision(bundle, sites, host="127.0.0.1", port=port)
        ca = bundle / "ca" / "ca.pem"
        cert, key = bundle / "coordinator" / "server.pem", bundle / "coordinator" / "server.key"
        keys = {s: load_private_key(bundle / s / "site.key") for s in sites}
        t0 = time.perf_counter()
        shards = make_shards(work, sites, keys, args.reps + 1, int(args.shard_mib * MiB))  # set 0: warm-up
        print(f"made {len(shards)} shards in {time.perf_counter() - t0:.1f} s", flush=True)

        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        (work / "bare").mkdir()
        with open(work / "coordinator.log", "wb") as clog, open(work / "bare.log", "wb") as blog:
            procs.append(subprocess.Popen(
                [sys.executable, "-c", "import sys; from coordinator.cli import main; sys.exit(main())", "serve",
                 "--config", str(bundle / "coordinator" / "coordinator.yaml"), "--port", str(port),
                 *([] if args.workers is None else ["--workers", str(args.workers)])],
                env=env, stdout=clog, stderr=subprocess.STDOUT, start_new_session=True))
            procs.append(subprocess.Popen([sys.executable, "-c", BARE_APP, str(bare_port), str(cert), str(key),
                                           str(work / "bare")], env=env, stdout=blog, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        coord, bare = procs
        url, bare_url = f"https://127.0.0.1:{port}", f"https://127.0.0.1:{bare_port}"
        wait_healthy(coord, url, ca, work / "coordinator.log")
        wait_healthy(bare, bare_url, ca, work / "bare.log")
        ctx = ssl.create_default_context(cafile=str(ca))
        from site_agent.upload import DEFAULT_CHUNK_BYTES

        chunk = DEFAULT_CHUNK_BYTES if args.chunk_mib is None else int(args.chunk_mib * MiB)

        def ours(job: tuple[str, Path]):
            site, shard = job
            return upload_shard(shard, url=url, ca_file=ca, site_id=site, key=keys[site], chunk_size=chunk)

        def plain(job: tuple[str, Path], query: str = ""):
            site, shard = job
            body = (shard / "shard.tar").read_bytes()
            with httpx.Client(verify=ctx, trust_env=False, timeout=60) as client:
                resp = client.put(f"{bare_url}/upload/{shard.name}.tar{query}", content=body)
            resp.raise_for_status()
            return resp.status_code

        kinds = {"ours": (coord, ours), "bare": (bare, plain), "bare_fsync": (bare, lambda j: plain(j, "?fsync=1"))}
        passes: dict[str, list[dict]] = {k: [] for k in kinds}
        warm = [(s, shards[(0, s)]) for s in sites]
        for _kind, (_, fn) in kinds.items():  # warm-up (lazy imports, first connections); not recorded
            run_pass(fn, warm)
        for r in range(args.reps):
            jobs = [(s, shards[(r + 1, s)]) for s in sites]
            total = sum((sh / "shard.tar").stat().st_size for _, sh in jobs)
            for kind in (("bare", "ours", "bare_fsync") if r % 2 == 0 else ("bare_fsync", "ours", "bare")):
                proc, fn = kinds[kind]
                cpu0, ccpu0 = cpu_seconds(proc.pid), client_cpu_seconds()
                wall, lat, out = run_pass(fn, jobs)
                cpu, ccpu = cpu_seconds(proc.pid) - cpu0, client_cpu_seconds() - ccpu0
                failures = [repr(o) for o in out if isinstance(o, BaseException)]
                if kind == "ours":
                    failures += [f"{o.state}:{o.reason}" for o in out
                                 if not isinstance(o, BaseException) and (o.state != "accepted" or o.duplicate)]
                rec = {"rep": r, "bytes": total, "wall_s": round(wall, 4), "mib_per_s": round(total / MiB / wall, 2),
                       "latency_p50_s": round(statistics.median(lat), 4), "latency_max_s": round(max(lat), 4),
                       "server_cpu_s": round(cpu, 3), "server_cpu_s_per_mib": round(cpu / (total / MiB), 4),
                       "client_cpu_s": round(ccpu, 3),
                       "failures": failures}
                passes[kind].append(rec)
                print(f"rep {r} {kind:<10} {rec['mib_per_s']:8.2f} MiB/s  wall {wall:6.2f} s  "
                      f"p50 {rec['latency_p50_s']:.2f} s  cpu server {cpu:.2f} s client {ccpu:.2f} s  "
                      f"failures {len(failures)}", flush=True)
                if failures:
                    print("  " + "\n  ".join(failures[:5]), flush=True)

        med = {k: statistics.median(x["mib_per_s"] for x in v) for k, v in passes.items()}
        ratio = med["ours"] / med["bare"]
        stored = sum(1 for _ in (bundle / "coordinator" / "state" / "store").glob("*/*/shard.tar"))
        result = {
            "benchmark": "ingest",
            "config": {"sites": args.sites, "shard_bytes_mean": round(statistics.mean(
                (sh / "shard.tar").stat().st_size for sh in shards.values())), "chunk_bytes": chunk,
                "reps": args.reps, "samples_per_shard": max(1, round(args.shard_mib * MiB / SAMPLE_BYTES)),
                "transport": "HTTPS (TLS 1.2+) on 127.0.0.1", "clients": "threads in one process"},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                        "load_average_1_5_15_min": {"start": [round(x, 2) for x in load_start],
                                                    "end": [round(x, 2) for x in os.getloadavg()]},
                        "note": "CPU shared with other jobs; numbers vary run to run"},
            "cpu_ms_per_mib_median": {k: {"server": round(1000 * statistics.median(
                x["server_cpu_s_per_mib"] for x in v), 1), "client": round(1000 * statistics.median(
                    x["client_cpu_s"] / (x["bytes"] / MiB) for x in v), 1)} for k, v in passes.items()},
            "ours": {"description": OURS_DESCRIPTION, "median_mib_per_s": round(med["ours"], 2),
                     "passes": passes["ours"]},
            "bare": {"description": BASELINE_DESCRIPTION, "median_mib_per_s": round(med["bare"], 2),
                     "passes": passes["bare"]},
            "bare_fsync": {"description": "bare + fsync of each file (context only; not in the ratio)",
                           "median_mib_per_s": round(med["bare_fsync"], 2), "passes": passes["bare_fsync"]},
            "ratio_ours_over_bare": round(ratio, 3),
            "goal_ratio": 0.5,
            "goal_met": ratio >= 0.5,
            "shards_in_store": stored,
            "all_accepted": all(not x["failures"] for v in passes.values() for x in v),
        }
        print("CPU ms per MiB (median): " + ", ".join(f"{k} server {v['server']} client {v['client']}"
                                                    for k, v in result["cpu_ms_per_mib_median"].items()))
        print(f"median throughput: ours {med['ours']:.2f} MiB/s, bare {med['bare']:.2f} MiB/s "
              f"(bare_fsync {med['bare_fsync']:.2f}), "
              f"ratio ours/bare {ratio:.3f} (goal >= 0.5: {'met' if ratio >= 0.5 else 'NOT met'})")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.out)
        print(f"wrote {args.out}")
        return 0 if result["all_accepted"] else 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
