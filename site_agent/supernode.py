"""The site's Flower SuperNode: Flower's own `flower-supernode`, with its idle pull interval shortened.

Flower 1.41's SuperNode asks the SuperLink for a message in a loop and, when there is none, sleeps a fixed 3 s
(``flwr/supernode/start_client_internal.py``; no option or variable sets it). Every federated round waits that out
once per site: the next round's message exists only after every site has answered and the ServerApp has averaged,
so the pull right after a site's reply finds nothing and the SuperNode sleeps 3 s (``benchmarks/flower_overhead.py``
measured 3.03 s of a 6.9 s per-round overhead there). This launcher runs Flower's own entry point with only that
sleep shortened to ``PULL_INTERVAL_S``; every other sleep and everything else is Flower's. The price: an idle site
asks the SuperLink every ``PULL_INTERVAL_S`` instead of every 3 s (one small authenticated HTTPS request).

Guarded, because it reaches into Flower's module: it changes only a flwr release it was checked against whose loop
still has exactly one ``time.sleep(3)``; anything else runs Flower unchanged and says why on stderr.

Usage (what ``privdistill-site join`` starts): ``python -m site_agent.supernode FLOWER-SUPERNODE-ARGS...``
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

PULL_INTERVAL_S = 0.5
IDLE_SLEEP_S = 3  # the fixed idle sleep of the releases below
CHECKED_FLWR = ("1.41.",)


class ShortIdleSleep:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: a sleep of exactly ``IDLE_SLEEP_S`` lasts
    ``interval`` instead; every other attribute is the real module's."""

    def __init__(self, interval: float, sleep: Callable[[float], None] = time.sleep) -> None:
        self._interval, self._sleep = interval, sleep

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        self._sleep(self._interval if seconds == IDLE_SLEEP_S else seconds)


def shorten_idle_pull(interval: float = PULL_INTERVAL_S) -> str | None:
    """Shorten the SuperNode's idle sleep in this process; None when done, else the reason it was left alone."""
    import flwr.supernode.start_client_internal as loop

    release = version("flwr")
    if not release.startswith(CHECKED_FLWR):
        return f"flwr {release} is not a release this was checked against ({', '.join(CHECKED_FLWR)}x)"
    try:
        source = inspect.getsource(loop.start_client_internal)
    except (OSError, TypeError):
        return "the SuperNode loop's source is not installed, so its idle sleep cannot be checked"
    if source.count(f"time.sleep({IDLE_SLEEP_S})") != 1:
        return f"the SuperNode loop no longer has exactly one time.sleep({IDLE_SLEEP_S})"
    loop.time = ShortIdleSleep(interval)  # type: ignore[assignment]
    return None


def main(argv: list[str]) -> None:
    why = shorten_idle_pull()
    if why is not None:
        print(f"privdistill: SuperNode left with Flower's {IDLE_SLEEP_S} s idle pull: {why}", file=sys.stderr)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv]  # Flower reads its arguments, and names its exit event, from sys.argv
    flower_supernode()


if __name__ == "__main__":
    main(sys.argv[1:])
