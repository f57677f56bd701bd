"""The coordinator's student: trained on re-verified accepted shards only, evaluated on a public reference
set, and released (with a model card and file hashes) only when the release policy passes."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from coordinator.release import ReleaseRefused, check_policy, release
from coordinator.student import (
    EVAL_STAGE,
    TRAIN_STAGE,
    ShardRef,
    evaluate_student,
    load_accepted,
    parse_training_config,
    stage_state,
    train_student,
)
from privdistill.data.types import ImageSet
from privdistill.errors import ConfigError, PrivacyPolicyError, ShardVerificationError, StageError
from privdistill.identity import generate_key
from privdistill.models import DiffusionModel
from privdistill.sample import ddim_sample
from privdistill.shard import write_shard

RES = 16
NAMES = ["square", "bar"]


def _patterns(kind: str, n: int, rng: np.random.Generator, res: int = RES) -> np.ndarray:
    """Easy-to-classify synthetic images in [-1, 1]: a filled square or a vertical bar, randomly placed."""
    x = np.full((n, 1, res, res), -1.0, np.float32)
    for i in range(n):
        if kind == "square":
            r, c = rng.integers(1, res // 2, 2)
            x[i, 0, r : r + res // 3, c : c + res // 3] = 1.0
        elif kind == "bar":
            c = rng.integers(1, res - 3)
            x[i, 0, 1:-1, c : c + 2] = 1.0
        else:
            x[i, 0] = rng.uniform(-1, 1, (res, res))
    return np.clip(x + rng.normal(0, 0.05, x.shape).astype(np.float32), -1, 1)


def _kept_set(seed: int, per_class: int = 6, res: int = RES) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = np.concatenate([_patterns(k, per_class, rng, res) for k in NAMES])
    labels = np.repeat(np.arange(len(NAMES)), per_class).astype(np.int64)
    return ImageSet(images=images, labels=labels, class_names=list(NAMES))


def _privacy(kept: int, kept_memo: float | None, filter_enabled: bool = True) -> dict:
    p = {"filter_enabled": filter_enabled, "kept": kept, "dropped": 4, "threshold": 0.81,
         "calibration": {"tpr": 0.9, "fpr": 0.02}, "audit": {"planted_recall": {"exact": 1.0, "shift_1px": 0.9}},
         "teacher_memorization_rate": 0.05}
    if kept_memo is not None:
        p["kept_memorization_rate"] = kept_memo
    return p


def _shard(root: Path, site: str, shard_id: str, seed: int, *, kept_memo: float | None = 0.0, res: int = RES,
           data: ImageSet | None = None) -> Path:
    data = data if data is not None else _kept_set(seed, res=res)
    out = root / f"{site}-{shard_id}"
    write_shard(data, out, site_id=site, shard_id=shard_id, config_hash="0" * 64,
                privacy=_privacy(len(data), kept_memo), key=generate_key())
    return out


def _reference(path: Path) -> Path:
    """A 'public' labelled set in MedMNIST npz layout, with its classes in another order plus one extra."""
    rng = np.random.default_rng(99)
    kinds = ["bar", "noise", "square"]
    imgs = np.concatenate([_patterns(k, 20, rng) for k in kinds])
    u8 = np.rint((imgs[:, 0] + 1) * 127.5).astype(np.uint8)
    np.savez(path, train_images=u8, train_labels=np.repeat(np.arange(3), 20))
    return path


def _cfg(ref: Path | None, **release_policy) -> dict:
    cfg = {
        "name": "tiny-student", "seed": 0, "resolution": RES,
        "student": {"model": {"block_out_channels": [16, 32], "norm_num_groups": 8},
                    "train": {"steps": 6, "batch_size": 8, "learning_rate": 1e-3, "warmup_steps": 0,
                              "checkpoint_every": 3, "log_every": 3, "ema_decay": 0.9}},
        "sample": {"per_class": 4, "steps": 3, "batch_size": 8},
        "evaluation": {"classifier_steps": 60, "classifier_batch_size": 32},
        "release": {"min_shards": 2, "min_sites": 2, "max_site_kept_memorization_rate": 0.02, **release_policy},
    }
    if ref is not None:
        cfg["evaluation"]["reference"] = {"description": "synthetic public patterns", "test_fraction": 0.5,
                                          "source": {"type": "npz", "path": str(ref),
                                                     "class_names": ["bar", "noise", "square"]}}
    return cfg


@dataclass(frozen=True)
class FakeAccepted:
    """What the ledger hands out (coordinator.ledger.AcceptedShard), reduced to what the student uses."""

    tar_sha256: str
    site: str
    shard_id: str
    sample_count: int
    dir: Path


def _accepted(dirs: list[Path]) -> list[FakeAccepted]:
    out = []
    for d in dirs:
        m = json.loads((d / "manifest.json").read_text())
        out.append(FakeAccepted(m["tar_sha256"], m["site_id"], m["shard_id"], m["sample_count"], d))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """Two shards from two sites, a public reference set, and a student trained on them (once)."""
    root = tmp_path_factory.mktemp("coord")
    shards = [_shard(root / "store", "site-a", "a1", seed=1, kept_memo=0.0),
              _shard(root / "store", "site-b", "b1", seed=2, kept_memo=0.01)]
    cfg = parse_training_config(_cfg(_reference(root / "reference.npz")))
    refs = [ShardRef(a.dir, a.tar_sha256) for a in _accepted(shards)]
    record = train_student(refs, cfg, root / "work")
    return {"root": root, "shards": shards, "refs": refs, "cfg": cfg, "work": root / "work", "record": record}


@pytest.fixture(scope="module")
def evaluated(trained):
    rec = evaluate_student(trained["refs"], trained["cfg"], trained["work"])
    return {**trained, "report": rec["report"]}


# ----------------------------------------------------------------------------- configuration
def test_config_lists_every_problem(tmp_path: Path) -> None:
    raw = _cfg(tmp_path / "missing.npz")
    raw["student"]["model"]["block_out_channels"] = [16, 32, 32, 32]  # downsamples by 8: 12 is not divisible
    raw["resolution"] = 12
    with pytest.raises(ConfigError) as err:
        parse_training_config(raw)
    assert len(err.value.problems) == 2
    assert any("path does not exist" in p and "missing.npz" in p for p in err.value.problems)
    assert any("does not divide resolution=12" in p for p in err.value.problems)
    with pytest.raises(ConfigError) as err:
        parse_training_config({"sedd": 1, "release": {"min_sites": 0}})
    assert {p.split(":")[0] for p in err.value.problems} == {"resolution", "sedd", "release.min_sites"}


# ----------------------------------------------------------------------------- reading shards
def test_load_accepted_merges_both_sites(trained) -> None:
    data, manifests = load_accepted(trained["shards"], resolution=RES)
    assert len(data) == 24 and data.images.shape[1:] == (1, RES, RES)
    assert [m.site_id for m in manifests] == ["site-a", "site-b"]
    assert data.class_names == NAMES and np.bincount(data.labels).tolist() == [12, 12]
    assert data.patient_ids is None
    with pytest.raises(StageError, match="no accepted shard yet"):
        load_accepted([])


def test_tampered_tar_is_refused_with_hash_mismatch(trained, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(trained["shards"][0], bad)
    tar = bad / "shard.tar"
    tar.chmod(0o644)
    blob = bytearray(tar.read_bytes())
    blob[700] ^= 0x01  # one byte, same size
    tar.write_bytes(bytes(blob))
    with pytest.raises(ShardVerificationError) as err:
        load_accepted([trained["shards"][1], bad], resolution=RES)
    assert err.value.reason == "hash_mismatch"
    assert "site-a/a1" in str(err.value)


def test_store_entry_not_the_one_the_ledger_accepted_is_refused(trained) -> None:
    a, b = trained["shards"]
    b_hash = json.loads((b / "manifest.json").read_text())["tar_sha256"]
    with pytest.raises(ShardVerificationError) as err:
        load_accepted([ShardRef(a, tar_sha256=b_hash)])
    assert err.value.reason == "hash_mismatch"
    with pytest.raises(ShardVerificationError) as err:
        load_accepted([ShardRef(a, manifest_sha256="0" * 64)])
    assert err.value.reason == "hash_mismatch" and "manifest.json differs" in str(err.value)


def test_different_resolutions_are_refused(trained, tmp_path: Path) -> None:
    small = _shard(tmp_path, "site-c", "c1", seed=3, res=8)
    with pytest.raises(ShardVerificationError) as err:
        load_accepted([trained["shards"][0], small])
    assert err.value.reason == "resolution_mismatch"
    with pytest.raises(ShardVerificationError) as err:
        load_accepted([small], resolution=RES)
    assert err.value.reason == "resolution_mismatch" and "resolution=16" in str(err.value)


def test_mixed_conditioning_is_refused(trained, tmp_path: Path) -> None:
    kept = _kept_set(4)
    kept.prompts = [f"a {NAMES[i]}" for i in kept.labels]
    text = tmp_path / "text"
    write_shard(kept, text, site_id="site-c", shard_id="t1", config_hash="0" * 64, privacy=_privacy(12, 0.0),
                key=generate_key(), vocabulary=["a", *NAMES])
    with pytest.raises(ShardVerificationError) as err:
        load_accepted([trained["shards"][0], text])
    assert err.value.reason == "mixed_conditioning"


# ----------------------------------------------------------------------------- training
def test_train_student_saves_a_loadable_model_and_lists_both_shards(trained) -> None:
    tdir = trained["work"] / TRAIN_STAGE
    training = json.loads((tdir / "training.json").read_text())
    expected = {(a.tar_sha256, a.site, a.shard_id, a.sample_count) for a in _accepted(trained["shards"])}
    assert {(s["tar_sha256"], s["site"], s["shard_id"], s["sample_count"]) for s in training["shards"]} == expected
    assert training["sites"] == ["site-a", "site-b"] and training["n_samples"] == 24
    assert training["train"]["steps"] == 6 and len(training["train"]["loss_curve"]) == 2
    assert training["shards"][1]["privacy"]["kept_memorization_rate"] == 0.01
    model = DiffusionModel.load(tdir / "model")
    assert model.class_names == NAMES and model.resolution == RES
    assert not (trained["work"] / ".checkpoints" / TRAIN_STAGE).exists()  # removed once finished


def test_rerun_without_new_shard_is_a_noop_and_a_new_shard_retrains(trained, tmp_path: Path) -> None:
    again = train_student(trained["refs"], trained["cfg"], trained["work"])
    assert again["finished_at"] == trained["record"]["finished_at"]
    assert again["fingerprint"] == trained["record"]["fingerprint"]
    work = tmp_path / "work"
    shutil.copytree(trained["work"], work)
    third = _shard(tmp_path, "site-c", "c1", seed=5)
    rec = train_student([*trained["refs"], third], trained["cfg"], work)
    assert rec["fingerprint"] != trained["record"]["fingerprint"]
    assert rec["report"]["n_shards"] == 3 and rec["report"]["n_samples"] == 36


# ----------------------------------------------------------------------------- evaluation
def test_evaluation_report(evaluated) -> None:
    r = evaluated["report"]
    assert r["student"]["n_samples"] == 8
    assert r["reference"]["class_names"] == NAMES and r["reference"]["excluded_classes"] == ["noise"]
    assert r["reference"]["n_train"] + r["reference"]["n_test"] == 40
    # the classes are matched by name although the reference lists them in another order
    assert r["reference"]["trtr_accuracy"] >= 0.9
    assert r["shards_tstr_accuracy"] >= 0.8
    assert 0.0 <= r["tstr_accuracy"] <= 1.0 and np.isfinite(r["fid_domain"])
    assert "public reference set's train part" in r["fid_feature_classifier"]
    assert r["privacy"]["measured_at_coordinator"] is False and "no real patient data" in r["privacy"]["note"]
    assert [(s["site"], s["kept_memorization_rate"]) for s in r["privacy"]["sites"]] == [("site-a", 0.0),
                                                                                          ("site-b", 0.01)]
    assert (evaluated["work"] / EVAL_STAGE / "samples_grid.png").stat().st_size > 100


# ----------------------------------------------------------------------------- release
def test_release_refused_until_evaluated(trained, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(trained["work"], work)
    shutil.rmtree(work / EVAL_STAGE, ignore_errors=True)
    with pytest.raises(ReleaseRefused) as err:
        release(work, tmp_path / "out", trained["cfg"], shards=trained["refs"])
    assert err.value.failures == ["evaluate: has not run; run `privdistill-coordinator evaluate` first"]
    assert isinstance(err.value, PrivacyPolicyError) and err.value.exit_code == 4
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_release_refuses_every_failing_policy_criterion(evaluated, tmp_path: Path) -> None:
    strict = parse_training_config(_cfg(evaluated["root"] / "reference.npz", min_shards=3, min_sites=3,
                                        max_site_kept_memorization_rate=0.0))
    with pytest.raises(ReleaseRefused) as err:
        release(evaluated["work"], tmp_path / "out", strict, shards=evaluated["refs"])
    f = err.value.failures
    assert len(f) == 3
    assert f[0].startswith("min_shards: the student was trained on 2 shard(s)")
    assert f[1].startswith("min_sites: the student was trained on shards of 2 site(s)")
    assert f[2].startswith("max_site_kept_memorization_rate: shard site-b/b1") and "0.0100 > 0.0" in f[2]


def test_policy_needs_reported_numbers_and_an_enabled_filter() -> None:
    from coordinator.release import ReleasePolicy

    training = {"shards": [{"site": "s", "shard_id": "x", "tar_sha256": "ab" * 32,
                            "privacy_report": {"filter_enabled": False}}]}
    f = check_policy(training, ReleasePolicy())
    assert len(f) == 2
    assert f[0].startswith("require_filter:") and "filter disabled" in f[0]
    assert f[1].startswith("max_site_kept_memorization_rate:") and "reports no kept-set memorization rate" in f[1]


def test_release_refused_when_a_new_shard_was_accepted_since_training(evaluated, tmp_path: Path) -> None:
    extra = _shard(tmp_path, "site-c", "c1", seed=6)
    with pytest.raises(ReleaseRefused) as err:
        release(evaluated["work"], tmp_path / "out", evaluated["cfg"], shards=[*evaluated["refs"], extra])
    assert any(x.startswith("train-student: is stale") for x in err.value.failures)
    assert stage_state([*evaluated["refs"], extra], evaluated["cfg"], evaluated["work"])[TRAIN_STAGE] == "stale"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_release_writes_model_card_hashes_and_a_loadable_model(evaluated, tmp_path: Path) -> None:
    out = tmp_path / "releases"
    path = release(evaluated["work"], out, evaluated["cfg"], shards=evaluated["refs"])
    assert path == out / "tiny-student-v1"
    card = (path / "MODEL_CARD.md").read_text()
    for a in _accepted(evaluated["shards"]):
        assert a.site in card and a.tar_sha256 in card
    assert "Not for diagnosis" in card and "no real image" in card
    rec = json.loads((path / "release.json").read_text())
    files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert set(rec["files"]) == files - {"release.json", "SHA256SUMS"}
    assert all(_sha(path / name) == digest for name, digest in rec["files"].items())
    sums = dict(reversed(line.split("  ", 1)) for line in (path / "SHA256SUMS").read_text().splitlines())
    assert sums["release.json"] == _sha(path / "release.json") and set(sums) == files - {"SHA256SUMS"}
    assert [s["site"] for s in rec["training_data"]["shards"]] == ["site-a", "site-b"]
    assert rec["evaluation"]["privacy"]["measured_at_coordinator"] is False

    model = DiffusionModel.load(path)
    imgs = ddim_sample(model, labels=np.array([0, 1, 1]), steps=2, progress=False)
    assert imgs.shape == (3, 1, RES, RES) and np.isfinite(imgs).all()

    v1 = {name: _sha(path / name) for name in rec["files"]}
    (out / "tiny-student-v3").mkdir()  # someone's directory: never overwritten, numbering goes on
    second = release(evaluated["work"], out, evaluated["cfg"], shards=evaluated["refs"])
    assert second == out / "tiny-student-v4" and json.loads((second / "release.json").read_text())["version"] == 4
    assert {name: _sha(path / name) for name in rec["files"]} == v1
    assert not list(out.glob(".*"))  # no temporary directory left behind


# ----------------------------------------------------------------------------- command line (real ledger)
def _accept_into_ledger(state: Path, shard: Path) -> None:
    from coordinator.ledger import Ledger
    from coordinator.store import install
    from privdistill.identity import public_key_b64

    ledger = Ledger(state / "ledger.sqlite")
    body = (shard / "manifest.json").read_bytes()
    m = json.loads(body)
    if ledger.site(m["site_id"]) is None:
        ledger.add_site(m["site_id"], public_key_b64(generate_key()))
    upload_id = hashlib.sha256(body).hexdigest()[:32]
    sig = (shard / "manifest.sig").read_text()
    ledger.create_upload(upload_id, m["site_id"], m["tar_sha256"], m["tar_size"], body.decode(), sig)
    install(state, m["tar_sha256"], shard / "shard.tar", body, sig)
    assert ledger.accept(upload_id, shard_id=m["shard_id"], sample_count=m["sample_count"],
                         manifest_sha256=hashlib.sha256(body).hexdigest())


def test_cli_train_evaluate_release_from_the_ledger(trained, tmp_path: Path, capsys) -> None:
    import yaml

    from coordinator.cli import main

    state = tmp_path / "state"
    for shard in trained["shards"]:
        _accept_into_ledger(state, shard)
    coord = tmp_path / "coordinator.yaml"
    coord.write_text(yaml.safe_dump({"tls": {"cert": "server.pem", "key": "server.key"}, "state_dir": "state"}))
    training = tmp_path / "training.yaml"
    training.write_text(yaml.safe_dump(_cfg(trained["root"] / "reference.npz")))
    common = ["--config", str(coord), "--training", str(training), "--workdir", str(tmp_path / "work")]

    assert main(["train-student", *common]) == 0
    assert "trained on 2 shard(s), 24 samples" in capsys.readouterr().out
    assert main(["train-student", *common]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["release", *common, "--out", str(tmp_path / "rel")]) == 4  # not evaluated yet
    assert "evaluate: has not run" in capsys.readouterr().err
    assert main(["evaluate", *common]) == 0
    assert "release policy: passes" in capsys.readouterr().out
    assert main(["release", *common, "--out", str(tmp_path / "rel")]) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert path == tmp_path / "rel" / "tiny-student-v1" and (path / "MODEL_CARD.md").is_file()
    events = [json.loads(line) for line in (state / "audit.log").read_text().splitlines()]
    released = [e for e in events if e["event"] == "released"]
    assert len(released) == 1 and released[0]["version"] == 1 and released[0]["sites"] == ["site-a", "site-b"]

    bad = next((state / "store").rglob("shard.tar"))  # tamper with the store after acceptance
    bad.chmod(0o644)
    blob = bytearray(bad.read_bytes())
    blob[700] ^= 0x01
    bad.write_bytes(bytes(blob))
    assert main(["train-student", *common, "--force"]) == 5
    assert "failed re-verification on read: shard sha256 differs from the manifest" in capsys.readouterr().err
