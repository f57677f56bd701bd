"""One hospital whose images live in a PACS (make demo-pacs): a real Orthanc on loopback, filled with
Fashion-MNIST "patients" as DICOM studies that also carry fake names, birth dates and institutions ->
provision the site's identity -> `privdistill-site run` reads the PACS (pixels, label and patient id only),
trains, filters and packages a signed shard -> `privdistill-site approve` -> summary -> Orthanc stops.

Every command is the one an operator would type; logs are under WORKDIR/logs/. Needs Debian's `orthanc`
and `orthanc-dicomweb` packages and dataset-fashion-mnist."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the Orthanc launcher and seeder the e2e tests use

from _orthanc import (  # noqa: E402  # importable only after the sys.path line above
    CLASS_NAMES,
    FMNIST,
    LABEL_TAG,
    Orthanc,
    dicomweb_plugin,
    free_port,
    orthanc_binary,
    seed,
)

BIN = Path(sys.executable).parent
SITE = "hospital-pacs"
BASE_CONFIG = ROOT / "examples" / "site-pacs.yaml"


class DemoError(RuntimeError):
    pass


def tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else name


def run(cmd: list[str], log: Path, *, timeout: float | None = None) -> str:
    """Run one operator command; stderr goes to ``log``; a failure stops the demo with the log's tail."""
    print(f"$ {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}", flush=True)
    with open(log, "a") as fh:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
        fh.write(proc.stdout)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise DemoError(f"{Path(cmd[0]).name} {cmd[1]} exited with {proc.returncode}; see {log}\n{tail}")
    return proc.stdout


def write_site_config(work: Path, orthanc: Orthanc, bundle: Path, api: str) -> Path:
    """site.yaml = examples/site-pacs.yaml + this Orthanc's URL + the provisioned `site:` section."""
    password_file = work / "site" / "pacs_password"
    password_file.parent.mkdir(parents=True, exist_ok=True)
    password_file.write_text(orthanc.password + "\n")
    password_file.chmod(0o600)
    cfg = yaml.safe_load(BASE_CONFIG.read_text())
    cfg["data"]["source"].update({"url": orthanc.url, "api": api,
                                  "credentials": {"username": orthanc.username, "password_file": "pacs_password"}})
    if api == "dicomweb":
        cfg["data"]["source"]["dicomweb_root"] = "/dicom-web"
    conn = yaml.safe_load((bundle / "site-connection.yaml").read_text())
    cfg["site"] = {"id": conn["site_id"], "coordinator_url": conn["coordinator_url"],
                   "ca_file": str((bundle / conn["ca_file"]).resolve()),
                   "key_file": str((bundle / conn["key_file"]).resolve()), "approval": "manual"}
    out = work / "site" / "site.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def summarise(work: Path, site_work: Path, seeded: Any, phi: list[str]) -> dict[str, Any]:
    shards = json.loads(run([tool("privdistill-site"), "shards", "--workdir", str(site_work), "--json"],
                            work / "logs" / "site.log"))
    approved = [s for s in shards if s.get("state") == "approved"]
    manifest = json.loads((Path(approved[-1]["dir"]) / "manifest.json").read_text()) if approved else {}
    report = json.loads((site_work / "ingest" / "data_report.json").read_text())
    # the fake PHI stored on the PACS must appear nowhere in what the site agent wrote
    leaked = sorted({s for p in site_work.rglob("*") if p.is_file() for s in phi if s.encode() in p.read_bytes()})
    return {
        "pacs": {"instances": len(seeded.images), "patients": len(set(seeded.patient_ids)),
                 "per_class": {CLASS_NAMES[c]: n for c, n in sorted(Counter(seeded.labels).items())}},
        "ingest": {k: report[k] for k in ("n_train", "n_test", "n_patients_train", "n_patients_test",
                                          "train_per_class")} | {"skipped": report["source"]["skipped_by_reason"]},
        "shard": approved[-1]["shard_id"] if approved else None,
        "privacy": manifest.get("privacy", {}),
        "phi_strings_checked": len(phi),
        "phi_strings_found_in_workdir": leaked,
    }


def print_summary(s: dict[str, Any]) -> None:
    p = s["privacy"].get("aggregate", s["privacy"])
    print("\n=== privdistill PACS demo: summary ===")
    print(f"PACS: {s['pacs']['instances']} instances of {s['pacs']['patients']} patients")
    i = s["ingest"]
    print(f"ingest: {i['n_train']} train images ({i['n_patients_train']} patients), {i['n_test']} test images "
          f"({i['n_patients_test']} patients), skipped {i['skipped'] or 'none'}")
    print(f"shard {s['shard']} approved: kept {p.get('kept')} of {p.get('n_synthetic')} synthetic images; "
          f"memorization kept {p.get('kept_memorization_rate')}, re-id kept {p.get('kept_reid_rate')}")
    print(f"fake PHI strings found in the work directory: {len(s['phi_strings_found_in_workdir'])} "
          f"of {s['phi_strings_checked']} checked")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "demo-work-pacs")
    ap.add_argument("--api", choices=["orthanc", "dicomweb"], default="dicomweb")
    ap.add_argument("--patients", type=int, default=120, help="patients stored on the PACS (default 120)")
    args = ap.parse_args(argv)
    if orthanc_binary() is None or dicomweb_plugin() is None:
        print("Orthanc is not installed: run `sudo apt-get install orthanc orthanc-dicomweb` and retry",
              file=sys.stderr)
        return 3
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        print("Fashion-MNIST missing: run `sudo apt-get install dataset-fashion-mnist` and retry", file=sys.stderr)
        return 3
    work = args.workdir.resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    site_work = work / "site" / "work"
    t0 = time.time()
    bundle = work / "provision" / SITE
    if not bundle.is_dir():
        run([tool("privdistill-coordinator"), "provision", "--sites", SITE, "--out", str(work / "provision"),
             "--host", "127.0.0.1", "--port", str(free_port())], logs / "provision.log")
    orthanc = Orthanc(work / "orthanc")
    print(f"starting Orthanc on {orthanc.url} (storage {work / 'orthanc'})", flush=True)
    orthanc.start()
    try:
        if int(orthanc_statistics(orthanc)["CountInstances"]) == 0:
            seeded = seed(orthanc, patients=args.patients, visits=2, images_per_visit=1, classes=[1, 7, 8],
                          acquisitions=True)
        else:
            raise DemoError(f"{work / 'orthanc'} already holds a PACS from an earlier demo; remove {work} first")
        print(f"stored {len(seeded.images)} DICOM instances ({args.patients} patients, label in {LABEL_TAG}, "
              "fake names/birth dates/institutions in other tags)", flush=True)
        config = write_site_config(work, orthanc, bundle, args.api)
        run([tool("privdistill-site"), "run", str(config), "--workdir", str(site_work)], logs / "site.log",
            timeout=3600)
        shards = json.loads(run([tool("privdistill-site"), "shards", "--workdir", str(site_work), "--json"],
                                logs / "site.log"))
        packaged = [s["shard_id"] for s in shards if s.get("state") == "packaged"]
        if not packaged:
            raise DemoError(f"no packaged shard to approve; see {logs / 'site.log'}")
        run([tool("privdistill-site"), "approve", packaged[-1], "--workdir", str(site_work), "--by", "pacs-demo"],
            logs / "site.log")
        summary = summarise(work, site_work, seeded, [*seeded.phi_strings, "Fakename", "Saint Nowhere"])
    except DemoError as err:
        print(f"demo failed: {err}", file=sys.stderr)
        return 1
    finally:
        orthanc.stop()
        print("Orthanc stopped", flush=True)
    summary["seconds"] = round(time.time() - t0, 1)
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    print(f"total {summary['seconds']:.0f} s; summary in {work / 'summary.json'}")
    return 0 if not summary["phi_strings_found_in_workdir"] else 1


def orthanc_statistics(orthanc: Orthanc) -> dict[str, Any]:
    import httpx

    return httpx.get(f"{orthanc.url}/statistics", auth=orthanc.auth, timeout=10).json()


if __name__ == "__main__":
    sys.exit(main())
