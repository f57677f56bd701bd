"""The coordinator's student: its training config, the re-verified accepted shards it reads, and the
train-student / evaluate stages (fingerprinted on the set of shard hashes, so no new shard = no-op)."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import structlog
from pydantic import Field, field_validator

from privdistill.config import DataConfig, DiffusionConfig, ModelConfig, SampleConfig, Source, model_problems
from privdistill.config_loader import ClassList, CrossCheck, Strict, load_model, parse_model
from privdistill.data.types import ImageSet
from privdistill.errors import ShardVerificationError, StageError
from privdistill.privacy_report import RENAMED_REQUIRE_FILTER, PrivacyReport
from privdistill.seeds import derive_seed
from privdistill.shard import (
    MANIFEST,
    SHARD_TAR,
    Manifest,
    iter_samples,
    load_shards,
    parse_manifest,
    sha256_path,
    verify_tar,
)
from privdistill.stages import Stage, StageContext, atomic_write_json, is_current, read_record, run_stage, workdir_lock
from privdistill.workdir import MODEL_DIR, PROMPTS_FILE, SAMPLES_GRID

log = structlog.get_logger(__name__)

TRAIN_STAGE, EVAL_STAGE = "train-student", "evaluate"
TRAINING_FILE, REPORT_FILE = "training.json", "report.json"
GRID_FILE = SAMPLES_GRID
NO_PATIENT_DATA = (
    "The coordinator holds no real patient data, so the student's memorization and re-identification of "
    "real patients are not measured here: each site measures them against its own patients "
    "(`privdistill-site evaluate-student`). The per-site numbers below are the sites' own measurements of "
    "their teacher and of the filtered shard they exported, copied from the signed shard manifests."
)


# ----------------------------------------------------------------------------- configuration
class ReferenceConfig(Strict):
    """A PUBLIC labelled image set the coordinator owns (never patient data), for utility metrics.
    Split like privdistill's DataConfig: ``test_source``, else ``test_fraction`` of its images."""

    description: str = "public reference set"
    source: Source
    test_source: Source | None = None
    test_fraction: float = Field(0.5, gt=0, lt=1)
    classes: ClassList | None = None
    max_per_class: int | None = Field(None, ge=1)
    max_test_per_class: int | None = Field(None, ge=1)


class EvaluationConfig(Strict):
    reference: ReferenceConfig | None = None
    classifier_steps: int = Field(600, ge=1)
    classifier_batch_size: int = Field(128, ge=1)
    memorization_ratio: float = Field(1 / 3, gt=0, lt=1)  # student copies of training-shard images


class ReleasePolicy(Strict):
    min_shards: int = Field(1, ge=1)
    min_sites: int = Field(1, ge=1)
    max_site_kept_memorization_rate: float = Field(0.0, ge=0, le=1)
    require_filter: bool = True
    # the filter's worst per-kind recall on planted copies, from every shard manifest; null = not a criterion
    min_planted_recall: float | None = Field(None, ge=0, le=1)
    # the worst 95% lower bound of the filter's recall over the audited kinds (every shard); null = not a criterion
    min_recall_lower_bound: float | None = Field(None, ge=0, le=1)
    # the filter's measured drop rate of fresh images of new patients (every shard); null = not a criterion
    max_fresh_drop_rate: float | None = Field(None, ge=0, le=1)
    # the teachers' DP-SGD epsilon (manifest privacy.teacher_dp.epsilon); set = every shard's teacher needs DP
    max_epsilon: float | None = Field(None, gt=0)
    # measured by every contributing site against its own patients and sent as a signed attestation
    # (`privdistill-site evaluate-student` -> student-eval/attestation.json + .sig); null = not a criterion
    # max_student_mia_auc is compared with the UPPER end of the attested patient-level 95% interval, and
    # needs min_student_mia_patients member and non-member patients behind it
    max_student_mia_auc: float | None = Field(None, ge=0.5, le=1)
    min_student_mia_patients: int = Field(20, ge=2)
    max_student_memorization_rate: float | None = Field(None, ge=0, le=1)
    # the teachers' DP delta, checked when max_epsilon is set
    max_delta: float = Field(1e-5, gt=0, lt=1)
    # every shard's site ran the fingerprint audit on its config through the student, and it passed
    require_fingerprint_audit: bool = False

    renamed = {"require_filter_enabled": RENAMED_REQUIRE_FILTER}


class FederatedConfig(Strict):
    """Federated mode (Flower FedAvg over the student's UNet weights): each site trains locally on its own
    approved shard for ``local_steps`` per round; ``class_names`` fixes the student's classes (default: those
    of the coordinator's accepted shards)."""

    rounds: int = Field(3, ge=1)
    local_steps: int = Field(50, ge=1)
    min_nodes: int = Field(2, ge=1)
    fraction: float = Field(1.0, gt=0, le=1)
    class_names: list[str] | None = None
    round_timeout_s: float = Field(600, gt=0)


def _student_fits(model: ModelConfig, resolution: int) -> list[str]:
    return model_problems("student", model, resolution, "resolution")


class TrainingConfig(Strict):
    """What the coordinator trains, how it evaluates it and when it may release it."""

    name: str = Field("privdistill-student", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
                      description="1 to 63 letters, digits, '_', '.' and '-', the first a letter or digit")
    seed: int = 0
    resolution: int = Field(ge=8, le=1024)
    channels: Literal[1, 3] = 1
    student: DiffusionConfig = DiffusionConfig()
    sample: SampleConfig = SampleConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    release: ReleasePolicy = ReleasePolicy()
    federated: FederatedConfig = FederatedConfig()
    # the prompt words a text-conditioned shard may use: the coordinator checks every prompt it receives against
    # THIS list (never the one a manifest declares); empty = text-conditioned shards are refused
    vocabulary: list[str] = Field(default_factory=list, max_length=10_000)

    checks: ClassVar[tuple[CrossCheck, ...]] = (CrossCheck(("student.model", "resolution"), _student_fits),)

    @field_validator("vocabulary")
    @classmethod
    def _vocabulary(cls, v: list[str]) -> list[str]:
        from privdistill.prompts import is_vocabulary_word

        bad = [i + 1 for i, w in enumerate(v) if not is_vocabulary_word(w)]
        if bad:
            raise ValueError(f"entries {bad[:10]}: each entry is one lowercase ASCII word (letters/digits)")
        return v

    def reference_data(self) -> DataConfig | None:
        ref = self.evaluation.reference
        if ref is None:
            return None
        return DataConfig(
            source=ref.source, test_source=ref.test_source, test_fraction=ref.test_fraction,
            resolution=self.resolution, channels=self.channels, classes=ref.classes,
            max_per_class=ref.max_per_class, max_test_per_class=ref.max_test_per_class,
        )


def parse_training_config(raw: Any, source: str | None = None, base_dir: Path | None = None) -> TrainingConfig:
    """Validate a mapping; relative reference paths resolve against ``base_dir``; every problem listed."""
    return parse_model(TrainingConfig, raw, source=source, base_dir=base_dir)


def load_training_config(path: str | Path) -> TrainingConfig:
    """Read and validate a training YAML file; its relative paths resolve against the file's folder."""
    return load_model(TrainingConfig, path)


# ----------------------------------------------------------------------------- reading shards
def read_manifest(shard_dir: Path) -> Manifest:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file() or not (Path(shard_dir) / SHARD_TAR).is_file():
        raise ShardVerificationError(f"{shard_dir} has no {MANIFEST} and {SHARD_TAR}: not a stored shard", "not_a_shard")
    return parse_manifest(path.read_bytes())


def _first_png_size(tar: Path) -> tuple[int, int] | None:
    from PIL import Image

    for _, png, _meta in iter_samples([tar]):
        with Image.open(io.BytesIO(png)) as im:
            return im.size
    return None


@dataclass(frozen=True)
class ShardRef:
    """A stored shard and, when the ledger knows them, the hashes it accepted (checked again on read)."""

    dir: Path
    tar_sha256: str | None = None
    manifest_sha256: str | None = None


def as_ref(shard: Path | str | ShardRef) -> ShardRef:
    return shard if isinstance(shard, ShardRef) else ShardRef(Path(shard))


def _verified(ref: ShardRef) -> Manifest:
    d = Path(ref.dir)
    manifest = read_manifest(d)
    where = f"shard {manifest.site_id}/{manifest.shard_id} ({manifest.tar_sha256[:12]}) in {d}"
    if ref.tar_sha256 is not None and manifest.tar_sha256 != ref.tar_sha256:
        raise ShardVerificationError(f"{where}: the ledger accepted tar {ref.tar_sha256[:12]}; the store was altered",
                                     "hash_mismatch")
    if ref.manifest_sha256 is not None and sha256_path(d / MANIFEST) != ref.manifest_sha256:
        raise ShardVerificationError(f"{where}: manifest.json differs from the one the ledger accepted",
                                     "hash_mismatch")
    try:
        verify_tar(d / SHARD_TAR, manifest)
    except ShardVerificationError as err:
        raise ShardVerificationError(f"{where} failed re-verification on read: {err}", err.reason) from None
    return manifest


def load_accepted(
    shards: Sequence[Path | ShardRef], *, resolution: int | None = None, channels: int = 1,
) -> tuple[ImageSet, list[Manifest]]:
    """Re-verify every shard (manifest, tar size, sha256 and members; the ledger's hashes when given) and
    stream them into one ImageSet.

    Shards are read in (site, shard id, hash) order, so the result depends only on the set of shards.
    Refuses (ShardVerificationError) a tampered tar, mixed conditioning types and images whose size is
    not ``resolution`` (or, without it, differs between shards)."""
    if not shards:
        raise StageError("no accepted shard yet: nothing to train the student on (sites must upload first)")
    entries = [(Path(ref.dir), _verified(ref)) for ref in map(as_ref, shards)]
    entries.sort(key=lambda e: (e[1].site_id, e[1].shard_id, e[1].tar_sha256))
    sizes = {}
    for d, m in entries:
        size = _first_png_size(d / SHARD_TAR)
        if size is None:
            raise ShardVerificationError(f"shard {m.site_id}/{m.shard_id} holds no sample", "empty_shard")
        sizes[f"{m.site_id}/{m.shard_id}"] = size
        if resolution is not None and size != (resolution, resolution):
            raise ShardVerificationError(
                f"shard {m.site_id}/{m.shard_id} holds {size[0]}x{size[1]} images but the student is configured for "
                f"resolution={resolution}; set `resolution` in the training config to the sites' resolution",
                "resolution_mismatch")
    if len(set(sizes.values())) > 1:
        raise ShardVerificationError(f"shards hold images of different sizes {sizes}; train them separately",
                                     "resolution_mismatch")
    try:
        data = load_shards([(d / SHARD_TAR, m) for d, m in entries], channels=channels)
    except ValueError as err:  # np.stack over images of different sizes inside one shard
        raise ShardVerificationError(f"a shard holds images of different sizes ({err})", "resolution_mismatch") from None
    return data, [m for _, m in entries]


# ----------------------------------------------------------------------------- privacy numbers from manifests
def privacy_summary(privacy: dict[str, Any]) -> dict[str, Any]:
    """The aggregate numbers a site put in its manifest's privacy section (None where it reported none)."""
    return PrivacyReport.parse(privacy).summary()


def shard_record(m: Manifest) -> dict[str, Any]:
    return {"tar_sha256": m.tar_sha256, "site": m.site_id, "shard_id": m.shard_id, "sample_count": m.sample_count,
            "created": m.created, "software_version": m.software_version, "config_hash": m.config_hash,
            "conditioning": m.conditioning.type, "class_names": list(m.conditioning.class_names),
            "privacy": privacy_summary(m.privacy),
            # the whole typed privacy section: what the release policy's criteria (privdistill.privacy_report) read
            "privacy_report": PrivacyReport.parse(m.privacy).model_dump(mode="json")}


# ----------------------------------------------------------------------------- stages
Shards = Sequence[Path | ShardRef]


def _shard_hashes(shards: Shards) -> list[str]:
    return sorted(read_manifest(as_ref(s).dir).tar_sha256 for s in shards)


def _reference_fingerprint(cfg: TrainingConfig) -> str | None:
    from privdistill.config import RunConfig
    from privdistill.pipeline import source_fingerprint

    data = cfg.reference_data()
    return None if data is None else source_fingerprint(RunConfig(data=data))


def _training_section(cfg: TrainingConfig) -> dict[str, Any]:
    return {"seed": cfg.seed, "resolution": cfg.resolution, "channels": cfg.channels,
            "student": cfg.student.model_dump(mode="json")}


def train_stage(shards: Shards, cfg: TrainingConfig) -> Stage:
    """The stage's fingerprint covers the set of shard hashes: a new accepted shard re-trains, none is a no-op."""
    config = {"shards": _shard_hashes(shards), **_training_section(cfg)}
    return Stage(TRAIN_STAGE, lambda ctx: _train(list(shards), cfg, ctx), (), config)


def evaluate_stage(shards: Shards, cfg: TrainingConfig) -> Stage:
    config = {"seed": cfg.seed, "sample": cfg.sample.model_dump(mode="json"),
              "evaluation": cfg.evaluation.model_dump(mode="json"), "reference_files": _reference_fingerprint(cfg)}
    return Stage(EVAL_STAGE, lambda ctx: _evaluate(list(shards), cfg, ctx), (TRAIN_STAGE,), config)


def train_student(shards: Shards, cfg: TrainingConfig, work_dir: Path, *, force: bool = False) -> dict[str, Any]:
    """Train (or skip, when the set of shards and the config are unchanged) into ``work_dir/train-student``:
    ``model/`` (diffusers save_pretrained layout) and ``training.json``; checkpoints under
    ``work_dir/.checkpoints`` let a killed run resume. Returns the stage record."""
    work_dir = Path(work_dir)
    with workdir_lock(work_dir):
        return run_stage(train_stage(shards, cfg), work_dir, force=force)


def evaluate_student(shards: Shards, cfg: TrainingConfig, work_dir: Path, *, force: bool = False) -> dict[str, Any]:
    """Sample the trained student and measure utility into ``work_dir/evaluate`` (report.json, sample grid)."""
    work_dir = Path(work_dir)
    with workdir_lock(work_dir):
        return run_stage(evaluate_stage(shards, cfg), work_dir, force=force)


def stage_state(shards: Shards, cfg: TrainingConfig, work_dir: Path) -> dict[str, str]:
    """'missing' | 'stale' | 'current' for train-student and evaluate against the accepted shards now."""
    out = {}
    for stage in (train_stage(shards, cfg), evaluate_stage(shards, cfg)):
        rec = read_record(Path(work_dir), stage.name)
        out[stage.name] = "missing" if rec is None else ("current" if is_current(stage, Path(work_dir)) else "stale")
    return out


def _train(shards: list[Path | ShardRef], cfg: TrainingConfig, ctx: StageContext) -> dict[str, Any]:
    from privdistill.models import DiffusionModel
    from privdistill.sample import prompt_label_map
    from privdistill.train import train_diffusion

    data, manifests = load_accepted(shards, resolution=cfg.resolution, channels=cfg.channels)
    kind = manifests[0].conditioning.type
    if kind != cfg.student.model.conditioning:
        raise StageError(f"the accepted shards are {kind!r}-conditioned but student.model.conditioning is "
                         f"{cfg.student.model.conditioning!r}; set it to {kind!r} in the training config")
    model = DiffusionModel.from_config(cfg.student.model, resolution=cfg.resolution, channels=cfg.channels,
                                       class_names=data.class_names, prompts=data.prompts, seed=cfg.seed)
    report = train_diffusion(model, data, cfg.student.train, seed=cfg.seed, checkpoint_dir=ctx.checkpoint_dir)
    model.save(ctx.out / MODEL_DIR)
    if data.prompts is not None:
        (ctx.out / PROMPTS_FILE).write_text(json.dumps(prompt_label_map(data), indent=2))
    records = [shard_record(m) for m in manifests]
    training = {
        "name": cfg.name, "n_samples": len(data), "class_names": data.class_names, "conditioning": kind,
        "sites": sorted({m.site_id for m in manifests}), "shards": records,
        "config": _training_section(cfg), "train": report,
    }
    atomic_write_json(ctx.out / TRAINING_FILE, training)
    log.info("student.trained", shards=len(records), samples=len(data), final_loss=report.get("final_loss"))
    return {k: v for k, v in report.items() if k != "loss_curve"} | {"n_shards": len(records), "n_samples": len(data)}


def _evaluate(shards: list[Path | ShardRef], cfg: TrainingConfig, ctx: StageContext) -> dict[str, Any]:
    from coordinator.student_eval import utility_report
    from privdistill.imaging import save_grid
    from privdistill.measure import CACHE_DIR, MeasureCache, load_prompt_labels
    from privdistill.models import DiffusionModel
    from privdistill.sample import sample_dataset
    from privdistill.train import Dist, pick_device

    tdir = ctx.input(TRAIN_STAGE)
    training = json.loads((tdir / TRAINING_FILE).read_text())
    if sorted(s["tar_sha256"] for s in training["shards"]) != _shard_hashes(shards):
        raise StageError("the accepted shards changed since the student was trained: run train-student first")
    device = pick_device(Dist())
    model = DiffusionModel.load(tdir / MODEL_DIR).to(device)
    samples = sample_dataset(model, cfg.sample, seed=derive_seed(cfg.seed, "student-samples"), device=device,
                             prompt_labels=load_prompt_labels(tdir))
    save_grid(samples.images[:64], ctx.out / GRID_FILE)
    pooled, _ = load_accepted(shards, resolution=cfg.resolution, channels=cfg.channels)
    report: dict[str, Any] = {
        "student": {"n_samples": len(samples), "class_names": list(model.class_names),
                    "ddim_steps": cfg.sample.steps, "solver": cfg.sample.solver, "trained_on_shards": len(training["shards"]),
                    "trained_on_samples": training["n_samples"]},
        **utility_report(samples, pooled, cfg, MeasureCache(ctx.workdir / CACHE_DIR)),
        "privacy": {
            "measured_at_coordinator": False,
            "note": NO_PATIENT_DATA,
            "sites": [{"site": s["site"], "shard_id": s["shard_id"], "tar_sha256": s["tar_sha256"], **s["privacy"]}
                      for s in training["shards"]],
        },
    }
    atomic_write_json(ctx.out / REPORT_FILE, report)
    log.info("student.evaluated", tstr_accuracy=report["tstr_accuracy"], fid_domain=report["fid_domain"])
    return report

