"""End to end on real Fashion-MNIST with the tiny config: kill -9 in the middle of teacher training,
resume without redoing finished stages, get every required report key, and a no-op third run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "tiny.yaml"
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
CLI = [sys.executable, "-m", "privdistill.cli"]
REQUIRED = [
    "teacher.memorization_rate", "student.memorization_rate", "teacher.reid_rate", "student.reid_rate",
    "teacher.tstr_accuracy", "student.tstr_accuracy", "real.trtr_accuracy", "teacher.fid_domain",
    "student.fid_domain", "filter.kept", "filter.dropped", "filter.threshold", "filter.reid_pairs.tpr",
    "filter.reid_pairs.fpr", "filter.calibration.alpha", "filter.calibration.n_null", "filter.audit.fresh_drop_rate",
]
LISTS = ["filter.audit.fresh_drop_ci"]  # [lo, hi]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed (make test installs it)"),
]


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def _finished(workdir: Path) -> dict[str, str]:
    return {p.parent.name: json.loads(p.read_text())["finished_at"] for p in workdir.glob("*/_stage.json")}


def _run(workdir: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "run", str(TINY), "--workdir", str(workdir)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.timeout(1800)
def test_kill_resume_report_and_noop_rerun(tmp_path: Path) -> None:
    workdir = tmp_path / "w"
    # Execute 1: start, wait for the teacher's first checkpoint, kill -9 the whole process group
    proc = subprocess.Popen([*CLI, "run", str(TINY), "--workdir", str(workdir)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list(workdir.glob(".checkpoints/train-teacher/*/train_state.pt")):
            assert proc.poll() is None, "pipeline exited before the teacher checkpointed"
            assert time.time() < deadline, "no teacher checkpoint within 300 s"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    # Assert 1: finished stage intact, no half-written teacher
    before = _finished(workdir)
    assert "ingest" in before and "train-teacher" not in before
    assert not (workdir / "train-teacher").exists()

    # Execute 2: rerun resumes
    run2 = _run(workdir, timeout=1200)
    assert run2.returncode == 0, run2.stderr[-3000:]
    after = _finished(workdir)
    assert after["ingest"] == before["ingest"], "ingest was redone after the kill"
    teacher = json.loads((workdir / "train-teacher" / "_stage.json").read_text())["report"]
    assert teacher["resumed_from"] >= 100 and teacher["steps"] == 300
    assert not list(workdir.glob(".*.tmp-*")), "temporary stage directories were left behind"

    report = json.loads((workdir / "report.json").read_text())
    for key in REQUIRED:
        value = _get(report, key)
        assert isinstance(value, (int, float)), f"{key} = {value!r}"
    for key in LISTS:
        lo, hi = _get(report, key)
        assert 0 <= lo <= hi <= 1, f"{key} = {[lo, hi]}"
    recall = _get(report, "filter.audit.recall")
    assert {"exact", "repeat_visit_lovo", "local_mark", "blur_0.5-1px", "teacher_t0.1"} <= set(recall)
    for kind, r in recall.items():
        assert set(r) >= {"value", "ci", "n"} and r["n"] > 0, (kind, r)
    for key in ("teacher.memorization_rate", "student.memorization_rate", "teacher.reid_rate",
                "student.reid_rate", "teacher.tstr_accuracy", "student.tstr_accuracy", "real.trtr_accuracy"):
        assert 0.0 <= _get(report, key) <= 1.0, key
    assert report["filter"]["kept"] + report["filter"]["dropped"] == 90
    # the memorization rate's interval and undecidable count, and the data-copying AUC
    for who in ("teacher", "student"):
        lo, hi = report[who]["memorization_ci"]
        assert 0.0 <= lo <= report[who]["memorization_rate"] <= hi <= 1.0, who
        assert report[who]["memorization_n"] == 90 and 0 <= report[who]["memorization_undecidable"] <= 90
    for key in ("teacher.data_copying", "student.data_copying") + (("filter.kept_data_copying",) * (report["filter"]["kept"] > 0)):
        auc, (lo, hi) = _get(report, key + "_auc"), _get(report, key + "_ci")
        assert 0.0 <= auc <= 1.0 and 0.0 <= lo <= hi <= 1.0, key  # a percentile interval need not hold the estimate
    assert report["filter"]["audit"]["planted_recall"]["exact"] == 1.0  # every planted copy dropped
    assert report["real"]["trtr_accuracy"] > 0.8  # 3 easy Fashion-MNIST classes
    html = (workdir / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html

    # Execute 3: nothing changed -> every stage skipped
    t0 = time.time()
    run3 = _run(workdir, timeout=120)
    assert run3.returncode == 0, run3.stderr[-2000:]
    assert _finished(workdir) == after, "a stage was re-run although nothing changed"
    assert "inputs unchanged" in run3.stderr
    assert "memorization_rate" in run3.stdout and f"filter kept {report['filter']['kept']}," in run3.stdout
    print(f"no-op rerun took {time.time() - t0:.1f} s")
