"""Logging set-up for the command-line tools (the library itself never configures logging), and the one
progress-bar policy every stage follows."""

from __future__ import annotations

import logging
import os
import sys

import structlog

# the libraries whose records we adopt: their own stderr handlers are removed, so each record is rendered
# once, by the root handler below, in the same format as ours
_OWN_HANDLER_LIBRARIES = ("flwr",)
_progress: bool | None = None  # set by configure_logging; None: the library is used without the CLI


class _StderrHandler(logging.StreamHandler):
    """Writes each record to the *current* sys.stderr (which tests and daemons may swap)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(fmt: str = "console", level: str = "info") -> None:
    """structlog events and stdlib records (uvicorn, flwr, opacus, warnings) to stderr in one format: human-readable
    console lines, or one JSON object per line (``fmt="json"``)."""
    global _progress
    lvl = getattr(logging, level.upper(), logging.INFO)
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    handler = _StderrHandler()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        # a foreign record: its message is the event, its logger's name says whose it is
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.processors.format_exc_info],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(lvl)
    logging.captureWarnings(True)  # warnings.warn (opacus, torch) become records in the same stream
    adopt_library_loggers()
    _progress = fmt != "json" and sys.stderr.isatty()
    quiet_third_party()


def adopt_library_loggers() -> None:
    """Remove the stderr handlers that already-imported libraries (flwr, diffusers, transformers) attach to their
    own logger, so their
    records reach only the root handler. Call again after importing such a library late."""
    for name in _OWN_HANDLER_LIBRARIES:
        if name not in sys.modules:
            continue
        lib = logging.getLogger(name)
        for h in list(lib.handlers):
            if type(h) is logging.StreamHandler or type(h).__name__ == "ConsoleHandler":
                lib.removeHandler(h)
        lib.propagate = True
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        mod = sys.modules.get(name)  # their library loggers have a handler of their own and do not propagate
        if mod is not None:
            mod.disable_default_handler()
            mod.enable_propagation()


def progress_enabled() -> bool:
    """The progress-bar policy: bars only on an interactive stderr, never in JSON mode (they would break the
    one-object-per-line stream) nor in logs, CI or daemons, where the stages' progress events say the same."""
    return sys.stderr.isatty() if _progress is None else _progress


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
