"""The site's privacy budget ledger: every DP mechanism run on real patients (DP-SGD training, semantic
query), including reruns after ``--force`` or a config change, appended to one SQLite file that lives
outside the work directory; composed per patient with the RDP accountant; a run that would take any
patient of its pool past the configured budget is refused before it touches the data.

Append-only: the table refuses UPDATE and DELETE. Patients are stored as keyed hashes (the key is
made once per ledger), never as ids. A pool is keyed by the hash of its patient set."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from privdistill.errors import PrivacyPolicyError
from privdistill.sqlite import connection

if TYPE_CHECKING:
    from privdistill.config import BudgetConfig, DPConfig, TrainConfig
    from privdistill.data.types import ImageSet

log = structlog.get_logger(__name__)

LEDGER_FILE = "privacy_ledger.sqlite"
STATE_ENV = "PRIVDISTILL_STATE_DIR"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS charges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    pool TEXT NOT NULL,
    n_units INTEGER NOT NULL,
    history_json TEXT NOT NULL,
    delta REAL NOT NULL,
    epsilon_alone REAL NOT NULL,
    reason TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS charge_units (charge_id INTEGER NOT NULL, unit TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS charge_units_unit ON charge_units (unit);
CREATE TRIGGER IF NOT EXISTS charges_no_update BEFORE UPDATE ON charges
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS charges_no_delete BEFORE DELETE ON charges
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS units_no_update BEFORE UPDATE ON charge_units
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS units_no_delete BEFORE DELETE ON charge_units
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
"""


def default_ledger_path() -> Path:
    """$PRIVDISTILL_STATE_DIR/privacy_ledger.sqlite, else $XDG_STATE_HOME (~/.local/state)/privdistill/...:
    a place that survives deleting a work directory."""
    base = os.environ.get(STATE_ENV)
    if base:
        return Path(base) / LEDGER_FILE
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "privdistill" / LEDGER_FILE


def default_delta(n_units: int) -> float:
    """min(1e-5, 1/(N ln N)): well below 1/N at every N (Dwork & Roth), and 1e-5 (PrivImage, TF-Privacy's
    order) at the small N of one hospital, where 1/(N ln N) would still be ~1e-2."""
    import math

    return min(1e-5, 1.0 / (n_units * math.log(max(n_units, 3))))


class PrivacyLedger:
    """Per-patient record of every DP mechanism run at this site; see the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(_SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta (k, v) VALUES ('unit_key', ?)", (secrets.token_hex(16),))
            self._key = bytes.fromhex(db.execute("SELECT v FROM meta WHERE k = 'unit_key'").fetchone()[0])

    def _db(self) -> AbstractContextManager[sqlite3.Connection]:
        return connection(self.path, timeout=60, synchronous="FULL", wal=True)

    # ------------------------------------------------------------------ identities
    def unit_hashes(self, unit_ids: Sequence[str]) -> list[str]:
        """Keyed hashes of the privacy units (patient ids, or image hashes for image-level units)."""
        return sorted({hashlib.blake2b(str(u).encode(), key=self._key, digest_size=16).hexdigest() for u in unit_ids})

    @staticmethod
    def pool_of(hashes: Sequence[str]) -> str:
        return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()[:32]

    # ------------------------------------------------------------------ reading
    def charges(self, hashes: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Every charge (or those touching any of ``hashes``), oldest first."""
        with self._db() as db:
            rows = db.execute("SELECT id, run_id, kind, pool, n_units, history_json, delta, epsilon_alone, reason,"
                              " config_hash, created_at FROM charges ORDER BY id").fetchall()
            touching = None if hashes is None else self._touching(db, hashes)
        keys = ("id", "run_id", "kind", "pool", "n_units", "history", "delta", "epsilon_alone", "reason",
                "config_hash", "created_at")
        out = [dict(zip(keys, r, strict=True)) for r in rows if touching is None or r[0] in touching]
        for c in out:
            c["history"] = [tuple(h) for h in json.loads(c["history"])]
        return out

    @staticmethod
    def _touching(db: sqlite3.Connection, hashes: Sequence[str]) -> dict[int, set[str]]:
        """charge id -> the units of ``hashes`` it touched."""
        wanted = set(hashes)
        out: dict[int, set[str]] = {}
        for cid, unit in db.execute("SELECT charge_id, unit FROM charge_units"):
            if unit in wanted:
                out.setdefault(cid, set()).add(unit)
        return out

    def has_run(self, run_id: str) -> bool:
        with self._db() as db:
            return db.execute("SELECT 1 FROM charges WHERE run_id = ?", (run_id,)).fetchone() is not None

    def worst_patient(self, hashes: Sequence[str], delta: float, extra: Sequence[tuple[float, float, int]] = ()
                      ) -> dict[str, Any]:
        """The epsilon (at ``delta``) of the patient of ``hashes`` whose charges compose to the most, with
        ``extra`` (a planned run on all of them) added: {epsilon, n_charges, charges (ids)}."""
        from privdistill.dp import epsilon_of

        with self._db() as db:
            return self._worst(db, hashes, delta, extra, epsilon_of)

    def _worst(self, db: sqlite3.Connection, hashes: Sequence[str], delta: float,
               extra: Sequence[tuple[float, float, int]], epsilon_of: Any) -> dict[str, Any]:
        touching = self._touching(db, hashes)
        history = {cid: json.loads(h) for cid, h in db.execute("SELECT id, history_json FROM charges")}
        # patients with the same set of charges compose identically: one accountant per distinct set
        by_unit: dict[str, list[int]] = {u: [] for u in hashes}
        for cid, units in sorted(touching.items()):
            for u in units:
                by_unit[u].append(cid)
        worst_epsilon: float = epsilon_of(list(extra), delta) if extra else 0.0
        worst_charges: list[int] = []
        for ids in {tuple(v) for v in by_unit.values()}:
            eps = epsilon_of([tuple(h) for cid in ids for h in history[cid]] + list(extra), delta)
            if eps > worst_epsilon:
                worst_epsilon, worst_charges = eps, list(ids)
        return {"epsilon": worst_epsilon, "charges": worst_charges, "n_charges": len(worst_charges)}

    # ------------------------------------------------------------------ writing
    def charge(self, *, run_id: str, kind: str, unit_ids: Sequence[str], history: Sequence[tuple[float, float, int]],
               delta: float, reason: str, config_hash: str, budget_epsilon: float | None) -> dict[str, Any]:
        """Record one DP mechanism about to run on ``unit_ids``; refused (PrivacyPolicyError, nothing
        written) when the worst patient's composed epsilon at ``delta`` would exceed ``budget_epsilon``.
        Check and append happen in one write transaction, so two processes cannot both pass."""
        from privdistill.dp import epsilon_of

        hashes = self.unit_hashes(unit_ids)
        pool = self.pool_of(hashes)
        history = [(float(noise), float(rate), int(steps)) for noise, rate, steps in history]
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                before = self._worst(db, hashes, delta, [], epsilon_of)
                after = self._worst(db, hashes, delta, history, epsilon_of)
                alone = epsilon_of(history, delta)
                if budget_epsilon is not None and after["epsilon"] > budget_epsilon * (1 + 1e-9):
                    raise PrivacyPolicyError(
                        f"privacy budget: this {kind} (epsilon {alone:.3f} alone at delta {delta:.1e}) would take a "
                        f"patient of this pool ({len(hashes)} patients) from epsilon {before['epsilon']:.3f} spent by "
                        f"{before['n_charges']} earlier recorded run(s) to {after['epsilon']:.3f}, past the site's "
                        f"budget privacy.budget.epsilon = {budget_epsilon}; ledger {self.path}. A new DP run on these "
                        "patients needs a budget decision by the site's data protection officer, not a rerun")
                cur = db.execute(
                    "INSERT INTO charges (run_id, kind, pool, n_units, history_json, delta, epsilon_alone, reason,"
                    " config_hash, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (run_id, kind, pool, len(hashes), json.dumps(history), float(delta), alone, reason, config_hash,
                     datetime.now(UTC).isoformat(timespec="seconds")))
                db.executemany("INSERT INTO charge_units (charge_id, unit) VALUES (?, ?)",
                               [(cur.lastrowid, h) for h in hashes])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        log.info("budget.charged", kind=kind, pool=pool[:12], n_units=len(hashes), epsilon_alone=round(alone, 4),
                 pool_epsilon=round(after["epsilon"], 4), delta=delta, budget=budget_epsilon, reason=reason)
        return {"pool": pool, "n_units": len(hashes), "epsilon_alone": alone, "pool_epsilon_before": before["epsilon"],
                "pool_epsilon_after": after["epsilon"], "delta": delta, "budget_epsilon": budget_epsilon,
                "ledger": str(self.path), "earlier_runs": before["n_charges"]}


def unit_ids_of(patient_ids: np.ndarray | None, images: np.ndarray, unit: str) -> list[str]:
    """The ids the ledger keys a pool by: patient ids, or (image-level units, or no ids) image content hashes."""
    if unit == "patient" and patient_ids is not None:
        return sorted({str(p) for p in np.asarray(patient_ids)})
    return [hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() for x in images]


class LedgerRun:
    """This DP run's entries in the site's privacy ledger. A run resumed from its checkpoint (same
    ``checkpoint_dir``, killed before it finished) is not charged again; any other run is: a rerun with
    --force, with a changed config, or in a new work directory."""

    RUN_FILE = "ledger_run.json"

    def __init__(self, ledger: PrivacyLedger, budget: BudgetConfig, unit_ids: list[str], run_file: Path | None,
                 state: dict[str, Any], config_hash: str, delta: float) -> None:
        self.ledger, self.budget, self.unit_ids, self.run_file = ledger, budget, unit_ids, run_file
        self.state, self.config_hash, self.delta = state, config_hash, delta
        self.last: dict[str, Any] | None = None

    @classmethod
    def open(cls, budget: BudgetConfig | None, data: ImageSet, dp: DPConfig, cfg: TrainConfig,
             checkpoint_dir: Path | None, *, n_units: int) -> LedgerRun:
        import uuid

        from privdistill.config import BudgetConfig, config_hash

        budget = budget or BudgetConfig()
        ledger = PrivacyLedger(budget.ledger or default_ledger_path())
        run_file = None if checkpoint_dir is None else checkpoint_dir / cls.RUN_FILE
        state = json.loads(run_file.read_text()) if run_file is not None and run_file.is_file() else {}
        if not state.get("run_id") or not ledger.has_run(state["run_id"]):
            state = {"run_id": uuid.uuid4().hex, "charged": []}
        delta = budget.delta if budget.delta is not None else default_delta(n_units)
        chash = config_hash({"dp": dp.model_dump(mode="json"), "train": cfg.model_dump(mode="json")})
        return cls(ledger, budget, unit_ids_of(data.patient_ids, data.images, dp.privacy_unit), run_file, state,
                   chash, delta)

    def check(self, history: list[tuple[float, float, int]]) -> None:
        """Refuse now, before the data is touched, if the whole planned run would exceed the budget."""
        from privdistill.dp import epsilon_of

        pending = [] if self.state["charged"] else history  # a resumed run was charged in full already
        hashes = self.ledger.unit_hashes(self.unit_ids)
        worst = self.ledger.worst_patient(hashes, self.delta, pending)
        if self.budget.epsilon is not None and worst["epsilon"] > self.budget.epsilon * (1 + 1e-9):
            before = self.ledger.worst_patient(hashes, self.delta)
            raise PrivacyPolicyError(
                f"privacy budget: this DP run (epsilon {epsilon_of(pending, self.delta):.3f} alone at delta "
                f"{self.delta:.1e}) would take a patient of this pool ({len(hashes)} patients) from epsilon "
                f"{before['epsilon']:.3f}, spent by {before['n_charges']} earlier recorded run(s), to "
                f"{worst['epsilon']:.3f}, past the site's budget privacy.budget.epsilon = {self.budget.epsilon}; "
                f"ledger {self.ledger.path}. A new DP run on these patients needs a budget decision by the site's "
                "data protection officer, not a rerun")

    def charge(self, kind: str, history: list[tuple[float, float, int]]) -> None:
        if kind in self.state["charged"]:
            log.info("budget.resumed", kind=kind)  # the killed run's charge covers the resumed one
            return
        earlier = self.ledger.charges(self.ledger.unit_hashes(self.unit_ids))
        same = [c for c in earlier if c["config_hash"] == self.config_hash and c["run_id"] != self.state["run_id"]]
        reason = ("first DP run on these patients" if not earlier or all(c["run_id"] == self.state["run_id"]
                                                                          for c in earlier)
                  else "rerun with the same config (--force or a new work directory)" if same
                  else "rerun with a changed config")
        self.last = self.ledger.charge(run_id=self.state["run_id"], kind=kind, unit_ids=self.unit_ids,
                                       history=history, delta=self.delta, reason=reason,
                                       config_hash=self.config_hash, budget_epsilon=self.budget.epsilon)
        self.state["charged"].append(kind)
        if self.run_file is not None:
            self.run_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.run_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.state))
            tmp.replace(self.run_file)

    def summary(self) -> dict[str, Any]:
        """The ledger's figures for this pool after this run (aggregate; no patient, no path of a real image)."""
        hashes = self.ledger.unit_hashes(self.unit_ids)
        worst = self.ledger.worst_patient(hashes, self.delta)
        runs = {c["run_id"] for c in self.ledger.charges(hashes)}
        return {"pool": self.ledger.pool_of(hashes), "n_units": len(hashes), "delta": self.delta,
                "pool_epsilon": worst["epsilon"], "budget_epsilon": self.budget.epsilon, "recorded_runs": len(runs),
                "accountant": "rdp, composed per patient over every recorded DP run and semantic query"}
