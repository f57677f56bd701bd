"""Error hierarchy: one root type, one subclass per party that must act, each with its CLI exit code."""

from __future__ import annotations


class PrivdistillError(Exception):
    """Root of every error privdistill raises on purpose."""

    exit_code: int = 1


class ConfigError(PrivdistillError):
    """The configuration is invalid; ``problems`` lists every one found (the user must fix the file)."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} configuration problem(s){where}:\n{lines}")


class DataError(PrivdistillError):
    """Input data cannot be used (missing directory, no readable image, wrong layout)."""

    exit_code = 3


class PrivacyPolicyError(PrivdistillError):
    """A privacy rule refused the action (e.g. a stage was pointed at real images where only
    filtered synthetic data is allowed)."""

    exit_code = 4


class ShardVerificationError(PrivdistillError):
    """A shard, artefact or request failed hash or signature verification; ``reason`` is a short
    machine-readable code (e.g. ``bad_signature``, ``hash_mismatch``) used in metrics and audit logs."""

    exit_code = 5

    def __init__(self, message: str, reason: str = "verification_failed") -> None:
        super().__init__(message)
        self.reason = reason


class RetryableNetworkError(PrivdistillError):
    """A remote service was unreachable or answered an error; retrying later may succeed."""

    exit_code = 6


class StageError(PrivdistillError):
    """A pipeline stage could not complete (its inputs are missing or inconsistent)."""

    exit_code = 7
