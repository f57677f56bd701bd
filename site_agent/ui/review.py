"""What the review page shows about one shard: its verified images, the filter's similarity histogram, the dropped
images beside their nearest real image (read inside the site only), the privacy report and the policy verdict."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from privdistill.data.types import ImageSet
from privdistill.errors import ConfigError, PrivdistillError, ShardVerificationError
from privdistill.filter import DECISIONS_FILE
from privdistill.identity import load_private_key, public_key_b64
from privdistill.imaging import png_data_uri, to_uint8
from privdistill.shard import SHARD_TAR, Manifest, iter_samples, verify_shard_dir
from privdistill.stages import STAGE_FILE, read_record, sha256_file
from privdistill.web.plots import similarity_histogram_svg
from privdistill.web.render import flatten
from privdistill.workdir import WorkDir
from site_agent.config import SiteConfig
from site_agent.package import evaluate_policy, shard_root
from site_agent.state import ShardRow, SiteState

log = structlog.get_logger(__name__)

PAGE_SIZE = 120  # synthetic images per grid page
MAX_PAIRS = 48  # dropped images shown beside their nearest real image


@dataclass
class Sample:
    key: str
    src: str  # data: URI of the PNG exactly as it sits in shard.tar
    caption: str


@dataclass
class Pair:
    index: int  # in the sampled (pre-filter) set
    synthetic: str  # data: URI
    real: str  # data: URI of the nearest REAL training image (never leaves the site)
    similarity: float
    reasons: str


@dataclass
class ShardView:
    row: ShardRow
    manifest: Manifest | None = None
    integrity_error: str | None = None
    verdict: dict[str, Any] | None = None  # evaluate_policy on the manifest under today's site policy
    samples: list[Sample] = field(default_factory=list)
    page: int = 1
    pages: int = 1
    histogram: str | None = None  # inline SVG
    pairs: list[Pair] = field(default_factory=list)
    flagged: int = 0
    review_note: str | None = None  # why the filter review is missing or partial

    @property
    def privacy_rows(self) -> list[tuple[str, Any]]:
        return flatten(self.manifest.privacy) if self.manifest else []


def array_uri(image: np.ndarray) -> str:
    """A CHW [-1, 1] image as a PNG data: URI."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint8(image[None])[0]).save(buf, format="PNG")
    return png_data_uri(buf.getvalue())


def list_shards(workdir: Path) -> list[ShardRow]:
    return SiteState(workdir).list()


def _public_key(cfg: SiteConfig) -> str:
    return public_key_b64(load_private_key(cfg.site.key_file))


def shard_view(cfg: SiteConfig, workdir: Path, shard_id: str, *, page: int = 1) -> ShardView:
    """Everything the shard page shows; raises StageError for an unknown shard."""
    row = SiteState(workdir).require(shard_id)
    view = ShardView(row=row)
    try:  # signature with this site's key, then every member against the manifest
        view.manifest = verify_shard_dir(shard_root(workdir) / shard_id, _public_key(cfg))
    except (ShardVerificationError, ConfigError) as err:
        view.integrity_error = str(err)
        return view
    view.verdict = evaluate_policy(view.manifest.privacy, cfg.site.policy)
    total = view.manifest.sample_count
    view.pages = max(1, -(-total // PAGE_SIZE))
    view.page = min(max(1, page), view.pages)
    view.samples = _grid(shard_root(workdir) / shard_id / SHARD_TAR, view.page)
    _filter_review(workdir, row, view)
    return view


def _grid(tar: Path, page: int) -> list[Sample]:
    start, stop = (page - 1) * PAGE_SIZE, page * PAGE_SIZE
    out = []
    for i, (key, png, meta) in enumerate(iter_samples([tar])):
        if i >= stop:
            break
        if i >= start:
            out.append(Sample(key=key, src=png_data_uri(png), caption=str(meta.get("prompt") or meta.get("class_name") or "")))
    return out


def _filter_review(workdir: Path, row: ShardRow, view: ShardView) -> None:
    """Histogram and dropped pairs from the filter stage that made this shard (refused if it changed since)."""
    fdir = WorkDir(workdir).filter_dir
    rec = read_record(workdir, "filter")
    if rec is None or sha256_file(fdir / STAGE_FILE) != row.filter_record_sha256:
        view.review_note = ("the filter stage ran again after this shard was packaged: its review data belong to "
                            "another shard (this one can no longer be exported; review the newest shard)")
        return
    decisions = fdir / "review" / DECISIONS_FILE
    if not decisions.is_file():
        view.review_note = (f"this filter output has no per-image decisions (review/{DECISIONS_FILE}; older "
                            "filter stages did not write them): `privdistill-site run --force` writes them")
        return
    with np.load(decisions, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    view.histogram = similarity_histogram_svg(d["best_similarity"], float(d["threshold"]))
    flagged = d["dropped"] if bool(d["enabled"]) else np.flatnonzero(d["reid_match"] | d["pixel_match"])
    view.flagged = int(len(flagged))
    if not len(flagged):
        return
    inputs = rec.get("inputs", {})
    for up in ("ingest", "sample"):
        up_rec = read_record(workdir, up)
        if up_rec is None or up_rec.get("outputs_hash") != inputs.get(up):
            view.review_note = (f"the {up} stage changed after the filter ran: the dropped images cannot be shown "
                                "beside their real matches")
            return
    try:
        synthetic = ImageSet.load(WorkDir(workdir).samples).images
        real = ImageSet.load(WorkDir(workdir).train_set).images
    except PrivdistillError as err:
        view.review_note = f"the filter's inputs could not be read ({err})"
        return
    for i in flagged[:MAX_PAIRS].tolist():
        by_pixel = bool(d["pixel_match"][i]) and not bool(d["reid_match"][i]) and int(d["pixel_real_index"][i]) >= 0
        partner = int(d["pixel_real_index"][i] if by_pixel else d["best_real_index"][i])
        reasons = [r for r, hit in (("re-id", d["reid_match"][i]), ("pixel copy", d["pixel_match"][i])) if hit]
        view.pairs.append(Pair(index=i, synthetic=array_uri(synthetic[i]), real=array_uri(real[partner]),
                               similarity=float(d["best_similarity"][i]), reasons=" + ".join(reasons)))
    log.debug("review.pairs", shard_id=row.shard_id, shown=len(view.pairs), flagged=view.flagged)
