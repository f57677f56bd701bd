"""Authenticated stage records: the site agent MACs every stage record it writes with a key derived from the
site's private key, and packaging and the export gate accept only records it authenticates. A stage written by
anything that does not hold the site key (a filter stage forged over real images, a work directory copied from
elsewhere) is refused."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privdistill.stages import authenticated_record
from privdistill.workdir import FILTER, INGEST, KEPT_FILE, SAMPLE, TRAIN_REID

# every stage whose output packaging reads (site_agent.package.UPSTREAM); each was run on authenticated inputs
SHARD_STAGES = (INGEST, TRAIN_REID, SAMPLE, FILTER)  # what packaging reads
_INFO = b"privdistill site agent: stage record MAC v1"


def stage_record_key(key: Ed25519PrivateKey) -> bytes:
    """The stage-record MAC key: HKDF-SHA256 of the site's Ed25519 private key. No new secret to store or leak:
    it exists wherever the agent can sign shards and nowhere else (the work directory never holds it)."""
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(raw)


def verify_shard_stages(workdir: Path, key: Ed25519PrivateKey) -> None:
    """Every stage record behind a shard is authenticated by this site's key, each upstream record is the one the
    filter was run on, and the filter's outputs are unchanged; else PrivacyPolicyError naming the stage."""
    from privdistill.errors import PrivacyPolicyError

    mac_key = stage_record_key(key)
    records = {name: authenticated_record(Path(workdir), name, mac_key, check_outputs=name == "filter")
               for name in SHARD_STAGES}
    for name, rec in records.items():
        for up, digest in (rec.get("inputs") or {}).items():
            if up in records and records[up].get("outputs_hash") != digest:
                raise PrivacyPolicyError(f"the '{name}' stage was run on other '{up}' outputs than those recorded "
                                         "now; re-run the pipeline with `privdistill-site run`")
    if KEPT_FILE not in (records["filter"].get("outputs") or {}):
        raise PrivacyPolicyError("the filter stage record lists no kept set; re-run `privdistill-site run --force`")
