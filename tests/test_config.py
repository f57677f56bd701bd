"""Config validation: every problem listed at once, exit code 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from privdistill.cli import main
from privdistill.config import load_config, parse_config
from privdistill.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_unknown_keys_and_wrong_types_are_all_listed(tmp_path: Path) -> None:
    # Prepare
    raw = {
        "data": {"source": {"type": "idx", "images": str(tmp_path)}, "resolutoin": 28},
        "teacher": {"train": {"steps": "many", "batch_size": 0}},
        "sample": {"per_class": -1},
        "extra_section": {},
    }
    # Execute
    with pytest.raises(ConfigError) as exc:
        parse_config(raw)
    # Assert
    problems = exc.value.problems
    joined = "\n".join(problems)
    assert len(problems) == 5, joined
    assert "data.resolutoin: unknown key" in joined
    assert "teacher.train.steps" in joined
    assert "teacher.train.batch_size" in joined
    assert "sample.per_class" in joined
    assert "extra_section: unknown key" in joined


def test_missing_paths_are_reported(tmp_path: Path) -> None:
    raw = {"data": {"source": {"type": "idx", "images": "nope.gz", "labels": "nope-labels.gz"}}}
    with pytest.raises(ConfigError) as exc:
        parse_config(raw, base_dir=tmp_path)
    assert len(exc.value.problems) == 2
    assert all("path does not exist" in p for p in exc.value.problems)


def test_downsampling_must_divide_resolution(tmp_path: Path) -> None:
    img = tmp_path / "x.gz"
    img.write_bytes(b"")
    raw = {"data": {"source": {"type": "idx", "images": str(img)}, "resolution": 28},
           "teacher": {"model": {"block_out_channels": [16, 16, 16, 16]}}}
    with pytest.raises(ConfigError) as exc:
        parse_config(raw)
    assert "does not divide data.resolution=28" in str(exc.value)


def test_cli_bad_config_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"source": {"type": "pacs"}}, "teacher": {"trian": {}}}))
    workdir = tmp_path / "work"
    code = main(["run", str(cfg), "--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert code == 2
    assert "teacher.trian: unknown key" in err
    assert "data.source" in err
    assert not workdir.exists()


@pytest.mark.parametrize("name", ["tiny.yaml", "fashion-mnist.yaml"])
def test_shipped_examples_validate(name: str) -> None:
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed (make test installs dataset-fashion-mnist)")
    cfg = load_config(EXAMPLES / name)
    assert cfg.data.source.type == "idx"
