"""External tools the tests need: skip with the install hint locally, fail in CI (PRIVDISTILL_CI=1)."""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    """True when .ci/run (or anyone) asks that missing tools fail the suite instead of skipping."""
    return os.environ.get("PRIVDISTILL_CI", "") not in ("", "0")


def missing(what: str, hint: str) -> None:
    """Skip (locally) or fail (in CI) because ``what`` is not available; ``hint`` says how to install it."""
    message = f"{what} is not available: {hint}"
    if in_ci():
        pytest.fail(message + " (PRIVDISTILL_CI=1: CI must install it, see .ci/run)", pytrace=False)
    pytest.skip(message)
