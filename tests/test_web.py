"""The shared web pieces without a model: the security-headers middleware (prefix, Host check), the SVG plots as a
file, the report page's template and the model card's Hugging Face metadata header."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.testclient import TestClient

from privdistill.web.plots import similarity_histogram_svg, write_similarity_histogram
from privdistill.web.security import SECURITY_HEADERS, SecurityHeaders

SVG = "{http://www.w3.org/2000/svg}"


def _app(**kw: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(SecurityHeaders, **kw)

    @app.get("/admin/page")
    def page() -> PlainTextResponse:
        return PlainTextResponse("page", headers={"Cache-Control": "private"})

    @app.get("/api")
    def api() -> JSONResponse:
        return JSONResponse({"ok": True})

    return app


def test_security_headers_cover_the_prefix_only_and_keep_a_routes_own_value() -> None:
    c = TestClient(_app(prefix="/admin"))
    page, api, other = c.get("/admin/page"), c.get("/api"), c.get("/administrator")
    assert page.headers["content-security-policy"] == SECURITY_HEADERS["Content-Security-Policy"]
    assert "script-src" not in page.headers["content-security-policy"]  # default-src 'none': no script at all
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "private"
    assert "content-security-policy" not in api.headers and "x-frame-options" not in api.headers
    assert other.status_code == 404 and "content-security-policy" not in other.headers  # a prefix, not a substring
    everywhere = TestClient(_app())
    assert everywhere.get("/api").headers["referrer-policy"] == "no-referrer"


def test_a_foreign_host_is_refused_with_the_headers_and_without_running_the_route() -> None:
    c = TestClient(_app(allowed_hosts=["localhost", "review.example"], refusal="use the review host"),
                   base_url="http://review.example:8765")
    assert c.get("/api").status_code == 200
    bad = c.get("/api", headers={"Host": "evil.example"})
    assert (bad.status_code, bad.text) == (421, "use the review host")
    assert bad.headers["x-content-type-options"] == "nosniff"


def test_the_similarity_histogram_file_is_a_standalone_svg(tmp_path: Path) -> None:
    sims = np.random.default_rng(0).uniform(0.2, 0.9, 300)
    write_similarity_histogram(sims, 0.8, tmp_path / "h.svg")
    root = ET.parse(tmp_path / "h.svg").getroot()  # well-formed XML with the SVG namespace
    assert root.tag == f"{SVG}svg" and not list(root.iter(f"{SVG}style"))
    bars = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "bar"]
    counts, _ = np.histogram(sims, bins=40, range=(sims.min(), sims.max()))
    assert len(bars) == int((counts > 0).sum()) and all(b.get("fill") == "#4c8ed9" for b in bars)
    assert [t.text for t in root.iter(f"{SVG}text") if t.get("class") == "threshold"] == ["threshold 0.800"]
    assert not list(tmp_path.glob("*.tmp"))
    # a filter without a plain re-id detector has no threshold on this scale: no line, and no error
    assert 'class="threshold"' not in similarity_histogram_svg(sims, float("inf"))


def test_report_page_inlines_the_shared_stylesheet_and_escapes(tmp_path: Path) -> None:
    from privdistill.report import render_html
    from privdistill.web.render import PAGES_CSS

    page = render_html({"name": "run <1>", "student": {"reid_rate": 0.015625, "n": 3}}, {})
    assert "<title>run &lt;1&gt;</title>" in page and "<h1>run &lt;1&gt;</h1>" in page
    assert PAGES_CSS.read_text().splitlines()[1] in page and "<link" not in page
    assert '<td class="num">0.01562</td>' in page and '<th>n</th><td class="num">3</td>' in page


@pytest.mark.parametrize("conditioning,layout,tag,library", [
    ("class", "diffusers save_pretrained (unet/)", None, None),
    ("text", "diffusers pipeline folder; open with diffusers.DiffusionPipeline.from_pretrained(<dir>)",
     "text-to-image", "diffusers"),
])
def test_model_card_has_a_hub_metadata_header(conditioning: str, layout: str, tag: str | None,
                                              library: str | None) -> None:
    from huggingface_hub import ModelCard

    from coordinator.model_card import NOT_MEASURED, render_model_card

    rec = {"name": "tiny", "version": 2, "released_at": "2026-01-01T00:00:00+00:00", "software_version": "9.9",
           "model": {"conditioning": conditioning, "class_names": ["a", "b"], "resolution": 16, "channels": 1,
                     "parameters": 1000, "layout": layout},
           "training_data": {"n_samples": 7, "sites": ["site-a"], "shards": [
               {"site": "site-a", "shard_id": "s1", "tar_sha256": "ab" * 32, "sample_count": 7,
                "privacy": {"kept": 7, "dropped": 1, "filter_enabled": True}}]},
           "training": {"steps": 8, "final_loss": 0.25, "device": "cpu", "config": {"steps": 8}},
           "evaluation": {"fid_domain": 3.5, "reference": {"configured": False}, "privacy": {"note": "at the sites"}},
           "policy": {"max_copy_rate": 0.01, "failures": []}, "not_measured": NOT_MEASURED}
    text = render_model_card(rec)
    card = ModelCard(text)
    meta = card.data.to_dict()
    assert meta["model_name"] == "tiny v2" and "privdistill" in meta["tags"]
    assert meta.get("pipeline_tag") == tag and meta.get("library_name") == library
    assert meta["privdistill"]["sites"] == ["site-a"]
    body = card.text
    assert body.lstrip().startswith("# tiny v2 — privdistill student diffusion model")
    assert "| site-a | s1 | `" + "ab" * 32 + "` | 7 | on |" in body and "Not for diagnosis" in body
    assert "- fid_domain vs the training shards: 3.500" in body and "max_copy_rate = 0.010 — passed" in body
    assert all(f"- {item}" in body for item in NOT_MEASURED) and text.endswith("sha256sum -c SHA256SUMS`).\n")
