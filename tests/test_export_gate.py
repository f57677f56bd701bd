"""The export gate lets exactly one kind of thing leave a site: a shard this work directory packaged
from its current filter output, unchanged since, within the vocabulary, passing the policy and
approved. Everything else is refused with a reason and an audit record."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from _fixtures import FMNIST, fashion, with_visits

from privdistill import identity
from privdistill.data.types import ImageSet
from privdistill.errors import PrivacyPolicyError, ShardVerificationError
from privdistill.shard import MANIFEST, SHARD_TAR, SIGNATURE, Manifest, prompt_vocabulary, sha256_path, write_shard
from privdistill.stages import STAGE_FILE, Stage, StageContext, run_stage, sha256_file
from privdistill.workdir import KEPT_FILE
from site_agent.audit_log import read_audit
from site_agent.config import SiteConfig, load_site_config
from site_agent.gate import ExportRefused, check_export
from site_agent.package import build_package_stage
from site_agent.records import stage_record_key
from site_agent.state import SiteState, workdir_id

pytestmark = pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST not installed")

CLASSES = ["Trouser", "Sneaker", "Bag"]
TEMPLATE = "an image of a {label}"


# ----------------------------------------------------------------------------- a tiny site, no training
def build_reid(out: Path) -> Path:
    """An untrained, tiny re-id network saved and exported exactly as the train-reid stage does."""
    from privdistill.config import ReidConfig
    from privdistill.reid import ReidModel, ReidNet, export_onnx, save_reid

    cfg = ReidConfig(embedding_dim=8, width=4)
    model = ReidModel(net=ReidNet("convnet", 1, 8, 4).eval(), cfg=cfg, threshold=0.9,
                      calibration={"threshold": 0.9, "tpr": 0.95, "fpr": 0.01, "auc": 0.99}, resolution=28)
    save_reid(model, out / "reid")
    export_onnx(model, out / "reid.onnx")
    return out


@dataclass
class Site:
    root: Path
    config_path: Path
    workdir: Path
    cfg: SiteConfig
    key: Any
    train: ImageSet

    def package(self) -> dict[str, Any]:
        return run_stage(build_package_stage(self.cfg, self.workdir, key=self.key), self.workdir,
                         record_key=stage_record_key(self.key))["report"]


def _stage(workdir: Path, name: str, files: dict[str, Any], *, force: bool = False, key: Any = None) -> None:
    """A stage run by the site agent: its record is authenticated with the site key (make_site's root/site.key)."""
    key = key or identity.load_private_key(workdir.parent / "site.key")

    def body(ctx: StageContext) -> dict:
        for rel, content in files.items():
            dest = ctx.out / rel
            if isinstance(content, ImageSet):
                content.save(dest)
            elif isinstance(content, Path):
                (shutil.copytree if content.is_dir() else shutil.copyfile)(content, dest)
            else:
                dest.write_text(json.dumps(content))
        return {}
    run_stage(Stage(name, body, (), {"test": name}), workdir, force=force, record_key=stage_record_key(key))


def filter_report(kept: int, n: int, *, enabled: bool = True, recall: float = 1.0) -> dict[str, Any]:
    return {
        "filter_enabled": enabled, "n_synthetic": n, "kept": kept, "dropped": n - kept,
        "dropped_by_reason": {"reid": n - kept, "pixel": 0, "both": 0}, "threshold": 0.9,
        "calibration": {"tpr": 0.95, "fpr": 0.01, "auc": 0.99, "n_pos": 40, "n_neg": 400},
        "audit": {"planted_recall": {"exact": 1.0, "shift_1px": 1.0, "noise_0.1": recall, "contrast_0.9": 1.0},
                  "planted_per_kind": 20, "heldout_real_dropped_rate": 0.25, "heldout_real_n": 30},
    }


def make_site(root: Path, reid_src: Path, *, approval: str = "manual", prompts: list[str] | None = None,
              copy_in_kept: bool = False, name: str = "gate-test", extra: dict | None = None) -> Site:
    """Config + key + CA file + ingest/train-reid/sample/filter stage records over real Fashion-MNIST
    training images (with patient ids) and synthetic stand-ins (fresh test-split images)."""
    root.mkdir(parents=True, exist_ok=True)
    key = identity.generate_key()
    identity.save_private_key(key, root / "site.key")
    (root / "ca.pem").write_text("placeholder CA (not used without a network)\n")
    raw = {
        "name": name, "seed": 0,
        "data": {"source": {"type": "idx", "images": str(FMNIST / "train-images-idx3-ubyte.gz"),
                            "labels": str(FMNIST / "train-labels-idx1-ubyte.gz"), "class_names": CLASSES},
                 "resolution": 28, "prompt_template": TEMPLATE},
        "evaluate": {"classifier_steps": 5, "classifier_batch_size": 16},
        "sample": {"per_class": 2, "steps": 2, "batch_size": 8},
        "site": {"id": "site-a", "coordinator_url": "https://127.0.0.1:9", "ca_file": "ca.pem",
                 "key_file": "site.key", "approval": approval, **(extra or {})},
    }
    config_path = root / "site.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    cfg = load_site_config(config_path)

    train = with_visits(fashion("train", 0, 12), 2, seed=0)
    train = ImageSet(train.images, labels=np.arange(len(train)) // 2 % 3, patient_ids=train.patient_ids,
                     class_names=CLASSES)
    test = ImageSet(fashion("t10k", 100, 9), labels=np.arange(9) % 3, class_names=CLASSES)
    n = 12
    samples = ImageSet(fashion("t10k", 0, n), labels=np.arange(n) % 3, class_names=CLASSES,
                       prompts=prompts or [f"an image of a {CLASSES[i % 3]}" for i in range(n)])
    kept = samples.subset(np.arange(0, n, 2)[:5])
    if copy_in_kept:  # a training image the filter should have dropped
        kept.images[0] = train.images[0]
    workdir = root / "work"
    _stage(workdir, "ingest", {"train.npz": train, "test.npz": test})
    _stage(workdir, "train-reid", {"reid": reid_src / "reid", "reid.onnx": reid_src / "reid.onnx"})
    _stage(workdir, "sample", {"samples.npz": samples})
    _stage(workdir, "filter", {KEPT_FILE: kept, "privacy_report.json": filter_report(len(kept), n)})
    return Site(root, config_path, workdir, cfg, key, train)


def approved_shard(site: Site) -> str:
    sid = site.package()["shard_id"]
    SiteState(site.workdir).approve(sid, by="steward")
    return sid


def refusals(site: Site) -> list[dict[str, Any]]:
    return [r for r in read_audit(site.workdir) if r["event"] == "export_refused"]


def assert_refused(site: Site, ref: Any, err_type: type, reason: str, match: str | None = None) -> None:
    before = len(refusals(site))
    with pytest.raises(err_type, match=match) as exc:
        check_export(site.workdir, ref, site.cfg)
    assert exc.value.reason == reason, str(exc.value)
    after = refusals(site)
    assert len(after) == before + 1 and after[-1]["reason"] == reason
    assert str(site.root) not in json.dumps(after[-1]), "audit records never carry local paths"


def rewrite_tar(shard_dir: Path, change: Any) -> None:
    """Rebuild shard.tar with ``change(name, bytes) -> bytes`` applied to each member."""
    members = []
    with tarfile.open(shard_dir / SHARD_TAR) as tar:
        for info in tar:
            members.append((info.name, change(info.name, tar.extractfile(info).read())))
    with tarfile.open(shard_dir / SHARD_TAR, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def flip_png_byte(name: str, data: bytes) -> bytes:
    if name.endswith("_000000.png"):
        return data[:-20] + bytes([data[-20] ^ 1]) + data[-19:]
    return data


def change_one_pixel(name: str, data: bytes) -> bytes:
    """A still-valid PNG with one pixel changed (what a substituted image looks like)."""
    from PIL import Image

    if not name.endswith("_000000.png"):
        return data
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im).copy()
    arr[0, 0] ^= 1
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def resign(shard_dir: Path, key: Any, **changes: Any) -> None:
    """What an insider with the site key would do: recompute hashes, edit, re-sign."""
    import hashlib

    m = Manifest.model_validate_json((shard_dir / MANIFEST).read_bytes())
    members = {}
    with tarfile.open(shard_dir / SHARD_TAR) as tar:
        for info in tar:
            members[info.name] = hashlib.sha256(tar.extractfile(info).read()).hexdigest()
    body = m.model_copy(update={"members": members, "tar_sha256": sha256_path(shard_dir / SHARD_TAR),
                                "tar_size": (shard_dir / SHARD_TAR).stat().st_size, **changes}).to_bytes()
    (shard_dir / MANIFEST).write_bytes(body)
    (shard_dir / SIGNATURE).write_text(identity.sign(key, body) + "\n")


def force_db(site: Site, sql: str, *args: Any) -> None:
    with sqlite3.connect(site.workdir / "site_state.sqlite") as db:
        db.execute(sql, args)


# ----------------------------------------------------------------------------- the one thing that passes
def test_packaging_computes_aggregate_privacy_numbers_and_registers_the_shard(site: Site) -> None:
    report = site.package()
    sid = report["shard_id"]
    pv = report["privacy"]
    assert sid.startswith("site-a-") and len(sid) == len("site-a-") + 12
    assert report["state"] == "packaged" and report["policy"]["passed"] is True
    assert pv["kept"] == 5 and pv["n_synthetic"] == 12 and pv["threshold"] == 0.9
    assert pv["kept_memorization_rate"] == 0.0 and pv["teacher_memorization_rate"] == 0.0
    assert pv["kept_memorization_undecidable"] == 0 and pv["kept_memorization_ci"][0] == 0.0
    assert 0.0 <= pv["teacher_reid_rate"] <= 1.0 and pv["audit"]["planted_recall"]["exact"] == 1.0
    row = SiteState(site.workdir).require(sid)
    assert row.state == "packaged" and row.sample_count == 5
    assert row.kept_sha256 == sha256_file(site.workdir / "filter" / KEPT_FILE)
    assert row.workdir_id == workdir_id(site.workdir)
    manifest = json.loads((site.workdir / "shards" / sid / MANIFEST).read_text())
    assert manifest["privacy"]["policy"] == {"passed": True, "failed": []}
    assert row.workdir_id not in json.dumps(manifest) and row.kept_sha256 not in json.dumps(manifest)
    assert [r["event"] for r in read_audit(site.workdir)] == ["packaged"]
    # unchanged inputs: the stage is skipped and the same shard kept
    assert site.package()["shard_id"] == sid and len(SiteState(site.workdir).list()) == 1


def test_an_approved_shard_passes(site: Site) -> None:
    sid = approved_shard(site)
    manifest = check_export(site.workdir, sid, site.cfg)
    assert manifest.shard_id == sid and manifest.sample_count == 5
    assert check_export(site.workdir, site.workdir / "shards" / sid, site.cfg).tar_sha256 == manifest.tar_sha256
    assert refusals(site) == []


def test_auto_approval_when_the_policy_passes(tmp_path: Path, reid_src: Path) -> None:
    s = make_site(tmp_path / "s", reid_src, approval="auto")
    sid = s.package()["shard_id"]
    assert SiteState(s.workdir).require(sid).approved_by == "auto-policy"
    assert check_export(s.workdir, sid, s.cfg).shard_id == sid
    # the same shard under a config that now wants a person to approve
    manual = s.cfg.model_copy(update={"site": s.cfg.site.model_copy(update={"approval": "manual"})})
    with pytest.raises(ExportRefused, match="requires manual approval"):
        check_export(s.workdir, sid, manual)


# ----------------------------------------------------------------------------- what never leaves
@pytest.mark.parametrize("what", ["ingest", "ingest/train.npz", "train-teacher/model", "train-reid/reid",
                                  "train-reid/reid.onnx", "real-pngs"])
def test_refuses_real_data_and_models(site: Site, what: str) -> None:
    approved_shard(site)
    target = site.workdir / what
    if what == "real-pngs":
        from PIL import Image

        target = site.root / "real-pngs"
        target.mkdir()
        for i, img in enumerate(site.train.images[:4]):
            Image.fromarray(((img[0] + 1) * 127.5).astype(np.uint8)).save(target / f"{i}.png")
    if what == "train-teacher/model":
        target.mkdir(parents=True)
    assert_refused(site, target, ExportRefused, "outside_shard_store", "never leave the site")


def test_refuses_a_folder_of_real_images_dropped_into_the_shard_store(site: Site) -> None:
    approved_shard(site)
    fake = site.workdir / "shards" / "site-a-real"
    fake.mkdir()
    site.train.save(fake / "train.npz")
    assert_refused(site, fake, ExportRefused, "unregistered_shard")
    assert_refused(site, "site-a-real", ExportRefused, "unregistered_shard")


def test_refuses_real_images_swapped_into_an_approved_shard_folder(site: Site) -> None:
    sid = approved_shard(site)
    d = site.workdir / "shards" / sid
    (d / "train.npz").write_bytes((site.workdir / "ingest" / "train.npz").read_bytes())
    assert_refused(site, sid, ShardVerificationError, "unexpected_files")


def test_refuses_a_png_byte_changed_after_approval(site: Site) -> None:
    sid = approved_shard(site)
    rewrite_tar(site.workdir / "shards" / sid, flip_png_byte)
    assert_refused(site, sid, ShardVerificationError, "hash_mismatch")


def test_refuses_a_png_byte_changed_and_the_manifest_re_signed_with_the_site_key(site: Site) -> None:
    sid = approved_shard(site)
    d = site.workdir / "shards" / sid
    rewrite_tar(d, change_one_pixel)
    resign(d, site.key)
    assert_refused(site, sid, ShardVerificationError, "manifest_changed")
    # ... and an insider who also updates the register's manifest hash meets the content check
    force_db(site, "UPDATE shards SET manifest_sha256 = ? WHERE shard_id = ?", sha256_path(d / MANIFEST), sid)
    assert_refused(site, sid, ShardVerificationError, "content_mismatch")


def test_refuses_a_manifest_edited_after_approval(site: Site) -> None:
    sid = approved_shard(site)
    d = site.workdir / "shards" / sid
    m = json.loads((d / MANIFEST).read_text())
    m["privacy"]["kept_memorization_rate"] = 0.0
    m["privacy"]["note"] = "edited"
    (d / MANIFEST).write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    assert_refused(site, sid, ShardVerificationError, "bad_manifest_signature")
    resign(d, site.key)
    assert_refused(site, sid, ShardVerificationError, "manifest_changed")


def test_refuses_a_shard_from_another_work_directory(tmp_path: Path, reid_src: Path) -> None:
    a = make_site(tmp_path / "a", reid_src)
    b = make_site(tmp_path / "b", reid_src, name="other-run")
    sid_b = approved_shard(b)
    assert approved_shard(a) != sid_b
    # copied into a's store: a never registered it
    copied = a.workdir / "shards" / sid_b
    shutil.copytree(b.workdir / "shards" / sid_b, copied)
    assert_refused(a, sid_b, ExportRefused, "unregistered_shard")
    # its register row copied too: provenance (work directory id, filter record) differs
    row = SiteState(b.workdir).require(sid_b)
    SiteState(a.workdir).register(
        shard_id=sid_b, site_id="site-a", dir=copied, state="approved", policy=row.policy,
        manifest_sha256=row.manifest_sha256, tar_sha256=row.tar_sha256, sample_count=row.sample_count,
        filter_record_sha256=row.filter_record_sha256, kept_sha256=row.kept_sha256, workdir_id=row.workdir_id)
    assert_refused(a, sid_b, ExportRefused, "foreign_workdir")
    # and a's register pointing at b's shard folder
    force_db(a, "UPDATE shards SET dir = ? WHERE shard_id = ?", str(b.workdir / "shards" / sid_b), sid_b)
    assert_refused(a, sid_b, ExportRefused, "registered_path_mismatch")
    assert_refused(a, b.workdir / "shards" / sid_b, ExportRefused, "outside_shard_store")


def test_refuses_a_shard_packaged_before_the_filter_re_ran(site: Site) -> None:
    sid = approved_shard(site)
    kept = ImageSet.load(site.workdir / "filter" / KEPT_FILE)
    _stage(site.workdir, "filter", {KEPT_FILE: kept.subset([0, 1]), "privacy_report.json": filter_report(2, 12)},
           force=True)
    assert_refused(site, sid, ExportRefused, "stale_filter")


def test_refuses_prompts_outside_the_vocabulary(tmp_path: Path, reid_src: Path) -> None:
    leak = "an image of a Bag patient john smith reports pain"
    prompts = [leak if i == 2 else f"an image of a {CLASSES[i % 3]}" for i in range(12)]
    s = make_site(tmp_path / "s", reid_src, prompts=prompts)
    with pytest.raises(PrivacyPolicyError, match="5 word.s. outside the allow-listed vocabulary"):
        s.package()
    assert not (s.workdir / "shards").exists() or not any((s.workdir / "shards").iterdir())
    # an insider writes the shard with a widened vocabulary and registers it as approved
    kept = ImageSet.load(s.workdir / "filter" / KEPT_FILE)
    sid = "site-a-0123456789ab"
    out = s.workdir / "shards" / sid
    vocab = prompt_vocabulary(TEMPLATE, CLASSES, ["patient", "john", "smith", "reports", "pain"])
    m = write_shard(kept, out, site_id="site-a", shard_id=sid, config_hash="ab" * 32,
                    privacy=filter_report(5, 12) | {"kept_memorization_rate": 0.0}, key=s.key, vocabulary=vocab)
    SiteState(s.workdir).register(
        shard_id=sid, site_id="site-a", dir=out, state="approved", policy={"passed": True, "failed": []},
        manifest_sha256=sha256_path(out / MANIFEST), tar_sha256=m.tar_sha256, sample_count=m.sample_count,
        filter_record_sha256=sha256_file(s.workdir / "filter" / STAGE_FILE),
        kept_sha256=sha256_file(s.workdir / "filter" / KEPT_FILE), workdir_id=workdir_id(s.workdir, create=True))
    assert_refused(s, sid, ShardVerificationError, "prompt_outside_vocabulary")
    assert "john" not in (s.workdir / "audit.log").read_text()


def test_refuses_unapproved_and_rejected_shards(site: Site) -> None:
    sid = site.package()["shard_id"]
    assert_refused(site, sid, ExportRefused, "not_approved", "privdistill-site approve")
    SiteState(site.workdir).reject(sid, reason="grid shows a recognisable case", by="steward")
    assert_refused(site, sid, ExportRefused, "rejected_shard")
    with pytest.raises(PrivacyPolicyError):
        SiteState(site.workdir).approve(sid, by="steward")


def test_a_policy_failing_shard_is_never_exported_even_forced_approved(tmp_path: Path, reid_src: Path) -> None:
    s = make_site(tmp_path / "s", reid_src, copy_in_kept=True, approval="auto")
    report = s.package()
    sid = report["shard_id"]
    assert report["policy"]["passed"] is False and report["policy"]["failed"] == ["max_kept_memorization_rate"]
    assert report["privacy"]["kept_memorization_rate"] == pytest.approx(0.2)
    assert SiteState(s.workdir).require(sid).state == "packaged"  # auto-approval needs a passing policy
    with pytest.raises(PrivacyPolicyError, match="can never be approved"):
        SiteState(s.workdir).approve(sid, by="steward")
    assert_refused(s, sid, ExportRefused, "policy_failed")
    force_db(s, "UPDATE shards SET state = 'approved', approved_by = 'x', policy_passed = 1, "
                "policy_json = '{\"passed\": true, \"failed\": []}' WHERE shard_id = ?", sid)
    assert_refused(s, sid, ExportRefused, "policy_failed")  # re-evaluated from the signed manifest


def test_refuses_a_shard_whose_signature_is_not_this_sites_key(site: Site) -> None:
    sid = approved_shard(site)
    other = identity.generate_key()
    identity.save_private_key(other, site.cfg.site.key_file)
    assert_refused(site, sid, ShardVerificationError, "bad_manifest_signature")


def test_undecidable_kept_samples_count_as_memorized_at_the_gate() -> None:
    """The memorization metric may be unable to decide a sample (its nearest image and the nearest other
    patient's are both ~0 away, e.g. patients sharing an image): the gate never lets one through."""
    from site_agent.config import PolicyConfig
    from site_agent.package import evaluate_policy

    privacy = {"filter_enabled": True, "kept": 5, "n_synthetic": 12, "kept_memorization_rate": 0.0,
               "audit": {"planted_recall": {"exact": 1.0}}}
    assert "max_kept_memorization_rate" not in evaluate_policy(privacy, PolicyConfig())["failed"]
    res = evaluate_policy(privacy | {"kept_memorization_undecidable": 1}, PolicyConfig())
    assert "max_kept_memorization_rate" in res["failed"]
    crit = next(c for c in res["criteria"] if c["name"] == "max_kept_memorization_rate")
    assert crit["value"] == pytest.approx(1 / 5)


# ----------------------------------------------------------------------------- prompts in any script
def _craft_registered_shard(s: Site, kept: ImageSet, sid: str) -> Path:
    """An insider's shard that skipped the packager's checks: canonical tar, manifest signed with the site key,
    registered as approved with this work directory's provenance."""
    from privdistill.shard import Conditioning, sample_members, sha256_bytes
    from privdistill.shard_content import write_canonical_tar

    out = s.workdir / "shards" / sid
    out.mkdir(parents=True)
    members = sample_members(kept, sid)
    with open(out / SHARD_TAR, "wb") as fh:
        write_canonical_tar(members, fh)
    m = Manifest(site_id="site-a", shard_id=sid, created="2025-01-01T00:00:00+00:00", software_version="x",
                 config_hash="ab" * 32, sample_count=len(kept), tar_sha256=sha256_path(out / SHARD_TAR),
                 tar_size=(out / SHARD_TAR).stat().st_size, resolution=28, channels=1,
                 members={n: sha256_bytes(d) for n, d in members},
                 conditioning=Conditioning(type="text", class_names=CLASSES,
                                           vocabulary=prompt_vocabulary(TEMPLATE, CLASSES)),
                 privacy=filter_report(len(kept), 12) | {"kept_memorization_rate": 0.0})
    body = m.to_bytes()
    (out / MANIFEST).write_bytes(body)
    (out / SIGNATURE).write_text(identity.sign(s.key, body) + "\n")
    SiteState(s.workdir).register(
        shard_id=sid, site_id="site-a", dir=out, state="approved", policy={"passed": True, "failed": []},
        manifest_sha256=sha256_path(out / MANIFEST), tar_sha256=m.tar_sha256, sample_count=m.sample_count,
        filter_record_sha256=sha256_file(s.workdir / "filter" / STAGE_FILE),
        kept_sha256=sha256_file(s.workdir / "filter" / KEPT_FILE), workdir_id=workdir_id(s.workdir, create=True))
    return out


def test_prompts_in_other_scripts_and_forms_are_refused_at_packaging_and_at_the_gate(site: Site) -> None:
    from test_coordinator_content import LEAKS

    kept = ImageSet.load(site.workdir / "filter" / KEPT_FILE)
    for i, (case, leak) in enumerate(sorted(LEAKS.items())):
        leaked = ImageSet(kept.images, labels=kept.labels, class_names=kept.class_names,
                          prompts=[leak if j == 1 else p for j, p in enumerate(kept.prompts)])
        _stage(site.workdir, "filter", {KEPT_FILE: leaked, "privacy_report.json": filter_report(len(kept), 12)},
               force=True)
        with pytest.raises(PrivacyPolicyError, match="prompt_disallowed_character") as err:
            site.package()
        assert leak not in str(err.value), case
        assert not (site.workdir / "shards").exists() or not any((site.workdir / "shards").iterdir()), case
        # an insider writes and registers the shard anyway: the gate refuses it before anything is sent
        sid = f"site-a-leak{i:02d}"
        _craft_registered_shard(site, leaked, sid)
        assert_refused(site, sid, ShardVerificationError, "prompt_disallowed_character")
        shutil.rmtree(site.workdir / "shards" / sid)
    assert leak not in (site.workdir / "audit.log").read_text()
    assert [r["event"] for r in read_audit(site.workdir)] == ["export_refused"] * len(LEAKS)


def test_a_non_ascii_extra_vocabulary_word_is_a_config_error(tmp_path: Path, reid_src: Path) -> None:
    from privdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="one lowercase ASCII word") as err:
        make_site(tmp_path / "s", reid_src, extra={"vocabulary_extra": ["left", "иванов"]})
    assert "иванов" not in str(err.value)


# ----------------------------------------------------------------------------- authenticated stage records
def _forge_filter(s: Site, kept: ImageSet) -> None:
    """A filter stage written by a process without the site key: a real stage record, hashes right, no MAC."""
    def body(ctx: StageContext) -> dict:
        kept.save(ctx.out / KEPT_FILE)
        (ctx.out / "privacy_report.json").write_text(json.dumps(filter_report(len(kept), 12)))
        return {}
    run_stage(Stage("filter", body, (), {"test": "filter"}), s.workdir, force=True)


def test_a_filter_stage_forged_over_real_images_is_never_packaged(site: Site) -> None:
    real = ImageSet(site.train.images[:5], labels=site.train.labels[:5], class_names=CLASSES,
                    prompts=[f"an image of a {CLASSES[i]}" for i in site.train.labels[:5]])  # patient ids dropped
    kept = ImageSet.load(site.workdir / "filter" / KEPT_FILE)
    _forge_filter(site, real)
    with pytest.raises(PrivacyPolicyError, match="'filter' stage record is not authenticated"):
        site.package()
    assert not (site.workdir / "shards").exists() or not any((site.workdir / "shards").iterdir())
    assert SiteState(site.workdir).list() == [] and read_audit(site.workdir) == []
    # a record copied from a MAC'd stage and edited to point at the real images is refused the same way
    _stage(site.workdir, "filter", {KEPT_FILE: kept, "privacy_report.json": filter_report(5, 12)}, force=True)
    rec = json.loads((site.workdir / "filter" / STAGE_FILE).read_text())
    real.save(site.workdir / "filter" / KEPT_FILE)
    rec["outputs"][KEPT_FILE] = sha256_file(site.workdir / "filter" / KEPT_FILE)
    (site.workdir / "filter" / STAGE_FILE).write_text(json.dumps(rec))
    with pytest.raises(PrivacyPolicyError, match="not authenticated"):
        site.package()
    assert SiteState(site.workdir).list() == []


def test_the_gate_refuses_a_shard_whose_stage_records_are_not_authenticated(site: Site) -> None:
    sid = approved_shard(site)
    # the filter record re-written without its MAC (same content otherwise), the register updated to match
    rec_path = site.workdir / "filter" / STAGE_FILE
    rec = json.loads(rec_path.read_text())
    del rec["record_mac"]
    rec_path.write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
    force_db(site, "UPDATE shards SET filter_record_sha256 = ? WHERE shard_id = ?", sha256_file(rec_path), sid)
    assert_refused(site, sid, ExportRefused, "unauthenticated_stage", "not authenticated")
    # ... and a sample stage forged under an intact filter record (the filter re-run: a new shard)
    _stage(site.workdir, "filter", {KEPT_FILE: ImageSet.load(site.workdir / "filter" / KEPT_FILE),
                                    "privacy_report.json": filter_report(5, 12) | {"run": 2}}, force=True)
    sid2 = approved_shard(site)
    assert sid2 != sid and check_export(site.workdir, sid2, site.cfg).shard_id == sid2
    run_stage(Stage("sample", lambda ctx: site.train.save(ctx.out / "samples.npz") or {}, (), {"test": "sample"}),
              site.workdir, force=True)
    assert_refused(site, sid2, ExportRefused, "unauthenticated_stage", "'sample' stage record")


def test_stage_records_are_macd_with_a_key_derived_from_the_site_key(site: Site) -> None:
    from privdistill.stages import mac_valid

    rec = json.loads((site.workdir / "filter" / STAGE_FILE).read_text())
    assert mac_valid(stage_record_key(site.key), rec)
    assert not mac_valid(stage_record_key(identity.generate_key()), rec)
    assert len(stage_record_key(site.key)) == 32 and stage_record_key(site.key) == stage_record_key(site.key)
    assert not any(p.name.endswith(".key") for p in site.workdir.rglob("*"))  # no key material in the work dir
