"""The deployment end to end with tiny configs: provision, a TLS coordinator, two site agents on
disjoint Fashion-MNIST patients, export, student training / evaluation / release, per-site check of
the student — real processes on 127.0.0.1 (examples/two_site_demo.py --size tiny). Then it tries to
find anything of a site's real data on the coordinator's side of the wire."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from privdistill.data.types import ImageSet
from privdistill.shard import decode_png, iter_samples

ROOT = Path(__file__).resolve().parents[2]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
SITES = ("site-a", "site-b")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed (make test installs it)"),
]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _coordinator_side(work: Path) -> list[Path]:
    """Every file the coordinator holds or produced: its state, its work dir and the release."""
    roots = [work / "provision" / "coordinator", work / "coordinator", work / "release"]
    return [p for r in roots if r.exists() for p in r.rglob("*") if p.is_file()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("two-sites")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "two_site_demo.py"), "--size", "tiny",
                           "--workdir", str(work)], capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "summary" in proc.stdout
    for site in SITES:  # one line per site stage as it finishes, not silence while the sites train
        for stage in ("ingest", "train-teacher", "train-reid", "sample", "filter", "package"):
            assert f"  {site}: {stage} done in " in proc.stdout, proc.stdout[-3000:]
    return work


@pytest.mark.timeout(1800)
def test_both_sites_exported_and_the_coordinator_accepted_each_shard_once(demo: Path) -> None:
    summary = json.loads((demo / "summary.json").read_text())
    cfg = demo / "provision" / "coordinator" / "coordinator.yaml"
    listed = json.loads(subprocess.run([sys.executable, "-m", "coordinator.cli", "shards", "list", "--config",
                                        str(cfg), "--json"], capture_output=True, text=True, check=True,
                                       cwd=ROOT).stdout)

    assert sorted(s["site"] for s in listed) == list(SITES)
    for site in SITES:
        s = summary["sites"][site]
        assert s["shard"] is not None and s["shard"].startswith(site)
        # at most the demo's policy (0.02, the memorization metric's fresh-image noise floor: see two_site_demo.py)
        assert s["privacy"]["kept"] > 0 and s["privacy"]["kept_memorization_rate"] <= 0.02
        # every kind of planted copy at least the demo's policy (0.9: see two_site_demo.py), exact copies all
        recall = s["privacy"]["audit"]["planted_recall"]
        assert min(recall.values()) >= 0.9 and recall["exact"] == 1.0, recall
        exported = [json.loads(x) for x in (demo / site / "work" / "audit.log").read_text().splitlines()]
        assert [e["event"] for e in exported].count("exported") == 1
        ev = s["student_eval"]["student"]
        assert 0.0 <= ev["memorization_rate"] <= 1.0 and 0.0 <= ev["tstr_accuracy"] <= 1.0
    coord_audit = [json.loads(x) for x in (demo / "provision" / "coordinator" / "state" / "audit.log")
                   .read_text().splitlines()]
    assert sorted(e.get("site") for e in coord_audit if e["event"] == "accepted") == list(SITES)
    assert any(e["event"] == "released" for e in coord_audit)


@pytest.mark.timeout(600)
def test_release_has_model_card_and_loadable_student(demo: Path) -> None:
    from privdistill.models import DiffusionModel

    release = Path(json.loads((demo / "summary.json").read_text())["release"])
    card = (release / "MODEL_CARD.md").read_text()
    meta = json.loads((release / "release.json").read_text())

    for site in SITES:
        assert site in card
    model = DiffusionModel.load(release)
    assert model.resolution == 16 and meta
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(release, trust_remote_code=True, local_files_only=True)
    images = pipe(class_labels=[0, 1], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 16, 16, model.channels)


@pytest.mark.timeout(600)
def test_no_real_data_reached_the_coordinator(demo: Path) -> None:
    coord_files = _coordinator_side(demo)
    coord_hashes = {_sha(p) for p in coord_files}
    blob = b"".join(p.read_bytes() for p in coord_files if p.stat().st_size < 50_000_000)
    for site in SITES:
        w = demo / site / "work"
        train = ImageSet.load(w / "ingest" / "train.npz")
        # 1. no patient id, in any file the coordinator holds
        for pid in sorted(set(train.patient_ids.tolist()))[:200]:
            assert pid.encode() not in blob, f"patient id {pid} of {site} found on the coordinator"
        # 2. no byte-identical copy of the site's teacher weights, re-identification model or ingested data
        #    (config files such as the DDPM scheduler's are the same everywhere and carry nothing private)
        private = [p for d in ("ingest", "train-teacher", "train-reid") for p in (w / d).rglob("*")
                   if p.suffix in {".npz", ".safetensors", ".onnx", ".pt", ".bin"}]
        assert len(private) >= 4 and not ({_sha(p) for p in private} & coord_hashes)
        # 3. no stored shard image equals a real training image (within 8-bit rounding)
        stored = sorted((demo / "provision" / "coordinator" / "state" / "store").rglob("shard.tar"))
        assert len(stored) == 2
        imgs = np.stack([decode_png(png) for tar in stored for _, png, _ in iter_samples([tar])])
        real = train.images.reshape(len(train), -1)
        d = ((imgs.reshape(len(imgs), -1)[:, None, :] - real[None]) ** 2).mean(-1)
        assert d.min() > (1 / 127.5) ** 2, f"a shard image equals a real training image of {site}"
