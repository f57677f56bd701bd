"""Config validation: every problem listed at once, exit code 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from privdistill.cli import main
from privdistill.config import IdxSource, ModelConfig, NpzSource, load_config, parse_config
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


def test_rules_across_sections_run_although_other_sections_fail(tmp_path: Path) -> None:
    # Prepare: a typo in sample, a missing file, and teacher/student models that do not fit the resolution
    raw = {"data": {"source": {"type": "npz", "path": "missing.npz"}, "resolution": 12},
           "teacher": {"model": {"block_out_channels": [16, 16, 16, 16]}},
           "student": {"model": {"block_out_channels": [8, 8, 8, 8]}, "train": {"stesp": 3}},
           "sample": {"per_clas": 10}, "filter": {"target_tpr": 0.9}}
    # Execute
    with pytest.raises(ConfigError) as exc:
        parse_config(raw, base_dir=tmp_path)
    # Assert: schema problems first, then the cross-section rules (student.model is checked: only its train is wrong)
    assert exc.value.problems[:3] == [
        f"data.source.path: path does not exist: {tmp_path / 'missing.npz'}",
        "student.train.stesp: unknown key; did you mean `steps`?",
        "sample.per_clas: unknown key; did you mean `per_class`?",
    ]
    assert exc.value.problems[3].startswith("filter.target_tpr: removed: ") and \
        "set filter.max_fresh_drop instead" in exc.value.problems[3]
    assert exc.value.problems[4:] == [
        f"{sec}.model.block_out_channels: 4 levels downsample by 8, which does not divide data.resolution=12"
        for sec in ("teacher", "student")]


def test_unknown_keys_without_a_close_match_list_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"data": {"source": {"type": "idx", "images": "/x", "colour": 1}}, "zzz": 1})
    assert "data.source.colour: unknown key; valid keys here: type, images, labels, class_names" in exc.value.problems
    assert any(p.startswith("zzz: unknown key; valid keys here: name, seed, data, teacher") for p in exc.value.problems)
    with pytest.raises(ConfigError, match=r"data.source.type: must be one of 'idx', .* \(got 'npy'\); did you mean "
                                          r"`npz`\?"):
        parse_config({"data": {"source": {"type": "npy", "path": "x.npy"}}})


def test_relative_paths_resolve_against_the_config_files_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator.config import load_coordinator_config
    from coordinator.student import load_training_config

    # Prepare: configs in conf/, their files beside them, the process somewhere else
    conf = tmp_path / "conf"
    (conf / "data").mkdir(parents=True)
    np.savez(conf / "data" / "ref.npz", train_images=np.zeros((2, 8, 8), np.uint8), train_labels=np.zeros(2))
    (conf / "run.yaml").write_text(yaml.safe_dump({"data": {"source": {"type": "npz", "path": "data/ref.npz"}},
                                                   "privacy": {"budget": {"ledger": "state/ledger.sqlite"}}}))
    (conf / "coordinator.yaml").write_text(yaml.safe_dump({"tls": {"cert": "tls/c.pem", "key": "tls/k.pem"},
                                                           "state_dir": "state"}))
    (conf / "training.yaml").write_text(yaml.safe_dump({"resolution": 8, "student": {"model": {
        "block_out_channels": [8, 8]}}, "evaluation": {"reference": {"source": {"type": "npz", "path": "data/ref.npz"}}}}))
    monkeypatch.chdir(tmp_path)
    # Execute
    run = load_config(Path("conf") / "run.yaml")
    coord = load_coordinator_config(Path("conf") / "coordinator.yaml")
    training = load_training_config(Path("conf") / "training.yaml")
    # Assert: one rule for every file kind
    folder = conf.resolve()
    assert isinstance(run.data.source, NpzSource) and run.data.source.path == folder / "data" / "ref.npz"
    assert run.privacy is not None and run.privacy.budget is not None
    assert run.privacy.budget.ledger == folder / "state" / "ledger.sqlite"
    assert (coord.tls.cert, coord.state_dir) == (folder / "tls" / "c.pem", folder / "state")
    assert training.evaluation.reference is not None
    ref = training.evaluation.reference.source
    assert isinstance(ref, NpzSource) and ref.path == folder / "data" / "ref.npz"


def test_models_built_in_code_neither_resolve_nor_check_paths() -> None:
    # a config re-read from a manifest or built by a script: no loader context, no file system
    src = IdxSource(type="idx", images=Path("not/here.gz"))
    assert src.images == Path("not/here.gz")


def test_rules_inside_a_section_run_although_a_key_of_it_is_mistyped() -> None:
    raw = {"data": {"source": {"type": "idx", "images": "/"}, "partition": {"index": 3, "count": 2, "idx": 1}},
           "teacher": {"model": {"block_out_channels": [30, 64], "atention": True}}}
    with pytest.raises(ConfigError) as exc:
        parse_config(raw)
    assert exc.value.problems == [
        "data.partition.idx: unknown key; did you mean `index`?",
        "teacher.model.atention: unknown key; did you mean `attention`?",
        "data.partition: partition index 3 must be below count 2",
        "teacher.model: block_out_channels [30] are not divisible by norm_num_groups=8",
    ]
    with pytest.raises(ValueError, match=r"block_out_channels \[30\] are not divisible"):  # built in code: the same
        ModelConfig(block_out_channels=[30])


def test_a_section_no_dotted_path_reaches_still_runs_its_rules() -> None:
    # Prepare: the same section under a field (the loader runs its rule) and in a list (pydantic runs it)
    from privdistill.config_loader import CrossCheck, Strict, parse_model

    class Pair(Strict):
        lo: int
        hi: int
        rules = (CrossCheck(("lo", "hi"), lambda lo, hi: ["lo must be below hi"] if lo >= hi else []),)

    class Root(Strict):
        one: Pair | None = None
        many: list[Pair] = []

    # Execute / Assert: each problem once, with its place
    for raw, expected in [
        ({"one": {"lo": 2, "hi": 1, "x": 0}, "many": [{"lo": 3, "hi": 1}]},
         ["one.x: unknown key; valid keys here: lo, hi", "many[0]: lo must be below hi", "one: lo must be below hi"]),
        ({"one": {"lo": 2, "hi": 1}, "many": [{"lo": 1, "hi": 2}, {"lo": 3, "hi": 1}]},
         ["one: lo must be below hi", "many[1]: lo must be below hi"]),
    ]:
        with pytest.raises(ConfigError) as exc:
            parse_model(Root, raw)
        assert exc.value.problems == expected
