"""Shard wire format: deterministic packaging, signature and per-member verification, streaming read."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from privdistill import identity, shard
from privdistill.data.types import ImageSet
from privdistill.errors import ConfigError, ShardVerificationError


def _kept(n: int = 12, seed: int = 0, prompts: bool = False) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 1, 8, 8)) / 127.5 - 1.0  # exactly representable in 8 bits
    labels = rng.integers(0, 3, n)
    names = ["Trouser", "Sneaker", "Bag"]
    return ImageSet(images=images.astype(np.float32), labels=labels, class_names=names,
                    prompts=[f"an image of a {names[i]}" for i in labels] if prompts else None)


def _write(tmp_path: Path, kept: ImageSet, key, name: str = "s", **kw) -> shard.Manifest:
    vocab = shard.prompt_vocabulary("an image of a {label}", kept.class_names)
    return shard.write_shard(kept, tmp_path / name, site_id="site-a", shard_id="site-a-000000000001",
                             config_hash="ab" * 32, privacy={"kept": len(kept)}, key=key, vocabulary=vocab, **kw)


def test_round_trip_is_lossless_and_deterministic(tmp_path: Path) -> None:
    key = identity.generate_key()
    kept = _kept(prompts=True)

    m1, m2 = _write(tmp_path, kept, key, "a"), _write(tmp_path, kept, key, "b")
    verified = shard.verify_shard_dir(tmp_path / "a", identity.public_key_b64(key))
    data = shard.load_shards([(tmp_path / "a" / shard.SHARD_TAR, verified)])

    assert m1.tar_sha256 == m2.tar_sha256 and m1.members == m2.members  # same images, same bytes
    assert m1.sample_count == 12 and len(m1.members) == 24 and m1.conditioning.type == "text"
    np.testing.assert_allclose(data.images, kept.images, atol=1e-6)
    assert data.labels.tolist() == kept.labels.tolist() and data.prompts == kept.prompts


def test_signature_from_another_key_and_edited_manifest_are_refused(tmp_path: Path) -> None:
    key, other = identity.generate_key(), identity.generate_key()
    _write(tmp_path, _kept(), key)
    d = tmp_path / "s"

    with pytest.raises(ShardVerificationError) as err:
        shard.verify_shard_dir(d, identity.public_key_b64(other))
    assert err.value.reason == "bad_manifest_signature"
    body = json.loads((d / shard.MANIFEST).read_text())
    body["privacy"]["kept"] = 999
    (d / shard.MANIFEST).write_text(json.dumps(body))
    with pytest.raises(ShardVerificationError) as err:
        shard.verify_shard_dir(d, identity.public_key_b64(key))
    assert err.value.reason == "bad_manifest_signature"


def test_a_changed_member_byte_is_found(tmp_path: Path) -> None:
    key = identity.generate_key()
    manifest = _write(tmp_path, _kept(), key)
    tar = tmp_path / "s" / shard.SHARD_TAR
    raw = bytearray(tar.read_bytes())
    raw[700] ^= 0xFF  # inside the first member's data
    tar.write_bytes(bytes(raw))

    with pytest.raises(ShardVerificationError) as err:
        shard.verify_tar(tar, manifest)
    assert err.value.reason == "hash_mismatch"


@pytest.mark.parametrize(("name", "reason"), [
    ("/etc/passwd", "unsafe_member_name"),
    ("../x.png", "unsafe_member_name"),
    ("dir/x.png", "unsafe_member_name"),
    ("x.txt", "non_png_member"),
    ("x.png.sh", "non_png_member"),
])
def test_unsafe_or_foreign_member_names_are_refused(tmp_path: Path, name: str, reason: str) -> None:
    manifest = _write(tmp_path, _kept(n=1), identity.generate_key())
    members = dict(manifest.members)
    members[name] = members.pop(next(iter(members)))
    body = manifest.model_dump(mode="json") | {"members": members}

    with pytest.raises(ShardVerificationError) as err:
        shard.parse_manifest(json.dumps(body).encode())
    assert err.value.reason == reason


def test_tar_with_duplicate_member_is_refused(tmp_path: Path) -> None:
    kept = _kept(n=1)
    members = shard.sample_members(kept, "k")
    tar_path = tmp_path / "dup.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members + members[:1]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    manifest = shard.Manifest(
        site_id="a", shard_id="k", created="2025-01-01T00:00:00Z", software_version="0", config_hash="0" * 64, sample_count=1,
        tar_sha256=shard.sha256_path(tar_path), tar_size=tar_path.stat().st_size, resolution=8, channels=1,
        members={n: shard.sha256_bytes(d) for n, d in members},
        conditioning=shard.Conditioning(type="class", class_names=kept.class_names), privacy={},
    )
    with pytest.raises(ShardVerificationError) as err:
        shard.verify_tar(tar_path, manifest)
    assert err.value.reason == "duplicate_member"


def test_prompts_outside_the_vocabulary_are_not_packaged(tmp_path: Path) -> None:
    kept = _kept(n=3, prompts=True)
    kept.prompts[1] = "Trouser, patient John Doe, 54, seen 2024-03-01"

    with pytest.raises(ShardVerificationError) as err:
        _write(tmp_path, kept, identity.generate_key())
    assert err.value.reason == "prompt_outside_vocabulary"
    assert not (tmp_path / "s").exists() and not list(tmp_path.iterdir())  # nothing half-written
    assert shard.words_outside(kept.prompts, shard.prompt_vocabulary("an image of a {label}", kept.class_names)) \
        == ["01", "03", "2024", "54", "doe", "john", "patient", "seen"]


def test_real_images_with_patient_ids_are_never_packaged(tmp_path: Path) -> None:
    real = _kept(n=2)
    real.patient_ids = np.asarray(["P1", "P2"])
    with pytest.raises(ShardVerificationError) as err:
        _write(tmp_path, real, identity.generate_key())
    assert err.value.reason == "real_data"


def test_signed_requests_verify_and_reject_tampering() -> None:
    key = identity.generate_key()
    pub = identity.public_key_b64(key)
    body = b'{"x": 1}'
    headers = {"Host": "coord:8443", **identity.sign_request(
        key, "site-a", "PATCH", "/v1/uploads/u", body, host="coord:8443", content_type="application/json",
        upload_offset=4096, now=1_000_000)}
    assert headers["Upload-Offset"] == "4096" and headers["Content-Type"] == "application/json"
    assert len(headers[identity.H_NONCE]) == 32

    identity.verify_request(headers, "PATCH", "/v1/uploads/u", body, pub, now=1_000_100)
    other = identity.public_key_b64(identity.generate_key())
    cases = [
        ((headers, "PATCH", "/v1/uploads/u", b'{"x": 2}', pub, 1_000_000), "body_hash_mismatch"),
        ((headers, "POST", "/v1/uploads/u", body, pub, 1_000_000), "bad_signature"),
        ((headers, "PATCH", "/v1/uploads/u?x=1", body, pub, 1_000_000), "bad_signature"),
        ((headers, "PATCH", "/v1/uploads/u", body, other, 1_000_000), "bad_signature"),
        (({**headers, "Host": "evil:8443"}, "PATCH", "/v1/uploads/u", body, pub, 1_000_000), "bad_signature"),
        (({**headers, "Upload-Offset": "0"}, "PATCH", "/v1/uploads/u", body, pub, 1_000_000), "bad_signature"),
        (({**headers, "Content-Type": "text/plain"}, "PATCH", "/v1/uploads/u", body, pub, 1_000_000), "bad_signature"),
        (({**headers, identity.H_NONCE: "ab" * 16}, "PATCH", "/v1/uploads/u", body, pub, 1_000_000), "bad_signature"),
        ((headers, "PATCH", "/v1/uploads/u", body, pub, 1_000_301), "expired_timestamp"),  # 301 s old
        ((headers, "PATCH", "/v1/uploads/u", body, pub, 1_000_000 - 31), "expired_timestamp"),  # 31 s ahead
        (({k: v for k, v in headers.items() if k != identity.H_SIG}, "PATCH", "/v1/uploads/u", body, pub, 1_000_000),
         "missing_auth_headers"),
        (({k: v for k, v in headers.items() if k != identity.H_NONCE}, "PATCH", "/v1/uploads/u", body, pub,
          1_000_000), "missing_auth_headers"),
    ]
    for (h, method, path, b, p, now), reason in cases:
        with pytest.raises(ShardVerificationError) as err:
            identity.verify_request(h, method, path, b, p, now=now)
        assert err.value.reason == reason, (method, path, h.get("Host"), now)
    identity.verify_request(headers, "PATCH", "/v1/uploads/u", body, pub, now=1_000_000 - 30)  # 30 s ahead: allowed


def test_private_key_file_is_0600_and_loose_modes_are_refused(tmp_path: Path) -> None:
    key = identity.generate_key()
    path = tmp_path / "site.key"
    identity.save_private_key(key, path)

    assert path.stat().st_mode & 0o777 == 0o600
    assert identity.public_key_b64(identity.load_private_key(path)) == identity.public_key_b64(key)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        identity.load_private_key(path)


@pytest.mark.parametrize(("privacy", "why"), [
    ({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": 1}}}}}}}}, "deeper than 8"),
    ({"note": "x" * 401}, "short printable ASCII"),
    ({"note": "Иванов"}, "short printable ASCII"),
    ({"notes": [f"s{i}" for i in range(60)], "more": [f"t{i}" for i in range(60)], "x": [f"u{i}" for i in range(9)]},
     "short printable ASCII"),
    # the typed privacy report: a known field with the wrong type
    ({"kept": "Smith, John"}, "privacy-report schema"),
    ({"audit": {"recall": {"exact": {"value": "John", "n": 3}}}}, "privacy-report schema"),
    ({"Patient Name": 1}, "snake_case"),
    ({"blob": list(range(65))}, "more than 64 items"),
    ({"blob": [[0.123456789] * 60] * 60}, "bytes"),
    ({"kept": object()}, "only numbers"),
])
def test_the_privacy_section_is_bounded(privacy: dict, why: str) -> None:
    from privdistill.shard_content import validate_privacy_section

    with pytest.raises(ValueError, match=why):
        validate_privacy_section(privacy)


def test_a_manifest_with_an_unbounded_privacy_section_is_malformed(tmp_path: Path) -> None:
    manifest = _write(tmp_path, _kept(n=1), identity.generate_key())
    body = manifest.model_dump(mode="json")
    body["privacy"]["free_text"] = "x" * 500
    with pytest.raises(ShardVerificationError) as err:
        shard.parse_manifest(json.dumps(body).encode())
    assert err.value.reason == "malformed_manifest" and "privacy" in str(err.value)
    with pytest.raises(ShardVerificationError) as err:  # the packager refuses to write it in the first place
        shard.write_shard(_kept(n=1), tmp_path / "t", site_id="site-a", shard_id="site-a-1", config_hash="ab" * 32,
                          privacy={"deep": {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}}, key=identity.generate_key())
    assert err.value.reason == "malformed_manifest" and not (tmp_path / "t").exists()


def test_the_packager_writes_canonical_shards_the_verifier_accepts(tmp_path: Path) -> None:
    from privdistill.shard_content import check_png

    key = identity.generate_key()
    kept = _kept(n=3, prompts=True)
    m = _write(tmp_path, kept, key)
    assert (m.resolution, m.channels, m.format) == (8, 1, "privdistill-shard/2")
    with tarfile.open(tmp_path / "s" / shard.SHARD_TAR) as tar:
        infos = tar.getmembers()
        assert [i.name for i in infos] == [f"site-a-000000000001_{i:06d}.{e}" for i in range(3) for e in ("png", "json")]
        assert {(i.uname, i.gname, i.mode, i.mtime, i.uid, i.gid) for i in infos} == {("", "", 0o644, 0, 0, 0)}
        check_png("x.png", tar.extractfile(infos[0]).read(), resolution=8, channels=1)
    rgb = ImageSet(images=np.zeros((2, 3, 8, 8), np.float32), labels=np.array([0, 1]), class_names=["a", "b"])
    m3 = shard.write_shard(rgb, tmp_path / "rgb", site_id="site-a", shard_id="rgb", config_hash="ab" * 32,
                           privacy={}, key=key)
    shard.verify_shard_dir(tmp_path / "rgb", identity.public_key_b64(key))
    assert (m3.resolution, m3.channels) == (8, 3)


def test_class_names_outside_the_character_set_are_not_packaged(tmp_path: Path) -> None:
    kept = _kept(n=2)
    kept.class_names = ["Trouser", "Иванов", "Bag"]
    with pytest.raises(ShardVerificationError) as err:
        _write(tmp_path, kept, identity.generate_key())
    assert err.value.reason == "malformed_manifest" and "class name 2" in str(err.value)
    assert "Иванов" not in str(err.value) and not (tmp_path / "s").exists()


@pytest.mark.parametrize(("field", "value"), [
    ("created", "2025-01-01 Ivanov Ivan"),
    ("software_version", "0.1 John Smith"),
    ("conditioning", {"type": "class", "class_names": ["Trouser", "Sneaker", "Bag"], "vocabulary": ["john", "smith"]}),
    ("conditioning", {"type": "none", "class_names": ["John Smith"]}),
])
def test_manifest_fields_carry_no_free_text(tmp_path: Path, field: str, value: object) -> None:
    manifest = _write(tmp_path, _kept(n=1), identity.generate_key())
    body = manifest.model_dump(mode="json") | {field: value}
    with pytest.raises(ShardVerificationError) as err:
        shard.parse_manifest(json.dumps(body).encode())
    assert err.value.reason == "malformed_manifest" and field in str(err.value)
    assert "Ivanov" not in str(err.value) and "John" not in str(err.value)
