"""The data front door: read the configured sources, select classes, split by patient, preprocess, report."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from privdistill.config import DataConfig
from privdistill.data.preprocess import preprocess_images
from privdistill.data.sources import RawSource, Skipped, read_source
from privdistill.data.types import ImageSet
from privdistill.data.visits import apply_visits
from privdistill.errors import DataError

log = structlog.get_logger(__name__)

MAX_REPORTED_ERRORS = 20
_SPLIT_STREAM, _CAP_STREAM = 0x5111, 0xCA9


@dataclass
class LoadedData:
    train: ImageSet
    test: ImageSet
    report: dict[str, Any]  # JSON-safe; file names relative to the source root, no patient ids


@dataclass
class _Table:
    """A source's usable records with resolved label values and patient ids (not yet preprocessed)."""

    raw: RawSource
    images: list[np.ndarray] = field(default_factory=list)
    values: list[int] = field(default_factory=list)  # original label values; empty when unlabelled
    prompts: list[str] = field(default_factory=list)
    pids: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    excluded_by_class: int = 0

    def take(self, idx: np.ndarray) -> _Table:
        t = _Table(self.raw, skipped=self.skipped, excluded_by_class=self.excluded_by_class)
        t.images = [self.images[i] for i in idx]
        t.values = [self.values[i] for i in idx] if self.values else []
        t.prompts = [self.prompts[i] for i in idx] if self.prompts else []
        t.pids = [self.pids[i] for i in idx]
        return t


def _label_value(label: int | str | None, names: list[str] | None) -> tuple[int | None, Skipped | None]:
    if isinstance(label, (int, np.integer)):
        return int(label), None
    text = (label or "").strip()
    if not text:
        return None, Skipped("", "missing_label", "no label")
    if names and text in names:
        return names.index(text), None
    try:
        return int(text), None
    except ValueError:
        hint = " nor one of class_names" if names else "; name classes via the source's class_names"
        return None, Skipped("", "bad_label", f"label {text!r} is not an integer{hint}")


def _resolve(raw: RawSource, id_prefix: str, classes: list[int] | None) -> _Table:
    """Labels to integer values, patient ids (one per image when the source has none), class filter."""
    t = _Table(raw, skipped=list(raw.skipped))
    for i, rec in enumerate(raw.records):
        value = None
        if raw.has_labels:
            value, problem = _label_value(rec.label, raw.class_names)
            if problem is not None:
                t.skipped.append(Skipped(rec.ref, problem.reason, problem.detail))
                continue
        if classes is not None and value not in classes:
            t.excluded_by_class += 1
            continue
        names = raw.class_names
        if value is not None and names is not None and not 0 <= value < len(names):
            detail = f"label {value} has no entry in class_names ({len(names)} names, indexed by label value)"
            t.skipped.append(Skipped(rec.ref, "bad_label", detail))
            continue
        pid = (rec.patient_id or "").strip() if raw.has_patient_ids else f"{id_prefix}-{i:06d}"
        if not pid:
            t.skipped.append(Skipped(rec.ref, "missing_patient_id", "no patient id"))
            continue
        t.images.append(rec.image)
        if value is not None:
            t.values.append(value)
        if raw.has_prompts:
            t.prompts.append(rec.prompt or "")
        t.pids.append(pid)
    return t


def _nothing_usable(t: _Table, what: str, classes: list[int] | None) -> DataError:
    reasons = dict(Counter(s.reason for s in t.skipped))
    msg = (
        f"no usable image in the {what} ({t.raw.kind}): {t.raw.seen} file(s)/record(s) seen, "
        f"{len(t.raw.records)} read, skipped by reason: {reasons or 'none'}"
    )
    if t.excluded_by_class:
        msg += f", {t.excluded_by_class} excluded because their label is not in data.classes={classes}"
    return DataError(msg + ". Check the source paths and files (debug logging lists each skipped file).")


def _class_names(values: list[int], names: list[str] | None) -> list[str]:
    if names is None:
        return [str(v) for v in values]
    bad = [v for v in values if not 0 <= v < len(names)]
    if bad:
        raise DataError(
            f"data.classes {bad} have no entry in class_names ({len(names)} names, indexed by label value)"
        )
    return [names[v] for v in values]


def _partition(pids: list[str], index: int, count: int) -> np.ndarray:
    """Indices of the records whose patient falls in partition ``index`` of ``count`` (hash of the id)."""
    part = [int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "big") % count for p in pids]
    return np.flatnonzero(np.asarray(part, np.int64) == index)


def _patient_split(pids: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with ``fraction`` of the patients (at least one, never all) in test."""
    uniq = np.unique(np.asarray(pids, dtype=str))
    if len(uniq) < 2:
        raise DataError(
            f"cannot split {len(uniq)} patient(s) into train and test; add data or set data.test_source"
        )
    n_test = min(len(uniq) - 1, max(1, round(fraction * len(uniq))))
    test_p = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(uniq)[:n_test]
    in_test = np.isin(np.asarray(pids, dtype=str), test_p)
    return np.flatnonzero(~in_test), np.flatnonzero(in_test)


def _cap_per_class(t: _Table, max_n: int | None, seed: int) -> np.ndarray:
    """Indices keeping at most ``max_n`` patients per class (seeded; all their images in that class)."""
    n = len(t.pids)
    if max_n is None:
        return np.arange(n)
    pids = np.asarray(t.pids, dtype=str)
    values = np.asarray(t.values, dtype=np.int64) if t.values else np.zeros(n, np.int64)
    keep = np.zeros(n, bool)
    for v in np.unique(values):
        in_class = values == v
        rng = np.random.default_rng([seed, _CAP_STREAM, int(v) & 0xFFFFFFFF])
        chosen = rng.permutation(np.unique(pids[in_class]))[:max_n]
        keep |= in_class & np.isin(pids, chosen)
    return np.flatnonzero(keep)


def _to_imageset(t: _Table, cfg: DataConfig, kept: list[int], names: list[str]) -> ImageSet:
    index = {v: i for i, v in enumerate(kept)}
    labels = np.asarray([index[v] for v in t.values], np.int64) if t.values else None
    prompts: list[str] | None = t.prompts or None
    if cfg.prompt_template is not None:
        if labels is None:
            raise DataError(
                "data.prompt_template needs labels, but the source has none (set its labels/label_tag)"
            )
        try:
            prompts = [cfg.prompt_template.format(label=names[i]) for i in labels]
        except (KeyError, IndexError, ValueError) as err:
            raise DataError(
                f"data.prompt_template {cfg.prompt_template!r}: only {{label}} may be used ({err})"
            ) from None
    return ImageSet(
        images=preprocess_images(t.images, resolution=cfg.resolution, channels=cfg.channels),
        labels=labels,
        prompts=prompts,
        patient_ids=np.asarray(t.pids, dtype=str),
        class_names=list(names) if labels is not None else [],
    )


def _per_class(s: ImageSet) -> dict[str, int]:
    if s.labels is None:
        return {}
    counts = np.bincount(s.labels, minlength=len(s.class_names))
    return {name: int(c) for name, c in zip(s.class_names, counts, strict=True)}


def _source_report(t: _Table) -> dict[str, Any]:
    return {
        "type": t.raw.kind,
        "seen": t.raw.seen,
        "loaded": len(t.raw.records) - (len(t.skipped) - len(t.raw.skipped)),
        "skipped": len(t.skipped),
        "skipped_by_reason": dict(sorted(Counter(s.reason for s in t.skipped).items())),
        "excluded_by_class": t.excluded_by_class,
        "errors": [s.message() for s in t.skipped[:MAX_REPORTED_ERRORS]],
    }


def load_dataset(cfg: DataConfig, *, seed: int) -> LoadedData:
    """Read ``cfg.source`` (and ``cfg.test_source``) into preprocessed, patient-disjoint train/test sets.

    Order: read -> resolve labels and patient ids (sources without ids get one per image,
    ``img-000123``) -> keep ``cfg.classes`` -> split (``test_source``, else a seeded patient-disjoint
    split with ``test_fraction`` of patients in test) -> ``max_per_class`` / ``max_test_per_class``
    patients per class (seeded) -> preprocess -> ``cfg.visits`` on the TRAIN split only, and only
    when the source has no patient ids. Unreadable files are skipped and counted in ``report``."""
    raw = read_source(cfg.source)
    if cfg.classes is not None and not raw.has_labels:
        raise DataError(
            "data.classes selects by label, but data.source has no labels (set its labels/label_tag)"
        )
    src = _resolve(raw, "img", cfg.classes)
    if cfg.partition is not None:
        src = src.take(_partition(src.pids, cfg.partition.index, cfg.partition.count))
    if not src.images:
        raise _nothing_usable(src, "data.source", cfg.classes)
    test_src = None
    if cfg.test_source is not None:
        test_src = _resolve(read_source(cfg.test_source), "test-img", cfg.classes)
        if not test_src.images:
            raise _nothing_usable(test_src, "data.test_source", cfg.classes)
        if test_src.raw.has_labels != raw.has_labels:
            raise DataError("data.source and data.test_source must both have labels or both have none")

    seen_values = set(src.values) | set(test_src.values if test_src is not None else [])
    kept = sorted(cfg.classes) if cfg.classes is not None else sorted(seen_values)
    names = _class_names(kept, raw.class_names or (test_src.raw.class_names if test_src else None))
    if test_src is None:
        train_idx, test_idx = _patient_split(src.pids, cfg.test_fraction, seed)
        train_t, test_t = src.take(train_idx), src.take(test_idx)
    else:
        train_t, test_t = src, test_src
    overlap = set(train_t.pids) & set(test_t.pids)
    if overlap:
        raise DataError(
            f"{len(overlap)} patient(s) appear in both data.source and data.test_source; the test set "
            "must hold other patients (remove them from one source)"
        )
    train_t = train_t.take(_cap_per_class(train_t, cfg.max_per_class, seed))
    test_t = test_t.take(_cap_per_class(test_t, cfg.max_test_per_class, seed))
    train, test = _to_imageset(train_t, cfg, kept, names), _to_imageset(test_t, cfg, kept, names)

    visits = None
    if cfg.visits is not None and raw.has_patient_ids:
        log.warning(
            "data.visits_ignored", reason="the source provides patient ids; visits only simulate them"
        )
    elif cfg.visits is not None:
        train, visits = apply_visits(train, cfg.visits, seed=seed), cfg.visits.count
    assert train.patient_ids is not None and test.patient_ids is not None  # both splits carry patient ids here
    assert set(train.patient_ids).isdisjoint(test.patient_ids)
    report: dict[str, Any] = {
        "source": _source_report(src),
        "test_source": _source_report(test_src) if test_src is not None else None,
        "split": "test_source" if test_src is not None else "patient_disjoint",
        "partition": None if cfg.partition is None else cfg.partition.model_dump(),
        "class_names": train.class_names,
        "n_train": len(train),
        "n_test": len(test),
        "n_patients_train": len(set(train_t.pids)),
        "n_patients_test": len(set(test_t.pids)),
        "train_per_class": _per_class(train),
        "test_per_class": _per_class(test),
        "resolution": cfg.resolution,
        "channels": cfg.channels,
        "visits_per_patient": visits,
        "has_prompts": train.prompts is not None,
    }
    log.info(
        "data.loaded",
        n_train=report["n_train"],
        n_test=report["n_test"],
        n_patients_train=report["n_patients_train"],
        skipped=report["source"]["skipped"],
        skipped_by_reason=report["source"]["skipped_by_reason"],
        train_per_class=report["train_per_class"],
    )
    return LoadedData(train=train, test=test, report=report)
