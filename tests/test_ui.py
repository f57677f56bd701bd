"""The review pages (TestClient): login with the token, CSRF on every POST, what the site page shows about a shard
(its images, the filter histogram, dropped images beside their nearest real image, the policy verdict),
approve/reject through the same functions as the CLI, and the coordinator's admin page."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _fixtures import FMNIST
from fastapi.testclient import TestClient

from privdistill.data.types import ImageSet
from privdistill.errors import ConfigError
from privdistill.stages import Stage, run_stage
from privdistill.web.plots import histogram_svg, line_svg
from privdistill.web.session import read_token_file

pytestmark = pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST not installed")

TOKEN = "test-token-0123456789abcdef"
N_DROPPED = 4


# ----------------------------------------------------------------------------- a site whose filter really ran
def review_site(root: Path, reid_src: Path) -> Any:  # test_export_gate.Site
    """make_site's work directory, with the filter stage re-run by the real filter (dropping the 4 synthetic
    images most similar to a real one), then packaged into a shard waiting for review."""
    from test_export_gate import filter_report, make_site

    from privdistill.filter import best_matches, filter_synthetic, write_filter_outputs
    from privdistill.reid import OnnxEmbedder

    site = make_site(root, reid_src)
    samples = ImageSet.load(site.workdir / "sample" / "samples.npz")
    embed = OnnxEmbedder(reid_src / "reid.onnx").embed
    sims, _ = best_matches(embed(samples.images), embed(site.train.images), 256)
    threshold = float(np.sort(sims)[-N_DROPPED])

    def body(ctx: Any) -> dict:
        result = filter_synthetic(samples, site.train, embed=embed, threshold=threshold, cfg=site.cfg.filter)
        return write_filter_outputs(result, samples, site.train, ctx.out, calibration={"tpr": 0.95, "fpr": 0.01},
                                    extra={"audit": filter_report(0, 0)["audit"]})

    from site_agent.records import stage_record_key

    run_stage(Stage("filter", body, ("ingest", "sample", "train-reid"), {"test": "review"}), site.workdir, force=True,
              record_key=stage_record_key(site.key))
    site.shard_id = site.package()["shard_id"]
    return site


@pytest.fixture
def rsite(tmp_path: Path, reid_src: Path) -> Any:
    return review_site(tmp_path / "site", reid_src)


def site_client(site: Any) -> TestClient:
    from site_agent.ui.app import create_app

    return TestClient(create_app(site.cfg, site.workdir, token=TOKEN), base_url="http://127.0.0.1")


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "no CSRF field in the page"
    return m.group(1)


def login(client: TestClient, *, prefix: str = "", name: str = "steward", token: str = TOKEN) -> Any:
    form = client.get(f"{prefix}/login")
    assert form.status_code == 200
    return client.post(f"{prefix}/login", data={"csrf": csrf_of(form.text), "token": token, "name": name},
                       follow_redirects=False)


def decode(uri: str) -> np.ndarray:
    from PIL import Image

    assert uri.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        return np.asarray(im)


# ----------------------------------------------------------------------------- site: access control
def test_pages_need_the_token_and_posts_need_the_csrf_token(rsite: Any) -> None:
    from site_agent.state import SiteState

    c = site_client(rsite)
    assert c.get("/healthz").json()["status"] == "ok"
    for path in ("/", f"/shards/{rsite.shard_id}", "/audit"):
        r = c.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login", path
    assert c.post(f"/shards/{rsite.shard_id}/approve", data={"csrf": "x"}).status_code == 401

    form = c.get("/login")
    assert c.post("/login", data={"token": TOKEN}).status_code == 403  # login form without its CSRF token
    bad = c.post("/login", data={"csrf": csrf_of(form.text), "token": "wrong-token-wrong-token"})
    assert bad.status_code == 401 and "wrong access token" in bad.text
    pre_login_cookie = c.cookies.get("privdistill_review")

    ok = login(c)
    assert ok.status_code == 303 and ok.headers["location"] == "/"
    cookie = ok.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert c.cookies.get("privdistill_review") != pre_login_cookie, "a new session id after login"
    page = c.get(f"/shards/{rsite.shard_id}")
    assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"

    for data in ({}, {"csrf": "forged"}):  # logged in, but no or a wrong CSRF token
        assert c.post(f"/shards/{rsite.shard_id}/approve", data=data).status_code == 403
    assert SiteState(rsite.workdir).require(rsite.shard_id).state == "packaged"

    stale = TestClient(c.app, base_url="http://127.0.0.1", cookies={"privdistill_review": pre_login_cookie})
    assert stale.get("/", follow_redirects=False).status_code == 303, "the pre-login session is worth nothing"


def test_token_file_must_be_private_and_long(tmp_path: Path) -> None:
    p = tmp_path / "token"
    p.write_text(TOKEN + "\n")
    p.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_token_file(p)
    p.chmod(0o600)
    assert read_token_file(p) == TOKEN
    p.write_text("short\n")
    with pytest.raises(ConfigError, match="at least 16"):
        read_token_file(p)
    with pytest.raises(ConfigError, match="does not exist"):
        read_token_file(tmp_path / "missing")


def test_listening_beyond_loopback_is_warned_about(site: Any) -> None:
    from structlog.testing import capture_logs

    from site_agent.ui.server import build_server, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("ui.example")
    with capture_logs() as logs:
        build_server(site.cfg, site.workdir, host="127.0.0.1", port=0, token=TOKEN)
    assert not [e for e in logs if e["log_level"] == "warning"]
    with capture_logs() as logs:
        server = build_server(site.cfg, site.workdir, host="0.0.0.0", port=0, token=TOKEN)  # built, never started
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["ui.listening_beyond_loopback"]
    assert server.config.host == "0.0.0.0" and not server.started


# ----------------------------------------------------------------------------- site: what a steward sees
def test_shard_page_shows_the_shard_images_histogram_dropped_pairs_and_verdict(rsite: Any) -> None:
    from privdistill.filter import DECISIONS_FILE
    from privdistill.imaging import to_uint8
    from privdistill.shard import SHARD_TAR, iter_samples

    c = site_client(rsite)
    login(c)
    listing = c.get("/").text
    assert rsite.shard_id in listing and "state-packaged" in listing

    html = c.get(f"/shards/{rsite.shard_id}").text
    grid = html.split('id="grid"')[1].split("</div>")[0]
    srcs = re.findall(r'<img src="([^"]+)"', grid)
    tar = rsite.workdir / "shards" / rsite.shard_id / SHARD_TAR
    pngs = [png for _, png, _ in iter_samples([tar])]
    assert len(srcs) == len(pngs) == 12 - N_DROPPED
    assert [base64.b64decode(s.split(",", 1)[1]) for s in srcs] == pngs, "the grid shows exactly the shard's PNGs"

    with np.load(rsite.workdir / "filter" / "review" / DECISIONS_FILE) as z:
        d = {k: z[k] for k in z.files}
    assert sorted(d["dropped"].tolist()) == sorted(np.argsort(d["best_similarity"])[-N_DROPPED:].tolist())
    svg = html.split("<svg")[1].split("</svg>")[0]
    counts, _ = np.histogram(d["best_similarity"], bins=40)
    assert svg.count('class="bar"') == int((counts > 0).sum()) and f"threshold {float(d['threshold']):.3f}" in svg

    pairs = re.findall(r'<img src="([^"]+)" alt="synthetic (\d+)"><img src="([^"]+)" alt="nearest real image">', html)
    assert len(pairs) == N_DROPPED
    samples = ImageSet.load(rsite.workdir / "sample" / "samples.npz").images
    for syn_uri, idx, real_uri in pairs:
        i = int(idx)
        assert i in d["dropped"]
        np.testing.assert_array_equal(decode(syn_uri), to_uint8(samples[i : i + 1])[0])
        np.testing.assert_array_equal(decode(real_uri), to_uint8(rsite.train.images[d["best_real_index"][i]][None])[0])
    assert 'id="verdict">passed' in html and "signature and every member hash verified" in html
    assert "kept_memorization_rate" in html and 'id="approve"' in html


def test_approve_and_reject_use_the_cli_functions_and_are_audited(rsite: Any, reid_src: Path, tmp_path: Path) -> None:
    from site_agent.audit_log import read_audit
    from site_agent.state import SiteState

    c = site_client(rsite)
    login(c, name="dr.jones")
    page = c.get(f"/shards/{rsite.shard_id}").text
    r = c.post(f"/shards/{rsite.shard_id}/approve", data={"csrf": csrf_of(page)}, follow_redirects=False)
    assert r.status_code == 303
    row = SiteState(rsite.workdir).require(rsite.shard_id)
    assert (row.state, row.approved_by) == ("approved", "ui:dr.jones")
    rec = [a for a in read_audit(rsite.workdir) if a["event"] == "approved"]
    assert len(rec) == 1 and rec[0]["by"] == "ui:dr.jones" and rec[0]["manifest_sha256"] == row.manifest_sha256
    after = c.get(f"/shards/{rsite.shard_id}").text
    assert 'id="state">approved' in after and 'id="approve"' not in after
    again = c.post(f"/shards/{rsite.shard_id}/approve", data={"csrf": csrf_of(page)})
    assert again.status_code == 409 and "only a packaged shard can be approved" in again.text

    assert c.post(f"/shards/{rsite.shard_id}/reject", data={"csrf": csrf_of(page), "reason": "  "}).status_code == 400
    assert SiteState(rsite.workdir).require(rsite.shard_id).state == "approved"
    r = c.post(f"/shards/{rsite.shard_id}/reject", data={"csrf": csrf_of(page), "reason": "blurry <b>copies</b>"})
    assert r.status_code == 200 and "blurry &lt;b&gt;copies&lt;/b&gt;" in r.text  # followed redirect, escaped
    row = SiteState(rsite.workdir).require(rsite.shard_id)
    assert (row.state, row.reason) == ("rejected", "blurry <b>copies</b>")
    audit_page = c.get("/audit").text
    assert audit_page.index("event-rejected") < audit_page.index("event-approved"), "newest first"
    assert audit_page.count("ui:dr.jones") == 2


def test_a_filter_output_without_decisions_says_how_to_get_them(site: Any) -> None:
    sid = site.package()["shard_id"]
    c = site_client(site)
    login(c)
    html = c.get(f"/shards/{sid}").text
    assert "has no per-image decisions" in html and "<svg" not in html
    assert c.get("/shards/no-such-shard").status_code == 404
    assert c.get("/shards/..%2Fetc").status_code == 404


def test_login_is_throttled_after_repeated_wrong_tokens(rsite: Any) -> None:
    c = site_client(rsite)
    codes = [login(c, token=f"wrong-{i:02d}-xxxxxxxxxxxx").status_code for i in range(11)]
    assert codes[:10] == [401] * 10 and codes[10] == 429
    # the right token is never refused, even from the throttled address (every local process shares 127.0.0.1)
    assert login(c).status_code == 303


# ----------------------------------------------------------------------------- svg plots
def test_svg_plots_draw_every_bin_and_point() -> None:
    values = np.array([0.1, 0.1, 0.2, 0.9, np.nan])
    svg = histogram_svg(values, threshold=0.5, bins=4)
    assert svg.count('class="bar"') == 2 and "threshold 0.500" in svg and svg.startswith("<svg")
    assert ": 3</title></rect>" in svg and ": 1</title></rect>" in svg  # bins 0.2 wide from 0.1 to 0.9
    line = line_svg([(1, 0.5), (2, 0.25), (3, float("nan"))], xlabel="step", ylabel="loss", title="loss <curve>")
    assert line.count('class="point"') == 2 and "loss &lt;curve&gt;" in line
    assert "no data" in line_svg([])


# ----------------------------------------------------------------------------- coordinator: the /admin page
ADMIN_TOKEN = "admin-token-0123456789abcdef"


def build_coordinator(root: Path) -> dict[str, Any]:
    """A coordinator state with two accepted shards (two sites) and one rejected upload, a tiny student trained,
    evaluated and released from them, and a coordinator.yaml naming all of it plus an admin token file."""
    import hashlib
    import json

    import yaml
    from test_coordinator_student import _accept_into_ledger, _cfg, _reference, _shard

    from coordinator.ledger import Ledger
    from coordinator.release import release
    from coordinator.student import ShardRef, evaluate_student, parse_training_config, train_student

    state = root / "state"
    shards = [_shard(root / "made", "site-a", "a1", seed=1), _shard(root / "made", "site-b", "b1", seed=2)]
    for s in shards:
        _accept_into_ledger(state, s)
    bad = _shard(root / "made", "site-b", "b2", seed=3)
    ledger = Ledger(state / "ledger.sqlite")
    body = (bad / "manifest.json").read_text()
    m = json.loads(body)
    upload_id = hashlib.sha256(body.encode()).hexdigest()[:32]
    ledger.create_upload(upload_id, "site-b", m["tar_sha256"], m["tar_size"], body, "sig")
    ledger.reject(upload_id, "hash_mismatch")
    ledger.touch_site("site-a")

    raw = _cfg(_reference(root / "reference.npz"))
    raw["student"]["train"].update(steps=8, log_every=1, checkpoint_every=100)
    training_yaml = root / "training.yaml"
    training_yaml.write_text(yaml.safe_dump(raw))
    cfg = parse_training_config(raw)
    refs = [ShardRef(a.dir, a.tar_sha256, a.manifest_sha256) for a in ledger.accepted_shards()]
    train_student(refs, cfg, root / "work")
    evaluate_student(refs, cfg, root / "work")
    rel = release(root / "work", root / "releases", cfg, shards=refs)

    token = root / "admin_token"
    token.write_text(ADMIN_TOKEN + "\n")
    token.chmod(0o600)
    coord = {"tls": {"cert": "server.pem", "key": "server.key"}, "state_dir": "state", "admin_token_file": "admin_token",
             "student_workdir": "work", "releases_dir": "releases", "training_config": "training.yaml"}
    (root / "coordinator.yaml").write_text(yaml.safe_dump(coord))
    return {"root": root, "config": root / "coordinator.yaml", "release": rel, "work": root / "work"}


@pytest.fixture(scope="module")
def coordinator_state(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Any]:
    return build_coordinator(tmp_path_factory.mktemp("coordinator"))


def admin_client(config_path: Path) -> TestClient:
    from coordinator.api import create_app
    from coordinator.config import load_coordinator_config

    return TestClient(create_app(load_coordinator_config(config_path)), base_url="https://127.0.0.1")


def test_admin_page_is_off_without_a_token_file_and_never_in_the_openapi_schema(coordinator_state: dict,
                                                                                 tmp_path: Path) -> None:
    import yaml

    from coordinator.api import create_app
    from coordinator.config import CoordinatorConfig

    off = create_app(CoordinatorConfig(tls={"cert": tmp_path / "c", "key": tmp_path / "k"}, state_dir=tmp_path / "s"))
    c = TestClient(off, base_url="https://127.0.0.1")
    assert c.get("/admin", follow_redirects=False).status_code == 404
    assert c.get("/admin/login").status_code == 404
    on = admin_client(coordinator_state["config"])
    assert on.get("/admin/login").status_code == 200
    assert on.get("/openapi.json").json()["paths"] == c.get("/openapi.json").json()["paths"]
    assert not [p for p in on.get("/openapi.json").json()["paths"] if p.startswith("/admin")]

    raw = yaml.safe_load(coordinator_state["config"].read_text())
    loose = tmp_path / "loose_token"
    loose.write_text(ADMIN_TOKEN)
    loose.chmod(0o644)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**raw, "state_dir": str(tmp_path / "s2"),
                                                     "admin_token_file": str(loose)}))
    with pytest.raises(ConfigError, match="chmod 600"):
        admin_client(tmp_path / "c.yaml")


def test_admin_page_shows_sites_shards_loss_curve_samples_and_gate(coordinator_state: dict) -> None:
    import json

    c = admin_client(coordinator_state["config"])
    assert c.get("/admin/", follow_redirects=False).headers["location"] == "/admin/login"
    assert c.post("/admin/logout", data={"csrf": "x"}).status_code == 401
    r = login(c, prefix="/admin", token=ADMIN_TOKEN, name="ops")
    assert r.status_code == 303 and r.headers["location"] == "/admin/"
    cookie = r.headers["set-cookie"]
    assert "Path=/admin" in cookie and "Secure" in cookie and "HttpOnly" in cookie
    assert c.post("/admin/logout", data={}).status_code == 403

    html = c.get("/admin/").text
    sites = html.split('id="sites"')[1].split("</table>")[0]
    assert sites.count("<tr data-site=") == 2 and "never" in sites.split('data-site="site-b"')[1]
    assert html.split('id="accepted"')[1].split("</table>")[0].count("<tr><td>") == 2
    rejected = html.split('id="rejected"')[1].split("</table>")[0]
    assert "hash_mismatch" in rejected and "b2" in rejected

    training = json.loads((coordinator_state["work"] / "train-student" / "training.json").read_text())
    curve = training["train"]["loss_curve"]
    assert len(curve) == 8
    loss = html.split('id="loss"')[1].split("</svg>")[0]
    assert loss.count('class="point"') == len(curve) and "<polyline" in loss
    assert f"{curve[-1][1]:.3g}" in loss, "the last point's tooltip carries the final loss"

    samples = re.search(r'<img class="samples" id="samples" src="([^"]+)"', html).group(1)
    assert base64.b64decode(samples.split(",", 1)[1]) == (coordinator_state["release"] / "samples_grid.png").read_bytes()
    assert 'id="gate">passes' in html and "tiny-student v1" in html
    assert 'id="training-state">trained' in html and 'id="steps">8</span> of 8' in html
