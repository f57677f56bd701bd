"""Error hierarchy: one root type, one subclass per party that must act, each with its CLI exit code,
the line of exit-code help every command prints (``EXIT_CODES``), and a machine-readable ``reason``."""

from __future__ import annotations


class PrivdistillError(Exception):
    """Root of every error privdistill raises on purpose.

    ``reason`` is a short machine-readable code (e.g. ``bad_signature``) for metrics, audit logs and HTTP
    error bodies; each class has a default, and ``PrivdistillError(message, reason)`` sets a specific one."""

    exit_code: int = 1
    help: str = "unexpected internal error (a bug: please report it with the log)"
    reason: str = "internal_error"

    def __init__(self, message: str = "", reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ConfigError(PrivdistillError):
    """The configuration is invalid; ``problems`` lists every one found (the user must fix the file)."""

    exit_code = 2
    help = "configuration or arguments invalid (every problem is listed; nothing was written)"
    reason = "config_invalid"

    def __init__(self, problems: list[str], source: str | None = None, reason: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} configuration problem(s){where}:\n{lines}", reason)


class DataError(PrivdistillError):
    """Input data cannot be used (missing directory, no readable image, wrong layout)."""

    exit_code = 3
    help = "input data unusable (missing files, no readable image, no public reference set)"
    reason = "data_unusable"


class PrivacyPolicyError(PrivdistillError):
    """A privacy rule refused the action (e.g. a stage was pointed at real images where only
    filtered synthetic data is allowed)."""

    exit_code = 4
    help = "privacy policy refused the action (the failed criteria are listed)"
    reason = "policy_refused"


class ShardVerificationError(PrivdistillError):
    """A shard, artefact or request failed hash or signature verification; ``reason`` says which check
    (e.g. ``bad_signature``, ``hash_mismatch``)."""

    exit_code = 5
    help = "hash or signature verification failed"
    reason = "verification_failed"


class RetryableNetworkError(PrivdistillError):
    """A remote service was unreachable or answered an error; retrying later may succeed."""

    exit_code = 6
    help = "network or service unavailable (or a server's port is taken); retrying later may succeed"
    reason = "unavailable"


class StageError(PrivdistillError):
    """A pipeline stage could not complete (its inputs are missing or inconsistent)."""

    exit_code = 7
    help = ("a stage could not run (upstream stage missing or stale, inconsistent inputs, another run holds the "
            "work directory)")
    reason = "stage_failed"


ERROR_CLASSES: tuple[type[PrivdistillError], ...] = (
    PrivdistillError, ConfigError, DataError, PrivacyPolicyError, ShardVerificationError, RetryableNetworkError,
    StageError,
)
INTERRUPTED = 130
EXIT_CODES: dict[int, str] = {
    0: "success",
    **{cls.exit_code: cls.help for cls in ERROR_CLASSES},
    INTERRUPTED: "interrupted (Ctrl-C); rerun the same command to resume",
}
