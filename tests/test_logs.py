"""One log stream: structlog events and other libraries' stdlib records render in the same format (one JSON object
per line in JSON mode), each once; progress bars follow one policy."""

from __future__ import annotations

import io
import json
import logging
import sys
import warnings

import pytest
import structlog

from privdistill import logs


@pytest.fixture
def restore_logging():
    from flwr.supercore.logger import FLOWER_LOGGER, console_handler

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    # flwr attaches its console handler at import; an earlier test's configure_logging may have removed it
    flower_handlers = list(FLOWER_LOGGER.handlers)
    if console_handler not in FLOWER_LOGGER.handlers:
        FLOWER_LOGGER.addHandler(console_handler)
    logging.captureWarnings(False)  # an earlier test's configure_logging may have left warnings captured
    yield
    FLOWER_LOGGER.handlers[:] = flower_handlers
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)
    structlog.reset_defaults()
    logs._progress = None


def test_json_mode_renders_foreign_records_as_json_once(capsys: pytest.CaptureFixture, restore_logging) -> None:
    # Prepare: flwr attaches its own console handler to its logger at import
    from flwr.supercore.logger import FLOWER_LOGGER

    assert any(type(h).__name__ == "ConsoleHandler" for h in FLOWER_LOGGER.handlers)

    # Execute
    logs.configure_logging("json", "info")
    structlog.get_logger("privdistill.test").info("stage.done", stage="sample", seconds=1.5)
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
    FLOWER_LOGGER.info("Starting Flower ServerApp")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(True)  # catch_warnings restored showwarning: capture again inside it
        warnings.warn("Secure RNG turned off", UserWarning, stacklevel=1)
    logging.getLogger("opacus.privacy_engine").debug("below the level: not shown")

    # Assert: every line is one JSON object, each record appears once, foreign ones name their logger
    err = capsys.readouterr().err
    lines = [json.loads(ln) for ln in err.splitlines()]
    assert [ln["event"] for ln in lines[:3]] == ["stage.done", "Started server process [42]",
                                                 "Starting Flower ServerApp"]
    assert len(lines) == 4 and "Secure RNG turned off" in lines[3]["event"]
    assert lines[0]["stage"] == "sample" and lines[0]["level"] == "info" and "logger" not in lines[0]
    assert [ln["logger"] for ln in lines[1:]] == ["uvicorn.error", "flwr", "py.warnings"]
    assert lines[3]["level"] == "warning" and all(ln["timestamp"].endswith("Z") for ln in lines)
    assert not any(type(h).__name__ == "ConsoleHandler" for h in FLOWER_LOGGER.handlers)


def test_console_mode_renders_foreign_records_as_console_lines(capsys: pytest.CaptureFixture,
                                                               restore_logging) -> None:
    logs.configure_logging("console", "info")
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Invalid HTTP request received." in err and "[warning  ]" in err
    assert not err.startswith("{")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_only_on_a_tty_and_never_in_json_mode(monkeypatch: pytest.MonkeyPatch, restore_logging) -> None:
    monkeypatch.setattr(sys, "stderr", _Tty())
    assert logs.progress_enabled()  # the library without the CLI: bars on a terminal
    logs.configure_logging("json", "info")
    assert not logs.progress_enabled()
    logs.configure_logging("console", "info")
    assert logs.progress_enabled()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    logs.configure_logging("console", "info")
    assert not logs.progress_enabled()  # piped to a file, CI or a daemon's log


def test_demo_prints_one_line_per_finished_site_stage() -> None:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "two_site_demo", Path(__file__).resolve().parents[1] / "examples" / "two_site_demo.py")
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    done = json.dumps({"event": "stage.done", "stage": "train-teacher", "seconds": 61.6, "level": "info"})
    skipped = json.dumps({"event": "stage.skipped", "stage": "ingest", "reason": "inputs unchanged"})
    assert demo.stage_line("site-a", done) == "  site-a: train-teacher done in 62 s"
    assert demo.stage_line("site-b", skipped) == "  site-b: ingest unchanged, skipped"
    assert demo.stage_line("site-a", json.dumps({"event": "stage.start", "stage": "sample"})) is None
    assert demo.stage_line("site-a", "train: 40%|####") is None
