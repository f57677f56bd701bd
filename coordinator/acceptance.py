"""What this coordinator accepts, decided by ITS training config (coordinator.yaml `training_config`), never by
what a manifest declares: image resolution and channels, conditioning type, and the prompt vocabulary. A shard
that does not fit is refused when its upload is created, before any byte of it is stored, and not later when
the student's training would fail on it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from coordinator.config import CoordinatorConfig
from coordinator.ledger import AcceptedShard, Ledger
from privdistill.errors import ConfigError, ShardVerificationError
from privdistill.shard import MANIFEST, Manifest, parse_manifest


@dataclass(frozen=True)
class Acceptance:
    """None = not fixed by a training config (then the first accepted shard fixes resolution and conditioning)."""

    resolution: int | None = None
    channels: int | None = None
    conditioning: str | None = None
    vocabulary: frozenset[str] = frozenset()  # empty: text-conditioned shards are refused
    source: str = "no training_config in coordinator.yaml"


class AcceptanceUnavailable(Exception):
    """The configured training config cannot be read: uploads are refused until an operator fixes it."""


def load_acceptance(config: CoordinatorConfig) -> Acceptance:
    """Read the coordinator's training config (each call: an operator's edit applies to the next upload)."""
    if config.training_config is None:
        return Acceptance()
    from coordinator.student import load_training_config

    try:
        cfg = load_training_config(config.training_config)
    except (ConfigError, OSError) as err:
        raise AcceptanceUnavailable(f"the coordinator's training_config cannot be read ({type(err).__name__}); "
                                    "an operator must fix it before shards are accepted") from None
    return Acceptance(resolution=cfg.resolution, channels=cfg.channels, conditioning=cfg.student.model.conditioning,
                      vocabulary=frozenset(cfg.vocabulary), source="the coordinator's training config")


def _reference(ledger: Ledger) -> Manifest | None:
    """The manifest of the earliest accepted shard (what fixes the format without a training config). Asked at every
    upload's start and end, so the earliest row alone is read (all rows only when its manifest is unreadable), and
    its parsed manifest is kept for as long as it is still the earliest and its bytes are unchanged."""
    def rows() -> Iterator[AcceptedShard]:
        first = ledger.accepted_shards(limit=1)
        yield from first
        if first:  # only reached when the earliest one's manifest is unreadable
            yield from ledger.accepted_shards()[1:]

    for row in rows():
        try:
            data = (Path(row.dir) / MANIFEST).read_bytes()
            cached = _REFERENCE.get(row.tar_sha256)
            if cached is not None and cached[0] == data:
                return cached[1]
            manifest = parse_manifest(data)
        except (OSError, ShardVerificationError):
            continue
        _REFERENCE.clear()
        _REFERENCE[row.tar_sha256] = (data, manifest)
        return manifest
    return None


# the last reference read: tar_sha256 -> (manifest bytes, parsed manifest)
_REFERENCE: dict[str, tuple[bytes, Manifest]] = {}


def check_manifest(manifest: Manifest, acc: Acceptance, ledger: Ledger) -> None:
    """Raise ShardVerificationError (resolution_mismatch, conditioning_mismatch, no_prompt_vocabulary,
    prompt_outside_vocabulary) when this coordinator would not train on the shard."""
    want_res, want_ch, want_cond = acc.resolution, acc.channels, acc.conditioning
    source = acc.source
    if want_res is None:
        ref = _reference(ledger)
        if ref is not None:
            want_res, want_ch, want_cond = ref.resolution, ref.channels, ref.conditioning.type
            source = "the shards already accepted"
    if want_res is not None and (manifest.resolution, manifest.channels) != (want_res, want_ch):
        raise ShardVerificationError(
            f"the shard holds {manifest.channels}-channel {manifest.resolution}x{manifest.resolution} images; "
            f"{source} requires{' ' + str(want_ch) + '-channel' if want_ch else ''} {want_res}x{want_res}",
            "resolution_mismatch")
    if want_cond is not None and manifest.conditioning.type != want_cond:
        raise ShardVerificationError(f"the shard is {manifest.conditioning.type!r}-conditioned; {source} trains a "
                                     f"{want_cond!r}-conditioned student", "conditioning_mismatch")
    if manifest.conditioning.type == "text":
        if not acc.vocabulary:
            raise ShardVerificationError(
                "this coordinator has no prompt vocabulary of its own (training config `vocabulary`), so it accepts "
                "no text-conditioned shard", "no_prompt_vocabulary")
        if set(manifest.conditioning.vocabulary) - acc.vocabulary:
            raise ShardVerificationError("the manifest declares prompt words outside the coordinator's vocabulary",
                                         "prompt_outside_vocabulary")
