"""Stage runner: atomic outputs, skip when unchanged, rerun when inputs change, resume after a crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from privdistill.errors import StageError
from privdistill.stages import Stage, StageContext, is_current, read_record, run_stage


def _writer(calls: list[str], text: str, fail: bool = False):
    def fn(ctx: StageContext) -> dict:
        calls.append(ctx.name)
        (ctx.out / "out.txt").write_text(text)
        if fail:
            raise RuntimeError("killed mid-stage")
        return {"wrote": text}
    return fn


def test_skips_when_unchanged_and_reruns_downstream_on_change(tmp_path: Path) -> None:
    calls: list[str] = []
    a = Stage("a", _writer(calls, "one"), (), {"k": 1})
    b = Stage("b", _writer(calls, "two"), ("a",), {"k": 2})
    run_stage(a, tmp_path)
    run_stage(b, tmp_path)
    run_stage(a, tmp_path)
    run_stage(b, tmp_path)
    assert calls == ["a", "b"]
    # a's output changes -> b is stale and reruns
    a2 = Stage("a", _writer(calls, "ONE"), (), {"k": 99})
    assert not is_current(a2, tmp_path)
    run_stage(a2, tmp_path)
    assert not is_current(b, tmp_path)
    run_stage(b, tmp_path)
    assert calls == ["a", "b", "a", "b"]
    rec = read_record(tmp_path, "b")
    assert rec["report"] == {"wrote": "two"} and "out.txt" in rec["outputs"]


def test_failed_stage_leaves_previous_output_untouched(tmp_path: Path) -> None:
    calls: list[str] = []
    run_stage(Stage("a", _writer(calls, "good"), (), {"v": 1}), tmp_path)
    with pytest.raises(RuntimeError):
        run_stage(Stage("a", _writer(calls, "half", fail=True), (), {"v": 2}), tmp_path)
    assert (tmp_path / "a" / "out.txt").read_text() == "good"
    assert read_record(tmp_path, "a")["config"] == {"v": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".a.tmp")]


def test_missing_upstream_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="needs stage 'a' first"):
        run_stage(Stage("b", _writer([], "x"), ("a",), {}), tmp_path)


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".a.tmp-dead").mkdir()
    (tmp_path / ".a.tmp-dead" / "half.bin").write_bytes(b"x")
    run_stage(Stage("a", _writer([], "ok"), (), {}), tmp_path)
    assert not (tmp_path / ".a.tmp-dead").exists()
    assert (tmp_path / "a" / "out.txt").read_text() == "ok"


def test_second_run_on_a_locked_workdir_is_refused(tmp_path: Path) -> None:
    from privdistill.stages import workdir_lock

    with workdir_lock(tmp_path), pytest.raises(StageError, match="another privdistill process is using"), \
            workdir_lock(tmp_path):
        pass
