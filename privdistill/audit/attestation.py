"""A site's signed attestation of a student's privacy against its own patients: aggregate numbers only
(membership-inference AUC, memorization and re-identification rates), bound to the model's file hashes.
The coordinator, which holds no patient data, uses it as release evidence."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privdistill.config import config_hash
from privdistill.errors import ShardVerificationError
from privdistill.identity import sign, verify
from privdistill.stages import hash_tree

FORMAT = "privdistill-student-attestation/1"
ATTESTATION, ATTESTATION_SIG = "attestation.json", "attestation.sig"
FIELDS = ("mia_auc", "memorization_rate", "reid_rate", "n_samples", "mia_n_members", "mia_n_nonmembers",
          "mia_auc_ci95", "mia_unit", "mia_n_member_units", "mia_n_nonmember_units", "mia_tpr_at_fpr")


MODEL_PARTS = ("unet", "scheduler", "text_encoder", "tokenizer", "vae")
# the pipeline folder's index and the pipeline code a user runs (trust_remote_code) are the model too
PIPELINE_FILES = ("model_index.json", "pipeline.py")


def model_digest(model_dir: Path) -> str:
    """sha256 over the model's own files (relative paths and hashes): the weights folders, the pipeline's index
    and code and the model's metadata file, not what a release adds beside them (model card, release.json, SHA256SUMS, grids). So a
    site can attest the trained candidate (CW/train-student/model) or the released folder: same digest."""
    from privdistill.models import META_FILE

    root = Path(model_dir)
    tree = {k: v for k, v in hash_tree(root).items()
            if k.split("/", 1)[0] in MODEL_PARTS or k in (META_FILE, *PIPELINE_FILES)}
    return config_hash(tree)


def make_attestation(site_id: str, model_dir: Path, student: dict[str, Any],
                     key: Ed25519PrivateKey) -> tuple[bytes, str]:
    """(attestation bytes, base64 signature) of ``student``'s aggregate numbers (FIELDS only)."""
    body = {
        "format": FORMAT, "site_id": site_id, "model_digest": model_digest(model_dir),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "student": {k: student.get(k) for k in FIELDS},
    }
    data = (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()
    return data, sign(key, data)


def verify_attestation(data: bytes, signature_b64: str, public_b64: str) -> dict[str, Any]:
    """The attestation's content after checking its signature and format (ShardVerificationError otherwise)."""
    if not verify(public_b64, data, signature_b64.strip()):
        raise ShardVerificationError("the student attestation's signature does not match the site's key",
                                     "bad_signature")
    try:
        body = json.loads(data)
    except json.JSONDecodeError:
        raise ShardVerificationError("the student attestation is not JSON", "malformed_attestation") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT or not isinstance(body.get("student"), dict):
        raise ShardVerificationError(f"not a {FORMAT} document", "malformed_attestation")
    return body
