"""The Privacy Distillation pipeline as stages: ingest -> train-teacher / train-reid -> sample ->
filter -> train-student -> evaluate. Each stage reads its upstream stages' directories only."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from privdistill.config import RunConfig, config_hash
from privdistill.data.types import ImageSet
from privdistill.errors import PrivacyPolicyError, StageError
from privdistill.seeds import derive_seed
from privdistill.stages import (
    STAGE_FILE,
    Stage,
    StageContext,
    atomic_write_json,
    read_record,
    run_stage,
    sha256_file,
    workdir_lock,
)
from privdistill.workdir import (
    DATA_REPORT,
    DP_FILE,
    EVALUATE,
    FILTER,
    INGEST,
    KEPT_FILE,
    MIA_FILE,
    MODEL_DIR,
    PROMPTS_FILE,
    REID_DIR,
    REID_ONNX,
    SAMPLE,
    SAMPLES_FILE,
    SAMPLES_GRID,
    TEST_SET,
    TRAIN_REID,
    TRAIN_SET,
    TRAIN_STUDENT,
    TRAIN_TEACHER,
)

log = structlog.get_logger(__name__)



# ----------------------------------------------------------------------------- helpers
def source_fingerprint(cfg: RunConfig) -> str:
    """Cheap fingerprint of the data (files: path, size, mtime; a PACS: the matching-instance list):
    edited data, or new studies on the PACS, re-run ingest."""
    entries: list = []
    for key in ("source", "test_source"):
        src = getattr(cfg.data, key)
        if src is None:
            continue
        if src.type == "pacs":
            from privdistill.data.pacs import listing_digest

            entries.append((key, "pacs", src.url, listing_digest(src)))
            continue
        for name in ("images", "labels", "path", "root", "manifest"):
            p = getattr(src, name, None)
            if p is None:
                continue
            files = [p] if Path(p).is_file() else sorted(x for x in Path(p).rglob("*") if x.is_file())
            for f in files:
                st = f.stat()
                entries.append((str(f), st.st_size, st.st_mtime_ns))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def open_filtered_set(filter_dir: Path) -> ImageSet:
    """The only way the student reads data: the kept set of a completed filter stage.

    Refuses (PrivacyPolicyError) any directory that is not a filter stage's output, whose kept set
    changed since the filter wrote it, or whose images carry patient ids (i.e. real data)."""
    rec_path = filter_dir / STAGE_FILE
    kept = filter_dir / KEPT_FILE
    rec = None
    if rec_path.is_file():
        try:
            rec = json.loads(rec_path.read_text())
        except json.JSONDecodeError:
            rec = None
    if rec is None or rec.get("stage") != "filter" or not kept.is_file():
        raise PrivacyPolicyError(
            f"the student trains only on the filter stage's kept synthetic images, and {filter_dir} is not "
            "a completed filter stage output; run `privdistill filter` and point train-student at its directory"
        )
    expected = rec.get("outputs", {}).get(KEPT_FILE)
    if expected != sha256_file(kept):
        raise PrivacyPolicyError(
            f"{kept} changed after the filter stage wrote it (hash mismatch); re-run `privdistill filter`"
        )
    data = ImageSet.load(kept)
    if data.patient_ids is not None:
        raise PrivacyPolicyError(f"{kept} carries patient ids: it holds real images, not filtered synthetic ones")
    return data


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- stage bodies
def _ingest(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    from privdistill.data.load import load_dataset

    loaded = load_dataset(cfg.data, seed=cfg.seed)
    loaded.train.save(ctx.out / TRAIN_SET)
    loaded.test.save(ctx.out / TEST_SET)
    (ctx.out / DATA_REPORT).write_text(json.dumps(loaded.report, indent=2, default=str))
    return loaded.report


def _train_diffusion_stage(cfg: RunConfig, ctx: StageContext, which: str, data: ImageSet) -> dict[str, Any]:
    from privdistill.models import DiffusionModel
    from privdistill.train import train_diffusion

    dcfg = cfg.teacher if which == "teacher" else cfg.student_config
    seed = cfg.seed if which == "teacher" else derive_seed(cfg.seed, "student-train")
    model = DiffusionModel.from_config(
        dcfg.model, resolution=cfg.data.resolution, channels=cfg.data.channels,
        class_names=data.class_names, prompts=data.prompts, seed=seed,
    )
    dp = cfg.privacy.dp if cfg.privacy is not None and which == "teacher" else None
    if dp is None:
        report = train_diffusion(model, data, dcfg.train, seed=seed, checkpoint_dir=ctx.checkpoint_dir)
    else:
        from privdistill.dp import train_teacher_dp

        report = train_teacher_dp(model, data, dcfg.train, dp, seed=seed, resolution=cfg.data.resolution,
                                  channels=cfg.data.channels, checkpoint_dir=ctx.checkpoint_dir,
                                  budget=cfg.privacy.budget if cfg.privacy is not None else None)
        atomic_write_json(ctx.out / DP_FILE, report["dp"])
    model.save(ctx.out / MODEL_DIR)
    if data.prompts is not None:
        from privdistill.sample import prompt_label_map

        (ctx.out / PROMPTS_FILE).write_text(json.dumps(prompt_label_map(data), indent=2))
    return report


def _train_teacher(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    return _train_diffusion_stage(cfg, ctx, "teacher", ImageSet.load(ctx.input(INGEST) / TRAIN_SET))


def _train_student(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    data = open_filtered_set(ctx.input(FILTER))
    if len(data) == 0:
        raise StageError("the filter kept no synthetic image: nothing to train the student on")
    return _train_diffusion_stage(cfg, ctx, "student", data)


def _train_reid(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    from privdistill.imaging import at_resolution
    from privdistill.reid import export_onnx, save_reid, train_reid

    train = at_resolution(ImageSet.load(ctx.input(INGEST) / TRAIN_SET), cfg.analysis_resolution)
    model = train_reid(train, cfg.reid, seed=cfg.seed)
    save_reid(model, ctx.out / REID_DIR)
    export_onnx(model, ctx.out / REID_ONNX)
    return {"threshold": model.threshold, "calibration": model.calibration}


def _prompt_labels(teacher_dir: Path) -> dict[str, int | None] | None:
    from privdistill.measure import load_prompt_labels

    return load_prompt_labels(teacher_dir)


def _sample(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    from privdistill.imaging import save_grid
    from privdistill.models import DiffusionModel
    from privdistill.sample import sample_dataset

    model = DiffusionModel.load(ctx.input(TRAIN_TEACHER) / MODEL_DIR)
    samples = sample_dataset(model, cfg.sample, seed=derive_seed(cfg.seed, "teacher-samples"),
                             prompt_labels=_prompt_labels(ctx.input(TRAIN_TEACHER)))
    samples.save(ctx.out / SAMPLES_FILE)
    save_grid(samples.images[:64], ctx.out / SAMPLES_GRID)
    if (ctx.input(TRAIN_TEACHER) / DP_FILE).is_file():
        shutil.copyfile(ctx.input(TRAIN_TEACHER) / DP_FILE, ctx.out / DP_FILE)
    # membership inference on the teacher (first stage with both the teacher and the real split); the
    # filter stage carries its aggregate into the privacy report
    from privdistill.audit.mia import run_membership_audit

    atomic_write_json(ctx.out / MIA_FILE, run_membership_audit(model, ctx.input(INGEST), cfg.data, seed=cfg.seed))
    return {"n_samples": len(samples), "ddim_steps": cfg.sample.steps, "solver": cfg.sample.solver}


def _filter(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    from privdistill.filter import calibrate_filter, filter_synthetic, scorer_for, split_null, write_filter_outputs
    from privdistill.filter_audit import audit_filter
    from privdistill.imaging import at_resolution
    from privdistill.models import DiffusionModel
    from privdistill.reid import OnnxEmbedder, load_reid

    train = ImageSet.load(ctx.input(INGEST) / TRAIN_SET)
    samples = ImageSet.load(ctx.input(SAMPLE) / SAMPLES_FILE)
    # decisions and audit at the analysis resolution; kept.npz and the review grid at the full one
    train_a, samples_a = (at_resolution(d, cfg.analysis_resolution) for d in (train, samples))
    heldout_a = at_resolution(ImageSet.load(ctx.input(INGEST) / TEST_SET), cfg.analysis_resolution)
    reid = load_reid(ctx.input(TRAIN_REID) / REID_DIR)
    embedder = OnnxEmbedder(ctx.input(TRAIN_REID) / REID_ONNX)
    scorer = scorer_for(train_a, embedder.embed, cfg.filter)
    # held-out patients (outside the gallery and the re-id training): one part calibrates, the other audits
    null_idx, audit_idx = split_null(heldout_a, cfg.filter.null_fraction,
                                     seed=derive_seed(cfg.seed, "filter-null-split"))
    calibration = calibrate_filter(scorer, heldout_a.images[null_idx], cfg.filter)
    result = filter_synthetic(samples_a, train_a, embed=embedder.embed, cfg=cfg.filter, calibration=calibration,
                              scorer=scorer)
    teacher = DiffusionModel.load(ctx.input(TRAIN_TEACHER) / MODEL_DIR)
    audit = audit_filter(train_a, heldout_a.subset(audit_idx), scorer=scorer, calibration=calibration, seed=cfg.seed,
                         teacher=teacher, teacher_train=train)
    extra: dict[str, Any] = {"audit": audit, "analysis_resolution": cfg.analysis_resolution}
    if (ctx.input(SAMPLE) / MIA_FILE).is_file():
        extra["mia"] = {"teacher": _load_json(ctx.input(SAMPLE) / MIA_FILE)}
    if (ctx.input(SAMPLE) / DP_FILE).is_file():
        from privdistill.dp import dp_summary

        extra["teacher_dp"] = dp_summary(_load_json(ctx.input(SAMPLE) / DP_FILE))
    return write_filter_outputs(result, samples, train, ctx.out, calibration=reid.calibration, extra=extra)


def _evaluate(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    from privdistill.evaluate import evaluate_run

    return evaluate_run(cfg, ctx)




def _analysis(cfg: RunConfig) -> dict[str, int]:
    """The analysis resolution, in a stage's fingerprint only when it differs from the data's (so the
    fingerprints of runs that predate it do not change)."""
    res = cfg.analysis_resolution
    return {} if res == cfg.data.resolution else {"analysis_resolution": res}


def _checkpoint(model: Any) -> dict[str, str]:
    """A latent model's pretrained folder as (path, size, mtime) of its files: a replaced checkpoint re-trains."""
    if model.type != "latent" or not Path(model.pretrained_path).is_dir():
        return {}
    files = sorted(p for p in Path(model.pretrained_path).rglob("*") if p.is_file())
    entries = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return {"checkpoint_files": hashlib.sha256(json.dumps(entries).encode()).hexdigest()}


@dataclass(frozen=True)
class PipelineStage:
    """One row of the pipeline: a stage's name, the stages whose outputs it reads, its body, and the config
    sections it depends on (its fingerprint's config part: a change there re-runs it)."""

    name: str
    upstream: tuple[str, ...]
    body: Callable[[RunConfig, StageContext], dict[str, Any]]
    config: Callable[[RunConfig], dict[str, Any]]


PIPELINE: tuple[PipelineStage, ...] = (
    PipelineStage(INGEST, (), _ingest,
                  lambda cfg: {"data": cfg.section("data"), "files": source_fingerprint(cfg)}),
    PipelineStage(TRAIN_TEACHER, (INGEST,), _train_teacher,
                  lambda cfg: {"teacher": cfg.section("teacher"), **_checkpoint(cfg.teacher.model),
                               **({"privacy": cfg.section("privacy")} if cfg.privacy is not None else {})}),
    PipelineStage(TRAIN_REID, (INGEST,), _train_reid, lambda cfg: {"reid": cfg.section("reid"), **_analysis(cfg)}),
    PipelineStage(SAMPLE, (INGEST, TRAIN_TEACHER), _sample, lambda cfg: {"sample": cfg.section("sample")}),
    # the teacher is an input of the filter: its near-copies audit the filter
    PipelineStage(FILTER, (INGEST, TRAIN_TEACHER, SAMPLE, TRAIN_REID), _filter,
                  lambda cfg: {"filter": cfg.section("filter")}),
    # the student sees the filter's output and nothing else
    PipelineStage(TRAIN_STUDENT, (FILTER,), _train_student,
                  lambda cfg: {"student": cfg.section("student"), **_checkpoint(cfg.student_config.model)}),
    PipelineStage(EVALUATE, (INGEST, SAMPLE, FILTER, TRAIN_STUDENT), _evaluate,
                  lambda cfg: {"evaluate": cfg.section("evaluate"), "sample": cfg.section("sample"),
                               "reid": cfg.section("reid"), **_analysis(cfg)}),
)
STAGES = tuple(row.name for row in PIPELINE)
_BY_NAME = {row.name: row for row in PIPELINE}


def stage_config(cfg: RunConfig, name: str) -> dict[str, Any]:
    """The resolved config sections a stage depends on (its fingerprint's config part)."""
    return {"seed": cfg.seed, **_BY_NAME[name].config(cfg)}


def build_stage(cfg: RunConfig, name: str) -> Stage:
    row = _BY_NAME.get(name)
    if row is None:
        raise StageError(f"unknown stage '{name}'; stages are: {', '.join(STAGES)}")
    return Stage(name=name, fn=lambda ctx: row.body(cfg, ctx), upstream=row.upstream, config=stage_config(cfg, name))


def run_pipeline(
    cfg: RunConfig, workdir: Path, *, stages: list[str] | None = None, force: bool = False,
    record_key: bytes | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the given stages (default: all) in order; unchanged stages are skipped. ``record_key``: stage records
    are authenticated with it (privdistill.stages.run_stage)."""
    workdir = Path(workdir)
    built = [build_stage(cfg, name) for name in stages or list(STAGES)]
    records = {}
    with workdir_lock(workdir):
        atomic_write_json(workdir / "config.resolved.json", cfg.model_dump(mode="json"))
        for stage in built:
            records[stage.name] = run_stage(stage, workdir, force=force, record_key=record_key)
        if EVALUATE in records:
            for fname in ("report.json", "report.html"):
                src = workdir / EVALUATE / fname
                if src.is_file():
                    tmp = workdir / f".{fname}.tmp"
                    shutil.copyfile(src, tmp)
                    tmp.replace(workdir / fname)
    log.info("pipeline.done", stages=list(records), config_hash=config_hash(cfg.model_dump(mode="json"))[:12])
    return records


def stage_status(cfg: RunConfig, workdir: Path) -> list[dict[str, Any]]:
    from privdistill.stages import is_current

    out = []
    for name in STAGES:
        rec = read_record(Path(workdir), name)
        out.append({
            "stage": name,
            "done": rec is not None,
            "current": is_current(build_stage(cfg, name), Path(workdir)),
            "seconds": None if rec is None else rec.get("seconds"),
        })
    return out
