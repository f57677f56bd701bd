"""The export gate: the one check between a site's work directory and the network. Only a shard this
work directory packaged from its current filter output, unchanged since, within the vocabulary,
passing the policy and approved, may leave; every refusal is an audit record."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from privdistill.errors import PrivacyPolicyError, ShardVerificationError
from privdistill.identity import load_private_key, public_key_b64
from privdistill.pipeline import open_filtered_set
from privdistill.prompts import check_prompts
from privdistill.shard import (
    ID_PATTERN,
    MANIFEST,
    Manifest,
    sample_members,
    sha256_bytes,
    sha256_path,
    verify_shard_dir,
)
from privdistill.stages import STAGE_FILE, sha256_file
from privdistill.workdir import WorkDir
from site_agent.audit_log import audit
from site_agent.config import SiteConfig, vocabulary
from site_agent.package import SHARD_FILES, evaluate_policy, shard_root
from site_agent.records import verify_shard_stages
from site_agent.state import ShardRow, SiteState, workdir_id


class ExportRefused(PrivacyPolicyError):
    """The export policy refused a shard; ``reason`` is a short code for the audit trail."""


@dataclass
class _Target:
    shard_id: str | None = None


def check_export(workdir: Path, shard_id_or_path: str | Path, cfg: SiteConfig, *,
                 for_federation: bool = False) -> Manifest:
    """Return the verified manifest of an exportable shard, or raise ExportRefused (PrivacyPolicyError)
    or ShardVerificationError with a reason; every refusal is appended to the audit log."""
    workdir = Path(workdir)
    target = _Target()
    try:
        return _check(workdir, shard_id_or_path, cfg, target, for_federation)
    except (PrivacyPolicyError, ShardVerificationError) as err:
        audit(workdir, "export_refused", shard_id=target.shard_id, site_id=cfg.site.id,
              reason=err.reason, detail=str(err))
        raise


def _refuse(reason: str, message: str) -> ExportRefused:
    return ExportRefused(message, reason)


def _locate(workdir: Path, ref: str | Path) -> str:
    """The shard id named by ``ref``: an id, or a folder directly inside WORKDIR/shards/."""
    text = str(ref)
    if isinstance(ref, str) and re.fullmatch(ID_PATTERN, text):
        return text
    path = Path(ref)
    root = shard_root(workdir).resolve()
    if path.resolve().parent != root or path.is_symlink() or not re.fullmatch(ID_PATTERN, path.name):
        # deliberately no path in the message: it goes to the audit log and may name real data
        raise _refuse("outside_shard_store",
                      "only shards packaged into this work directory's shards/ folder can be exported, and this is "
                      "not one (real images, models, embeddings and stage outputs never leave the site); "
                      "export by shard id (see `privdistill-site shards`)")
    return path.name


def _check(workdir: Path, ref: str | Path, cfg: SiteConfig, target: _Target, for_federation: bool) -> Manifest:
    shard_id = _locate(workdir, ref)
    target.shard_id = shard_id
    row = SiteState(workdir).get(shard_id)
    if row is None:
        raise _refuse("unregistered_shard",
                      f"{shard_id} is not a shard this work directory packaged; package with `privdistill-site run` "
                      "and export one listed by `privdistill-site shards`")
    shard_dir = shard_root(workdir) / shard_id
    if Path(row.dir).resolve() != shard_dir.resolve() or shard_dir.is_symlink():
        raise _refuse("registered_path_mismatch",
                      f"{shard_id} is registered at a location other than this work directory's shards/{shard_id}; "
                      "the register was edited or copied: re-package with `privdistill-site run`")
    _check_state(row, cfg, for_federation)
    _check_provenance(workdir, row)
    manifest = _check_files(shard_dir, row, cfg)
    _check_records(workdir, row, cfg)
    _check_content(workdir, shard_id, manifest, cfg)
    verdict = evaluate_policy(manifest.privacy, cfg.site.policy)
    if not verdict["passed"]:
        raise _refuse("policy_failed", f"{shard_id} fails the export policy, {len(verdict['failed'])} criterion/"
                                       f"criteria: {describe_failures(verdict)}; it can never be exported")
    return manifest


def describe_failures(verdict: dict) -> str:
    """Every failing criterion of a policy verdict with its value and limit, e.g. 'max_epsilon: None (limit 8)'."""
    rows = [c for c in verdict.get("criteria", []) if not c.get("passed")]
    if not rows:  # an older verdict without criteria: the names alone
        return ", ".join(verdict.get("failed", [])) or "unknown criteria"
    return "; ".join(f"{c['name']}: {c['value']!r} (limit {c['limit']!r})" for c in rows)


def _check_state(row: ShardRow, cfg: SiteConfig, for_federation: bool = False) -> None:
    """Approved (manual, or auto when allowed); an exported shard may still train the federated student."""
    sid = row.shard_id
    if row.state == "rejected":
        raise _refuse("rejected_shard", f"{sid} was rejected ({row.reason}); package a new shard instead")
    if row.state == "exported" and not for_federation:
        raise _refuse("already_exported", f"{sid} was already exported on {row.exported_at}")
    if not row.policy_passed or not row.policy.get("passed"):
        raise _refuse("policy_failed", f"{sid} fails the export policy: {describe_failures(row.policy)}; "
                                       "it can never be exported: change the settings and re-run")
    if row.state not in (("approved", "exported") if for_federation else ("approved",)):
        raise _refuse("not_approved", f"{sid} is {row.state}, not approved: a data steward reviews it and runs "
                                      f"`privdistill-site approve {sid} --workdir WORKDIR`")
    if cfg.site.approval == "manual" and row.approved_by == "auto-policy":
        raise _refuse("not_approved", f"{sid} was approved automatically, but this site now requires manual "
                                      f"approval: review it and run `privdistill-site approve {sid}`")


def _check_provenance(workdir: Path, row: ShardRow) -> None:
    sid = row.shard_id
    if row.workdir_id != workdir_id(workdir):
        raise _refuse("foreign_workdir", f"{sid} was packaged in another work directory; export it from there")
    rec, kept = WorkDir(workdir).filter_dir / STAGE_FILE, WorkDir(workdir).kept
    if not rec.is_file() or not kept.is_file() or \
            (sha256_file(rec), sha256_file(kept)) != (row.filter_record_sha256, row.kept_sha256):
        raise _refuse("stale_filter", f"the filter stage changed since {sid} was packaged; run "
                                      "`privdistill-site run` to package (and then approve) a fresh shard")


def _check_records(workdir: Path, row: ShardRow, cfg: SiteConfig) -> None:
    """The stage records the gate relies on were written by this agent (MAC'd with a key from the site key)."""
    try:
        verify_shard_stages(workdir, load_private_key(cfg.site.key_file))
    except PrivacyPolicyError as err:
        raise _refuse("unauthenticated_stage", f"{row.shard_id}: {err}") from None


def _check_files(shard_dir: Path, row: ShardRow, cfg: SiteConfig) -> Manifest:
    sid = row.shard_id
    names = {p.name for p in shard_dir.iterdir()} if shard_dir.is_dir() else set()
    odd = [n for n in names if not (shard_dir / n).is_file() or (shard_dir / n).is_symlink()]
    if names != SHARD_FILES or odd:
        raise ShardVerificationError(
            f"{sid}'s folder must hold exactly {sorted(SHARD_FILES)} as plain files and holds {len(names)} "
            "entries; it was changed after packaging: re-package with `privdistill-site run`", "unexpected_files")
    public = public_key_b64(load_private_key(cfg.site.key_file))
    manifest = verify_shard_dir(shard_dir, public)  # signature with this site's key, then every member hash
    if sha256_path(shard_dir / MANIFEST) != row.manifest_sha256:
        raise ShardVerificationError(f"{sid}'s manifest differs from the one packaged and approved (re-signed after "
                                     "an edit?); re-package with `privdistill-site run`", "manifest_changed")
    if manifest.site_id != cfg.site.id or manifest.shard_id != sid:
        raise ShardVerificationError(f"{sid}'s manifest names site {manifest.site_id!r} and shard "
                                     f"{manifest.shard_id!r}", "identity_mismatch")
    return manifest


def _check_content(workdir: Path, shard_id: str, manifest: Manifest, cfg: SiteConfig) -> None:
    """The shard's members must be exactly what the filter's kept set encodes to now."""
    kept = open_filtered_set(WorkDir(workdir).filter_dir)
    expected = {name: sha256_bytes(data) for name, data in sample_members(kept, shard_id)}
    if expected != manifest.members or manifest.sample_count != len(kept) or \
            list(manifest.conditioning.class_names) != list(kept.class_names):
        raise ShardVerificationError(f"{shard_id} does not hold exactly the filter's kept synthetic images; "
                                     "re-package with `privdistill-site run`", "content_mismatch")
    vocab = set(vocabulary(cfg, kept.class_names))
    if set(manifest.conditioning.vocabulary) - vocab:
        raise ShardVerificationError(
            f"{shard_id}'s manifest declares prompt words outside the allow-listed vocabulary (data.prompt_template, "
            "class names, site.vocabulary_extra)", "prompt_outside_vocabulary")
    if kept.prompts is not None:
        try:
            check_prompts(kept.prompts, vocab)
        except ShardVerificationError as err:
            raise ShardVerificationError(
                f"{shard_id}: {err} (allowed: ASCII letters, digits, spaces and - , . ' ( ), and only words of "
                "data.prompt_template, the class names and site.vocabulary_extra); prompts must never carry report "
                "text or names", err.reason) from None


def exportable(workdir: Path, *, for_federation: bool = False) -> list[str]:
    """Ids of approved shards not yet exported (federation: approved or exported), oldest first."""
    states = ("approved", "exported") if for_federation else ("approved",)
    return [r.shard_id for r in SiteState(workdir).list() if r.state in states]


def shard_dir(workdir: Path, shard_id: str) -> Path:
    return shard_root(workdir) / shard_id

