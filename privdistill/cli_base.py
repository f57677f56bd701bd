"""What the three command lines (`privdistill`, `privdistill-site`, `privdistill-coordinator`) share: the root
parser with its logging options and exit-code epilog, `set_defaults(func=...)` commands, the common arguments,
and one runner that turns an error into its message (printed once) and its exit code."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from privdistill import __version__
from privdistill.errors import EXIT_CODES, INTERRUPTED, PrivdistillError
from privdistill.procs import exit_on_sigterm

Command = Callable[[argparse.Namespace], int]
LOG_FORMATS = ("console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
EPILOG = "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())

log = structlog.get_logger(__name__)


def root_parser(prog: str, description: str) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The parser with --version, --log-format, --log-level/-v and the exit-code epilog, and its subcommands."""
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"{prog} {__version__}")
    p.add_argument("--log-format", choices=LOG_FORMATS, default="console",
                   help="console lines, or one JSON object per line (default console)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    p.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="debug",
                   help="same as --log-level debug")
    return p, subcommands(p)


def subcommands(parser: argparse.ArgumentParser, dest: str = "command") -> argparse._SubParsersAction:
    """Required subcommands of ``parser``; each one is added with ``command(...)``."""
    return parser.add_subparsers(dest=dest, required=True, metavar=dest.upper().replace("_", "-"))


def command(sub: argparse._SubParsersAction, name: str, func: Command | None, help: str,
            **kwargs: Any) -> argparse.ArgumentParser:
    """Add subcommand ``name`` running ``func(args) -> exit code`` (``None``: a group with its own subcommands)."""
    sp: argparse.ArgumentParser = sub.add_parser(name, help=help, **kwargs)
    if func is not None:
        sp.set_defaults(func=func)
    return sp


def add_config(sp: argparse.ArgumentParser, *, option: bool = False, optional: bool = False,
               help: str = "the YAML configuration") -> None:
    """The config file: positional ``config`` (``optional``: may be left out), or ``--config`` (``option``)."""
    if option:
        sp.add_argument("--config", type=Path, required=not optional, help=help)
    else:
        sp.add_argument("config", type=Path, nargs="?" if optional else None, help=help)


def add_workdir(sp: argparse.ArgumentParser, help: str = "the work directory") -> None:
    sp.add_argument("--workdir", type=Path, required=True, help=help)


def add_json(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_force(sp: argparse.ArgumentParser, help: str = "re-run even if inputs are unchanged") -> None:
    sp.add_argument("--force", action="store_true", help=help)


def main(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, configure logging, run the chosen command (see ``run``)."""
    from privdistill.allocator import tune_malloc
    from privdistill.logs import configure_logging

    args = parser.parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    tune_malloc()
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run ``args.func(args)``: a PrivdistillError becomes its message, reported once (a plain ``error:`` line on
    stderr, or one JSON record with ``--log-format json``), and its exit code; Ctrl-C exits 130; SIGTERM raises
    SystemExit(143) so the command's cleanup runs (helpers stopped, partial files removed)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        return int(args.func(args))
    except PrivdistillError as err:
        report_error(err, command=_command_name(args), json_format=getattr(args, "log_format", "console") == "json")
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return INTERRUPTED


def report_error(err: PrivdistillError, *, command: str, json_format: bool) -> None:
    """The one report of a failed command (the message says what is wrong and who must act)."""
    if json_format:
        log.error("failed", command=command, error_type=type(err).__name__, exit_code=err.exit_code,
                  reason=err.reason, message=str(err))
    else:
        print(f"error: {err}", file=sys.stderr)


def _command_name(args: argparse.Namespace) -> str:
    """``sites add`` for nested subcommands (every ``*_command`` destination after ``command``)."""
    words = [str(args.command)] if getattr(args, "command", None) else []
    words += [str(v) for k, v in sorted(vars(args).items()) if k.endswith("_command") and v]
    return " ".join(words)
