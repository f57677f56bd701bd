"""Site config: the run config plus `site:`, every problem listed at once, production rules, the template."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from _fixtures import FMNIST
from structlog.testing import capture_logs

from privdistill import identity
from privdistill.errors import ConfigError
from privdistill.pipeline import build_stage
from site_agent.config import (
    SiteConfig,
    load_site_config,
    parse_site_config,
    read_connection,
    render_template,
    shard_config_hash,
)

DATA = {"source": {"type": "idx", "images": str(FMNIST / "train-images-idx3-ubyte.gz")}, "resolution": 28}


def _files(tmp_path: Path) -> dict[str, str]:
    identity.save_private_key(identity.generate_key(), tmp_path / "site.key")
    (tmp_path / "ca.pem").write_text("ca\n")
    return {"id": "site-a", "coordinator_url": "https://127.0.0.1:8443", "ca_file": "ca.pem", "key_file": "site.key"}


def test_every_problem_of_the_run_and_site_parts_is_listed_at_once(tmp_path: Path) -> None:
    # Prepare
    raw = {
        "data": {**DATA, "resolutoin": 28},
        "sample": {"per_class": 0},
        "site": {"id": "Site A", "coordinator_url": "http://coord:80", "ca_file": "ca.pem", "key_file": "k",
                 "approval": "sometimes", "vocabulary_extra": ["two words"],
                 "policy": {"max_kept_memorization_rate": 2, "min_kept": 0, "max_recall": 1}},
    }
    # Execute
    with pytest.raises(ConfigError) as exc:
        parse_site_config(raw, base_dir=tmp_path)
    # Assert
    joined = "\n".join(exc.value.problems)
    assert len(exc.value.problems) == 11, joined
    for where in ("data.resolutoin: unknown key; did you mean `resolution`?", "sample.per_class: must be at least 1",
                  "site.id: use 1 to 63 lower-case letters", "site.coordinator_url: must be an https",
                  "site.approval: must be 'manual' or 'auto' (got 'sometimes')", "site.vocabulary_extra",
                  "site.policy.max_kept_memorization_rate", "site.policy.min_kept", "site.policy.max_recall: unknown key",
                  f"site.ca_file: file not found: {tmp_path / 'ca.pem'}", "site.key_file: file not found"):
        assert where in joined  # the site's files are checked although the site section has other mistakes


def test_file_and_production_problems_are_listed_together(tmp_path: Path) -> None:
    raw = {"data": {**DATA, "test_source": {"type": "idx", "images": "missing.gz"}}, "filter": {"enabled": False},
           "site": {"id": "site-a", "coordinator_url": "https://c:1", "ca_file": "ca.pem", "key_file": "site.key",
                    "policy": {"require_filter": False}}}
    with pytest.raises(ConfigError) as exc:
        parse_site_config(raw, base_dir=tmp_path)
    joined = "\n".join(exc.value.problems)
    assert len(exc.value.problems) == 5, joined
    assert "data.test_source.images: path does not exist" in joined
    assert f"site.ca_file: file not found: {tmp_path / 'ca.pem'}" in joined
    assert "site.key_file: file not found" in joined
    assert "filter.enabled: false lets unfiltered synthetic images leave the site" in joined
    assert "site.policy.require_filter: false" in joined


def test_production_refuses_a_disabled_filter_and_a_test_site_only_warns(tmp_path: Path) -> None:
    site = _files(tmp_path)
    raw = {"data": DATA, "filter": {"enabled": False}, "site": site}
    with pytest.raises(ConfigError, match="filter.enabled: false") as exc:
        parse_site_config(raw, base_dir=tmp_path)
    assert len(exc.value.problems) == 1

    with capture_logs() as logs:
        cfg = parse_site_config({**raw, "site": {**site, "production": False}}, base_dir=tmp_path)
    assert cfg.filter.enabled is False
    warned = [e for e in logs if e["log_level"] == "warning"]
    assert len(warned) == 1 and "filter.enabled" in warned[0]["problem"]


def test_a_test_site_may_lack_its_key_but_not_have_a_readable_one(tmp_path: Path) -> None:
    raw = {"data": DATA, "site": {"id": "site-a", "coordinator_url": "https://c:1", "ca_file": "ca.pem",
                                  "key_file": "site.key", "production": False}}
    with capture_logs() as logs:
        parse_site_config(raw, base_dir=tmp_path)
    assert sum(e["log_level"] == "warning" for e in logs) == 2  # key and CA missing
    identity.save_private_key(identity.generate_key(), tmp_path / "site.key")
    os.chmod(tmp_path / "site.key", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        parse_site_config(raw, base_dir=tmp_path)


def test_site_config_is_a_run_config_with_resolved_paths(tmp_path: Path) -> None:
    site = _files(tmp_path)
    path = tmp_path / "conf" / "site.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"data": DATA, "site": {**site, "ca_file": "../ca.pem", "key_file": "../site.key"}}))
    cfg = load_site_config(path)
    assert isinstance(cfg, SiteConfig)
    assert cfg.site.key_file == tmp_path / "conf" / ".." / "site.key" and cfg.site.key_file.is_file()
    assert cfg.site.approval == "manual" and cfg.site.production is True
    assert cfg.site.policy.max_kept_memorization_rate == 0.0 and cfg.site.policy.min_planted_recall == 1.0
    assert build_stage(cfg, "filter").config["filter"]["enabled"] is True  # privdistill stages take it unchanged


def test_shard_hash_ignores_connection_settings_but_not_policy(tmp_path: Path) -> None:
    site = _files(tmp_path)
    base = parse_site_config({"data": DATA, "site": site}, base_dir=tmp_path)
    moved = parse_site_config({"data": DATA, "site": {**site, "coordinator_url": "https://other:9443",
                                                       "approval": "auto"}}, base_dir=tmp_path)
    stricter = parse_site_config({"data": DATA, "site": {**site, "policy": {"min_kept": 50}}}, base_dir=tmp_path)
    assert shard_config_hash(base) == shard_config_hash(moved)
    assert shard_config_hash(base) != shard_config_hash(stricter)


def test_template_validates_once_paths_are_filled(tmp_path: Path) -> None:
    text = render_template()
    with pytest.raises(ConfigError) as exc:
        (tmp_path / "site.yaml").write_text(text)
        load_site_config(tmp_path / "site.yaml")
    assert any("site.id" in p for p in exc.value.problems)
    assert any("CHANGE-ME/train-images" in p for p in exc.value.problems)

    _files(tmp_path)
    filled = (text.replace("CHANGE-ME/ca.pem", "ca.pem").replace("CHANGE-ME/site.key", "site.key")
              .replace("CHANGE-ME/", f"{FMNIST}/").replace("id: CHANGE-ME", "id: site-a")
              .replace("https://CHANGE-ME:8443", "https://coordinator.example:8443"))
    (tmp_path / "site.yaml").write_text(filled)
    cfg = load_site_config(tmp_path / "site.yaml")
    assert cfg.site.id == "site-a" and cfg.data.classes == [1, 7, 8] and cfg.filter.enabled


def test_template_filled_from_the_provisioned_connection_file(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    _files(bundle)
    (bundle / "site-connection.yaml").write_text(yaml.safe_dump(
        {"site_id": "site-b", "coordinator_url": "https://127.0.0.1:8443", "ca_file": "ca.pem", "key_file": "site.key"}))
    text = render_template(read_connection(bundle / "site-connection.yaml"))
    (tmp_path / "site.yaml").write_text(text.replace("CHANGE-ME/", f"{FMNIST}/"))
    cfg = load_site_config(tmp_path / "site.yaml")
    assert cfg.site.id == "site-b" and cfg.site.key_file == bundle / "site.key"
    assert cfg.site.coordinator_url == "https://127.0.0.1:8443"


def test_mistakes_in_three_sections_are_all_listed_in_one_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Prepare: a typo in teacher.train, a bad site.id and a data file that is not there (relative to the yaml)
    from site_agent.cli import main

    site = _files(tmp_path)
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"source": {"type": "idx", "images": "train-images.gz"}, "resolution": 16},
        "teacher": {"train": {"learning_rte": 1e-3}},
        "site": {**site, "id": "Site A"},
    }))
    # Execute
    with pytest.raises(ConfigError) as exc:
        load_site_config(path)
    code = main(["run", str(path), "--workdir", str(tmp_path / "work")])
    # Assert: the three, in words, and nothing else; the CLI prints each on its own line and writes nothing
    expected = [
        f"data.source.images: path does not exist: {tmp_path / 'train-images.gz'}",
        "teacher.train.learning_rte: unknown key; did you mean `learning_rate`?",
        "site.id: use 1 to 63 lower-case letters, digits, '-' and '_', the first a letter or digit (got 'Site A')",
    ]
    assert exc.value.problems == expected
    err_lines = capsys.readouterr().err.splitlines()
    assert code == 2 and all(any(line.endswith(f"- {p}") for line in err_lines) for p in expected), err_lines
    assert not (tmp_path / "work").exists()


def test_production_rules_run_when_the_site_section_has_other_mistakes(tmp_path: Path) -> None:
    site = _files(tmp_path)
    raw = {"data": DATA, "filter": {"enabled": False}, "site": {**site, "id": "-a", "approval": "automatic"}}
    with pytest.raises(ConfigError) as exc:
        parse_site_config(raw, base_dir=tmp_path)
    assert [p.split(":")[0] for p in exc.value.problems] == ["site.id", "site.approval", "filter.enabled"]
    assert "did you mean `auto`?" in exc.value.problems[1]
