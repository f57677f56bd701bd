"""Helper processes that end with the command that started them.

`privdistill-coordinator federate` starts a Flower SuperLink, `privdistill-site join` a SuperNode and the warm
trainer, `serve` forks its workers. When such a command is stopped with SIGTERM it stops its helpers itself; when
it is killed outright (SIGKILL, the OOM killer, a crashed terminal) it cannot, and a helper left running keeps the
port (the next `federate` fails with "port in use") or, for a SuperNode, keeps taking part in rounds after the site's
admin believes the site has left. On Linux the kernel can send a signal to a process when its parent dies
(``PR_SET_PDEATHSIG``); these functions set it.

- ``bound_to_this_process(cmd)``: the command line to start instead of ``cmd``; a tiny exec wrapper
  (``python -m privdistill.procs PARENT_PID -- cmd...``, standard library only) sets the signal and execs ``cmd``
  (the setting survives exec), so ``subprocess`` needs no ``preexec_fn`` (not safe with threads).
- ``end_with_parent(parent_pid)``: for a forked child (the coordinator's workers), called first thing after fork.

The signal fires when the *thread* that started the child exits, so start bound helpers from a thread that lives as
long as they should (every caller here starts them from the thread that then waits on them). Elsewhere than Linux
both are no-ops: helpers are then stopped only by the orderly paths.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Sequence

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return int(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0


def end_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """In a child process: have the kernel send ``sig`` when the parent exits; if the parent is already gone (it
    died between the fork and this call, so the signal would never come), exit now."""
    if _prctl_pdeathsig(sig) and os.getppid() != parent_pid:
        os._exit(128 + int(sig))


def exit_on_sigterm(signum: int, _frame: object) -> None:
    """A SIGTERM handler: raise SystemExit(128 + signum), so ``finally`` blocks run (helpers stopped, temporary files
    removed) as they do for Ctrl-C; the default action ends the process without running any."""
    raise SystemExit(128 + signum)


def bound_to_this_process(cmd: Sequence[str]) -> list[str]:
    """``cmd`` started through the exec wrapper: it receives SIGTERM when this process exits, however it exits."""
    if not sys.platform.startswith("linux"):
        return list(cmd)
    return [sys.executable, "-m", "privdistill.procs", str(os.getpid()), "--", *cmd]


def main(argv: Sequence[str]) -> None:
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        sys.exit("usage: python -m privdistill.procs PARENT_PID -- COMMAND [ARG...]")
    end_with_parent(int(argv[0]))
    try:
        os.execvp(argv[2], list(argv[2:]))
    except OSError as err:  # the command does not exist or may not be run: say which, like a shell does
        sys.exit(f"privdistill.procs: cannot run {argv[2]!r}: {err.strerror}")


if __name__ == "__main__":
    main(sys.argv[1:])
