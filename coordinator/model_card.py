"""MODEL_CARD.md for a released student, rendered from the machine-readable release record through
templates/model_card.md (Jinja2) with a Hugging Face model-card metadata header."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE = Path(str(files("coordinator") / "templates" / "model_card.md"))
PIPELINE_TAGS = {"text": "text-to-image"}  # the Hub has no tag for class-conditional generation

NOT_MEASURED = [
    "memorization and re-identification of real patients by the STUDENT: the coordinator holds no patient data; "
    "each site must run `privdistill-site evaluate-student` against its own patients",
    "clinical validity, diagnostic accuracy or safety of any image the model generates",
    "performance per patient subgroup (age, sex, scanner, site) and fairness",
    "a formal differential-privacy guarantee for the student: none exists, even where a site trained its teacher "
    "with DP-SGD, because the filter then consulted real images to choose the kept samples; the filter is "
    "empirical, not a proof",
    "FID against Inception features: fid_domain uses a small domain classifier and is not comparable with "
    "published FIDs",
]


def _f(v: Any, digits: int = 3) -> str:
    if isinstance(v, bool) or v is None:
        return "n/a" if v is None else str(v).lower()
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _recall(recall: Any) -> str:
    if not isinstance(recall, dict) or not recall:
        return "n/a"
    return ", ".join(f"{k} {_f(v, 2)}" for k, v in sorted(recall.items()))


def _fresh(p: dict[str, Any]) -> str:
    """alpha, and the measured fresh-drop rate with its 95% interval and n."""
    rate, ci, n = p.get("fresh_drop_rate"), p.get("fresh_drop_ci"), p.get("fresh_n")
    out = f"α {_f(p.get('alpha'), 2)}; {_f(rate)}"
    if isinstance(ci, list) and len(ci) == 2:
        out += f" [{_f(ci[0])}, {_f(ci[1])}]"
    return out + (f" (n {n})" if n is not None else "")


def _audited(p: dict[str, Any]) -> str:
    """Each audited kind's recall with its 95% interval and n; kinds with too few cases marked."""
    rec = p.get("recall")
    if not isinstance(rec, dict) or not rec:
        return "n/a"
    few = set(p.get("recall_too_few") or [])
    parts = []
    for k, r in sorted(rec.items()):
        ci = r.get("ci") if isinstance(r, dict) else None
        band = f" [{_f(ci[0], 2)}, {_f(ci[1], 2)}]" if isinstance(ci, list) and len(ci) == 2 else ""
        parts.append(f"{k} {_f(r.get('value'), 2)}{band} n {r.get('n')}{' (too few)' if k in few else ''}")
    return "; ".join(parts)


def _mia(p: dict[str, Any]) -> str:
    """The teacher's membership-inference AUC with its 95% interval and n (patients), or n/a."""
    auc, ci = p.get("teacher_mia_auc"), p.get("teacher_mia_auc_ci95")
    if not isinstance(auc, (int, float)) or isinstance(auc, bool):
        return "n/a"
    n = f", n = {p.get('teacher_mia_n_member_units')}/{p.get('teacher_mia_n_nonmember_units')}"
    if isinstance(ci, list) and len(ci) == 2:
        return f"{auc:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]{n}"
    return f"{auc:.3f} (no interval)"


def _dp(p: dict[str, Any]) -> str:
    """The shard's teacher DP-SGD guarantee as reported in its signed manifest, or "no DP"."""
    eps, delta = p.get("teacher_dp_epsilon"), p.get("teacher_dp_delta")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        return "no DP"
    return f"ε = {eps:.2f}, δ = {delta:.1e}" if isinstance(delta, (int, float)) else f"ε = {eps:.2f}, δ = n/a"


def _shard_table(shards: list[dict[str, Any]]) -> list[str]:
    head = ("| site | shard | tar sha256 | samples | filter | fresh-drop (95% CI) | kept / dropped "
            "| planted-copy recall | audited recall (95% CI, n) | teacher memorization | kept memorization "
            "| teacher / kept re-id | teacher MIA AUC [95% CI], n member/non-member patients (non-DP) "
            "| teacher DP-SGD |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in shards:
        p = s["privacy"]
        rows.append(
            f"| {s['site']} | {s['shard_id']} | `{s['tar_sha256']}` | {s['sample_count']} | "
            f"{'on' if p.get('filter_enabled') else ('OFF' if p.get('filter_enabled') is False else 'n/a')} | "
            f"{_fresh(p)} | {_f(p.get('kept'))} / {_f(p.get('dropped'))} | {_recall(p.get('planted_recall'))} | "
            f"{_audited(p)} | "
            f"{_f(p.get('teacher_memorization_rate'), 4)} | {_f(p.get('kept_memorization_rate'), 4)} | "
            f"{_f(p.get('teacher_reid_rate'), 4)} / {_f(p.get('kept_reid_rate'), 4)} | {_mia(p)} | {_dp(p)} |")
    return rows


def card_data(rec: dict[str, Any]) -> ModelCardData:
    """The card's YAML metadata header (Hugging Face model card conventions)."""
    model, data = rec["model"], rec["training_data"]
    return ModelCardData(
        model_name=f"{rec['name']} v{rec['version']}",
        library_name="diffusers" if "DiffusionPipeline.from_pretrained" in model["layout"] else None,
        pipeline_tag=PIPELINE_TAGS.get(model["conditioning"]),
        tags=["privdistill", "diffusion", "synthetic-data", "medical-imaging", "privacy-distillation"],
        privdistill={"version": rec["software_version"], "release": rec["version"], "sites": list(data["sites"]),
                     "n_training_samples": data["n_samples"], "conditioning": model["conditioning"],
                     "class_names": list(model["class_names"])},
    )


def render_model_card(rec: dict[str, Any]) -> str:
    """Markdown with a YAML metadata header: intended use, training data (every shard with its privacy summary),
    config, evaluation, gaps (templates/model_card.md through huggingface_hub's ModelCard)."""
    model, data, ev = rec["model"], rec["training_data"], rec["evaluation"]
    ref = ev.get("reference", {})
    card = ModelCard.from_template(
        card_data(rec), template_str=TEMPLATE.read_text(encoding="utf-8"),
        name=rec["name"], version=rec["version"], released_at=rec["released_at"],
        software_version=rec["software_version"], model=model, parameters=_f(model.get("parameters")),
        classes=", ".join(model["class_names"]) or "n/a", data=data, shard_table=_shard_table(data["shards"]),
        steps=_f(rec["training"].get("steps")), final_loss=_f(rec["training"].get("final_loss"), 4),
        device=rec["training"].get("device"),
        training_config=json.dumps(rec["training"]["config"], indent=2, sort_keys=True),
        reference=ref,
        ev={"tstr_accuracy": _f(ev.get("tstr_accuracy")), "shards_tstr_accuracy": _f(ev.get("shards_tstr_accuracy")),
            "trtr_accuracy": _f(ref.get("trtr_accuracy")), "fid_domain": _f(ev.get("fid_domain")),
            "copy_rate": _f(ev.get("copy_rate_vs_training_shards"), 4),
            "fid_features": ev.get("fid_feature_classifier") or "n/a"},
        privacy_note=ev.get("privacy", {}).get("note", ""),
        policy=", ".join(f"{k} = {_f(v)}" for k, v in rec["policy"].items() if k != "failures"),
        not_measured=rec["not_measured"],
    )
    return str(card.content).rstrip("\n") + "\n"
