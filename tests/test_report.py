"""The evaluation report: JSON round trip and a self-contained, escaped HTML page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from privdistill.report import write_report


def _report() -> dict:
    return {
        "teacher": {"memorization_rate": 0.0625, "reid_rate": 0.1875, "tstr_accuracy": 0.8125, "fid_domain": 3.25},
        "student": {"memorization_rate": 0.0, "reid_rate": 0.015625, "tstr_accuracy": 0.78125, "fid_domain": 4.5},
        "real": {"trtr_accuracy": 0.90625, "memorization_rate": np.float64(0.001)},
        "filter": {"kept": 931, "dropped": 69, "threshold": 0.8725, "calibration": {"tpr": 0.953, "fpr": 0.0412}},
        "audit": {"canaries": 8, "reproduced": 1, "note": "<script>alert(1)</script>"},
    }


def test_write_report_files_json_and_html(tmp_path: Path) -> None:
    # Prepare
    rng = np.random.default_rng(0)
    grids = {
        "teacher samples": rng.uniform(-1, 1, (12, 1, 28, 28)).astype(np.float32),
        "real test <held out>": rng.uniform(-1, 1, (5, 3, 16, 16)).astype(np.float32),
    }
    # Execute
    json_path, html_path = write_report(_report(), tmp_path / "out", grids=grids)
    # Assert
    assert json_path == tmp_path / "out" / "report.json" and json_path.is_file()
    assert html_path == tmp_path / "out" / "report.html" and html_path.is_file()
    loaded = json.loads(json_path.read_text())
    assert loaded["filter"]["calibration"] == {"tpr": 0.953, "fpr": 0.0412}
    assert loaded["real"]["memorization_rate"] == 0.001
    assert list(loaded) == sorted(loaded)

    page = html_path.read_text()
    for number in ("0.0625", "0.1875", "0.8125", "3.25", "0.01562", "0.9062", "931", "69", "0.8725", "0.953", "0.0412"):
        assert number in page, number
    assert page.count('<img alt="') == 2
    assert len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', page)) == 2
    assert "http://" not in page and "https://" not in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "real test &lt;held out&gt;" in page
    assert "Memorization rate" in page and "Domain FID" in page and "canaries" in page


def test_write_report_without_grids_or_sections(tmp_path: Path) -> None:
    json_path, html_path = write_report({"student": {"reid_rate": 0.5}}, tmp_path, grids={})
    assert json.loads(json_path.read_text()) == {"student": {"reid_rate": 0.5}}
    page = html_path.read_text()
    assert "<img" not in page and "0.5" in page and "—" in page
    assert not list(tmp_path.glob("*.tmp"))
