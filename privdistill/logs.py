"""Logging set-up for the command-line tools (the library itself never configures logging)."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(fmt: str = "console", level: str = "info") -> None:
    """structlog to stderr: human-readable console lines, or one JSON object per line."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(stream=sys.stderr, level=lvl, format="%(message)s")
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=_StderrLogger,
        cache_logger_on_first_use=False,
    )
    quiet_third_party()


class _StderrLogger:
    """Writes each rendered line to the *current* sys.stderr (which tests and daemons may swap)."""

    def __init__(self, *args: object) -> None:
        pass

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def quiet_third_party() -> None:
    """Hospitals are offline: keep the HF libraries from hub look-ups and progress-bar noise.

    Environment variables only (read when those libraries are first imported), so a command that
    never needs torch (e.g. the coordinator's `sites list`) does not pay for importing it."""
    for var, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("DIFFUSERS_VERBOSITY", "error"),
                       ("TRANSFORMERS_VERBOSITY", "error"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        os.environ.setdefault(var, value)
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        mod = sys.modules.get(name)  # already imported: its verbosity was read before we set the variables
        if mod is not None:
            mod.set_verbosity_error()
            mod.disable_progress_bar()
