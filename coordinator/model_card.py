"""MODEL_CARD.md for a released student, rendered from the machine-readable release record."""

from __future__ import annotations

import json
from typing import Any

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


def render_model_card(rec: dict[str, Any]) -> str:
    """Markdown: intended use, training data (every shard with its privacy summary), config, evaluation, gaps."""
    model, data, ev = rec["model"], rec["training_data"], rec["evaluation"]
    util, ref = ev, ev.get("reference", {})
    lines = [
        f"# {rec['name']} v{rec['version']} — privdistill student diffusion model",
        "",
        f"Released {rec['released_at']} with privdistill {rec['software_version']}. "
        f"{model['conditioning']}-conditional DDPM ({_f(model.get('parameters'))} parameters), "
        f"{model['resolution']}x{model['resolution']} pixels, {model['channels']} channel(s); "
        f"classes: {', '.join(model['class_names']) or 'n/a'}.",
        f"Files: {model['layout']}.",
        "",
        "## Intended use",
        "",
        "- Research and method development; generating synthetic images to pre-train or augment models that are "
        "then validated on real, properly governed data; teaching.",
        "- **Not for diagnosis, treatment or any clinical decision**, and not a medical device. Generated images "
        "are not real patients and may contain plausible-looking but wrong anatomy or findings.",
        "- Not for attempts to re-identify patients. Report any output that resembles a real patient to the "
        "coordinator operator so the release can be withdrawn.",
        "",
        "## Training data",
        "",
        f"Only filtered synthetic images: {data['n_samples']} samples in {len(data['shards'])} shard(s) from "
        f"{len(data['sites'])} site(s) ({', '.join(data['sites'])}). Each site trained a teacher on its own "
        "images, sampled it, dropped every sample its re-identification model linked to a real patient, and "
        "exported the rest as a signed shard; no real image, patient id or teacher weight left a site. The "
        "privacy numbers are the sites' own aggregate measurements, copied from the signed manifests.",
        "",
        *_shard_table(data["shards"]),
        "",
        "Teacher DP-SGD: the (ε, δ) a site's accountant spent training its teacher (RDP, Poisson sampling, "
        "per-patient clipping). It covers the teacher and its raw samples; the filter then consulted real "
        "images to drop samples, so the kept shard — and this student — carry no formal DP guarantee "
        "beyond that empirical filter. \"no DP\": the site trained its teacher without DP-SGD. Every other "
        "number in this table was computed on the site's real patients WITHOUT differential privacy "
        "(the manifest lists them under non_dp_aggregates): none of them is covered by the ε.",
        "",
        "## Training configuration",
        "",
        f"{_f(rec['training'].get('steps'))} steps, final loss {_f(rec['training'].get('final_loss'), 4)} "
        f"on {rec['training'].get('device')}.",
        "",
        "```json",
        json.dumps(rec["training"]["config"], indent=2, sort_keys=True),
        "```",
        "",
        "## Evaluation (at the coordinator)",
        "",
    ]
    if ref.get("configured"):
        lines += [
            f"Reference set: {ref['description']} (public, not patient data), {ref['n_train']} train / "
            f"{ref['n_test']} test images of the student's classes.",
            "",
            "| metric | value |",
            "|---|---|",
            f"| TSTR accuracy (classifier trained on student samples, tested on the reference test part) | {_f(util.get('tstr_accuracy'))} |",
            f"| TSTR accuracy of the pooled training shards themselves | {_f(util.get('shards_tstr_accuracy'))} |",
            f"| reference TRTR accuracy (trained on the reference train part) | {_f(ref.get('trtr_accuracy'))} |",
            f"| fid_domain | {_f(util.get('fid_domain'))} |",
            f"| student samples copying a training-shard image | {_f(util.get('copy_rate_vs_training_shards'), 4)} |",
        ]
    else:
        lines += [
            "No public reference set was configured: TSTR accuracy was not measured and nothing was compared "
            "with real images.",
            "",
            f"- fid_domain vs the training shards: {_f(util.get('fid_domain'))}",
            f"- student samples copying a training-shard image: {_f(util.get('copy_rate_vs_training_shards'), 4)}",
        ]
    lines += [
        "",
        f"FID features: {util.get('fid_feature_classifier') or 'n/a'}.",
        "",
        "## Privacy",
        "",
        ev.get("privacy", {}).get("note", ""),
        "",
        "Release policy: " + ", ".join(f"{k} = {_f(v)}" for k, v in rec["policy"].items() if k != "failures")
        + " — passed.",
        "",
        "## Not measured",
        "",
        *[f"- {item}" for item in rec["not_measured"]],
        "",
        "## Integrity",
        "",
        "`release.json` lists the sha256 of every other file; `SHA256SUMS` covers all files "
        "(`sha256sum -c SHA256SUMS`).",
        "",
    ]
    return "\n".join(lines)
