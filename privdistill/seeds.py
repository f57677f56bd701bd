"""Named seed streams: every random draw of a run takes its seed from ``derive_seed(cfg.seed, "<stream>")``, so two
draws never share a seed by accident (``seed + 1`` in one module and ``seed + 1`` in another) and a reader sees
what each seed is for. Streams are hashed from (seed, name, index): changing one stream moves no other."""

from __future__ import annotations

import hashlib

# Every stream in use, by what it draws. A name not listed here is a typo (derive_seed refuses it).
STREAMS = frozenset({
    # training
    "student-train",            # the student's initial weights and its training noise/order
    "dp-public-pretrain",       # DP mode: pre-training on the selected public images
    # sampling
    "teacher-samples",          # the teacher's synthetic set (sample stage; the fingerprint audit's free samples)
    "student-samples",          # samples of a trained student (evaluate stage, coordinator evaluation)
    "released-student-samples",  # a site's samples of a released student (site evaluate-student)
    # filter and its audit
    "filter-null-split",        # held-out images: calibration part vs audit part
    "filter-audit-heldout",     # held-out images the filter audit keeps
    "filter-audit-homogeneous",  # planted copies of the most homogeneous class
    "filter-audit-marks",       # local marks planted on fresh images
    "filter-audit-visits",      # repeat visits planted as copies
    "filter-audit-near-copies",  # which training images the teacher re-noises
    "filter-audit-near-noise",  # the noise of those near copies
    "filter-audit-bootstrap",   # patient bootstrap of each planted kind's recall (index: the kind)
    # re-identification
    "reid-pairs",               # calibration pairs of the re-identification model
    # evaluation
    "downstream",               # TRTR/TSTR downstream models (index: which training set)
    "eval-classifier",          # the domain classifier behind fid_domain
    "measure-teacher",          # privacy/utility measurements on the teacher's samples
    "measure-student",          # the same on the student's samples
    "coordinator-tstr-student",  # coordinator: TSTR of the student's samples on the public reference
    "coordinator-tstr-shards",  # coordinator: TSTR of the training shards on the public reference
    "federated-eval-picks",     # federated rounds: which images a round's loss is measured on
    # privacy audits
    "mia-test-visits",          # simulated visits on the held-out set of the membership attack
    "lira-shadow",              # LiRA shadow models (index: the shadow)
    "auc-bootstrap",            # cluster bootstrap of an attack's AUC
    "tpr-bootstrap",            # cluster bootstrap of TPR at a fixed FPR
    "fingerprint-detector",     # the fingerprint detector's training batches
})
_BITS = 31  # fits every consumer (numpy, torch, int32 APIs) and leaves room for per-step arithmetic on top


def derive_seed(seed: int, stream: str, *index: int) -> int:
    """The seed of ``stream`` (one of ``STREAMS``; ``index`` for one of many, e.g. the k-th shadow model) in a run
    seeded with ``seed``: a fixed hash, the same on every machine and Python version."""
    if stream not in STREAMS:
        raise ValueError(f"unknown seed stream {stream!r}; add it to privdistill.seeds.STREAMS with what it draws")
    key = f"{int(seed)}/{stream}/{'/'.join(str(int(i)) for i in index)}".encode()
    digest = hashlib.blake2b(key, digest_size=8, person=b"privdistill-seed").digest()
    return int.from_bytes(digest, "big") >> (64 - _BITS)
