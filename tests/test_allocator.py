"""privdistill.allocator: the switch turns it off, glibc accepts every setting, and it is applied once."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

PROBE = ("import json; from privdistill.allocator import tune_malloc; a = tune_malloc(); "
         "print(json.dumps([a, tune_malloc() is a]))")


def _probe(env_value: str | None) -> tuple[dict, bool]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "PRIVDISTILL_MALLOC_TUNING"}
    if env_value is not None:
        env["PRIVDISTILL_MALLOC_TUNING"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, check=True, capture_output=True, text=True, timeout=60)
    applied, same = json.loads(out.stdout.strip().splitlines()[-1])
    return applied, same


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's mallopt parameters")
def test_glibc_accepts_every_setting_once_per_process() -> None:
    applied, same = _probe(None)
    assert applied == {"mmap_threshold": True, "trim_threshold": True, "top_pad": True}
    assert same  # the second call returns the first call's result without calling mallopt again


@pytest.mark.parametrize("value", ["0", "off", "false"])
def test_switch_turns_it_off(value: str) -> None:
    applied, _ = _probe(value)
    assert applied == {}
