"""What the coordinator accepts is decided by its own training config: prompts in another script, full-width
forms, other digits, zero-width or combining characters and homoglyphs are refused, as are words outside the
coordinator's vocabulary (whatever the manifest declares) and shards of another resolution or conditioning;
nothing of a refused shard is stored."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from test_coordinator_api import CHUNK, assert_nothing_stored, send_all, shard_files, start

from coordinator.api import create_app
from coordinator.config import CoordinatorConfig
from privdistill.data.types import ImageSet
from privdistill.identity import generate_key, public_key_b64, sign
from privdistill.shard import Conditioning, Manifest, sample_members, sha256_bytes, write_shard
from privdistill.shard_content import write_canonical_tar

A = "site-a"
RES = 8
VOCAB = ["a", "an", "bag", "cat", "image", "of"]
LEAKS = {
    "cyrillic": "an image of a Bag Иванов Иван Петрович",
    "cjk": "an image of a bag 山田太郎",
    "full_width_latin": "an image of a bag ＪＯＨＮ ＳＭＩＴＨ",
    "arabic_indic_digits": "an image of a bag ١٩٥٧-٠٣-٠٢",
    "zero_width": "an image of a b\u200bag",
    "combining": "an image of a bag\u0301",
    "homoglyph": "an image of a b\u0430g",  # CYRILLIC SMALL LETTER A
    "tab": "an image of a\tbag",
}


def make_app(tmp_path: Path, training: dict | None) -> TestClient:
    extra = {}
    if training is not None:
        (tmp_path / "training.yaml").write_text(yaml.safe_dump(training))
        extra["training_config"] = tmp_path / "training.yaml"
    cfg = CoordinatorConfig(tls={"cert": tmp_path / "x.pem", "key": tmp_path / "x.key"}, state_dir=tmp_path / "state",
                            limits={"max_chunk_bytes": CHUNK, "max_shard_bytes": 1 << 20}, **extra)
    return create_app(cfg)


def training(conditioning: str = "text", resolution: int = RES, vocabulary: list[str] = VOCAB) -> dict:
    return {"resolution": resolution, "vocabulary": vocabulary,
            "student": {"model": {"conditioning": conditioning, "block_out_channels": [8, 16], "norm_num_groups": 4}}}


@pytest.fixture(scope="module")
def key():
    return generate_key()


def crafted_text_shard(key, prompts: list[str], vocabulary: list[str], res: int = RES) -> tuple[bytes, bytes, str]:
    """What a site that bypassed its own packager could send: a canonical tar, a signed manifest."""
    n = len(prompts)
    kept = ImageSet(images=np.zeros((n, 1, res, res), np.float32), labels=np.zeros(n, np.int64),
                    class_names=["bag"], prompts=prompts)
    members = sample_members(kept, "t")
    buf = io.BytesIO()
    write_canonical_tar(members, buf)
    tar = buf.getvalue()
    m = Manifest(site_id=A, shard_id="t", created="2025-01-01T00:00:00+00:00", software_version="test",
                 config_hash="0" * 64, sample_count=n, tar_sha256=sha256_bytes(tar), tar_size=len(tar), resolution=res,
                 channels=1, members={k: sha256_bytes(d) for k, d in members},
                 conditioning=Conditioning(type="text", class_names=["bag"], vocabulary=vocabulary), privacy={})
    body = m.to_bytes()
    return tar, body, sign(key, body)


def upload(app, client, key, tar: bytes, manifest: bytes, sig: str):
    app.state.ledger.add_site(A, public_key_b64(key)) if app.state.ledger.site(A) is None else None
    r = start(client, key, A, manifest, sig)
    if r.status_code != 201:
        return r.status_code, r.json()["error"]
    last = send_all(client, key, A, r.json()["upload_id"], tar)
    return last.headers["Upload-State"], last.headers.get("Upload-Reason")


@pytest.mark.parametrize("case", sorted(LEAKS))
def test_prompts_in_other_scripts_or_forms_are_refused(tmp_path: Path, key, case: str) -> None:
    app = make_app(tmp_path, training())
    tar, manifest, sig = crafted_text_shard(key, ["an image of a bag", LEAKS[case]], VOCAB)
    with TestClient(app) as client:
        assert upload(app, client, key, tar, manifest, sig) == ("rejected", "prompt_disallowed_character")
    assert_nothing_stored(app)
    log = (app.state.config.state_dir / "audit.log").read_text()
    assert "prompt_disallowed_character" in log and LEAKS[case] not in log


def test_words_outside_the_coordinators_vocabulary_are_refused_whatever_the_manifest_declares(tmp_path, key) -> None:
    app = make_app(tmp_path, training())
    prompts = ["an image of a bag john smith"]
    with TestClient(app) as client:
        # the manifest declares the names as vocabulary: refused when the upload is created, before any byte
        tar, manifest, sig = crafted_text_shard(key, prompts, [*VOCAB, "john", "smith"])
        assert upload(app, client, key, tar, manifest, sig) == (422, "prompt_outside_vocabulary")
        # the manifest hides them: refused when the tar is checked against the coordinator's own words
        tar, manifest, sig = crafted_text_shard(key, prompts, VOCAB)
        assert upload(app, client, key, tar, manifest, sig) == ("rejected", "prompt_outside_vocabulary")
    assert_nothing_stored(app)


def test_a_manifest_declaring_non_ascii_vocabulary_is_malformed(tmp_path, key) -> None:
    app = make_app(tmp_path, training())
    tar, manifest, sig = crafted_text_shard(key, ["an image of a bag"], VOCAB)
    body = json.loads(manifest)
    body["conditioning"]["vocabulary"].append("иванов")
    raw = (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()
    with TestClient(app) as client:
        assert upload(app, client, key, tar, raw, sign(key, raw)) == (422, "malformed_manifest")
    assert_nothing_stored(app)


def test_an_allowed_text_shard_is_accepted(tmp_path, key) -> None:
    app = make_app(tmp_path, training())
    tar, manifest, sig = crafted_text_shard(key, ["an image of a bag", "An image of a Bag"], VOCAB)
    with TestClient(app) as client:
        assert upload(app, client, key, tar, manifest, sig) == ("accepted", None)
    assert len(app.state.ledger.accepted_shards()) == 1


@pytest.mark.parametrize(("config", "reason"), [
    (training(resolution=16), "resolution_mismatch"),
    (training(conditioning="class"), "conditioning_mismatch"),
    (training(vocabulary=[]), "no_prompt_vocabulary"),
])
def test_a_shard_the_training_config_cannot_train_is_refused_at_upload(tmp_path, key, config, reason) -> None:
    app = make_app(tmp_path, config)
    tar, manifest, sig = crafted_text_shard(key, ["an image of a bag"], VOCAB)
    with TestClient(app) as client:
        assert upload(app, client, key, tar, manifest, sig) == (422, reason)
    assert_nothing_stored(app)
    assert app.state.ledger.open_uploads() == []


def test_text_shards_are_refused_without_a_training_config(tmp_path, key) -> None:
    app = make_app(tmp_path, None)
    tar, manifest, sig = crafted_text_shard(key, ["an image of a bag"], VOCAB)
    with TestClient(app) as client:
        assert upload(app, client, key, tar, manifest, sig) == (422, "no_prompt_vocabulary")
    assert_nothing_stored(app)


def test_without_a_training_config_the_first_accepted_shard_fixes_the_resolution(tmp_path, key) -> None:
    app = make_app(tmp_path, None)
    rng = np.random.default_rng(0)

    def shard_at(res: int, name: str) -> tuple[bytes, bytes, str]:
        kept = ImageSet(images=rng.uniform(-1, 1, (2, 1, res, res)).astype(np.float32), labels=np.array([0, 1]),
                        class_names=["cat", "dog"])
        write_shard(kept, tmp_path / name, site_id=A, shard_id=name, config_hash="0" * 64, privacy={"kept": 2},
                    key=key)
        return shard_files(tmp_path / name)

    with TestClient(app) as client:
        assert upload(app, client, key, *shard_at(8, "s8")) == ("accepted", None)
        assert upload(app, client, key, *shard_at(16, "s16")) == (422, "resolution_mismatch")
    assert [s.shard_id for s in app.state.ledger.accepted_shards()] == ["s8"]
    assert app.state.ledger.open_uploads() == []


def test_an_unreadable_training_config_refuses_uploads(tmp_path, key) -> None:
    app = make_app(tmp_path, training())
    (tmp_path / "training.yaml").write_text("resolution: [not a number\n")
    tar, manifest, sig = crafted_text_shard(key, ["an image of a bag"], VOCAB)
    with TestClient(app) as client:
        assert upload(app, client, key, tar, manifest, sig) == (503, "coordinator_misconfigured")
    assert_nothing_stored(app)


def test_an_upload_finished_while_the_training_config_is_unreadable_waits_for_it(tmp_path, key) -> None:
    from test_coordinator_api import call

    app = make_app(tmp_path, training())
    app.state.ledger.add_site(A, public_key_b64(key))
    tar, manifest, sig = crafted_text_shard(key, ["an image of a bag"], VOCAB)
    good = (tmp_path / "training.yaml").read_text()
    with TestClient(app) as client:
        up = start(client, key, A, manifest, sig).json()["upload_id"]
        head = len(tar) - CHUNK
        send_all(client, key, A, up, tar[:head])
        (tmp_path / "training.yaml").write_text("resolution: [broken\n")
        r = call(client, key, A, "PATCH", f"/v1/uploads/{up}", tar[head:],
                 {"Upload-Offset": str(head), "Content-Type": "application/offset+octet-stream"})
        assert (r.status_code, r.json()["error"]) == (503, "coordinator_misconfigured")
        assert app.state.uploads.reconcile()["open"] == 1  # a restart does not fail on it
        assert app.state.ledger.accepted_shards() == []
        (tmp_path / "training.yaml").write_text(good)
        got = call(client, key, A, "GET", f"/v1/uploads/{up}").json()
    assert got["state"] == "accepted" and len(app.state.ledger.accepted_shards()) == 1
