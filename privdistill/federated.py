"""The federated round's wire contract shared by the coordinator's ServerApp and the site's ClientApp:
record keys, the refusal code and reason format, and the student spec the server sends each round."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from privdistill.config import ModelConfig, TrainConfig

# keys of the records in a train message and its reply
ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, PROVENANCE_KEY = "arrays", "config", "metrics", "provenance"
SPEC_FIELD = "student-spec"  # ConfigRecord field: the StudentSpec as JSON
WEIGHT_FIELD = "num-examples"  # MetricRecord field FedAvg weights by
REFUSED_CODE = 4004  # Error.code of a site's refusal (the gate refused, or no approved shard)
FAILED_CODE = 4005  # Error.code of a site whose local training failed after the gate passed
_REASON = re.compile(r"^privdistill-refused site=(?P<site>\S+) reason=(?P<reason>[a-z_]+): (?P<detail>.*)$", re.S)

# node_config keys the SuperNode passes to the ClientApp (`privdistill-site join` sets them)
NODE_SITE_CONFIG, NODE_WORKDIR = "site-config", "workdir"
# provisioning: each site's Flower node key pair (ECDSA P-256, OpenSSH format; Flower's SuperNode
# authentication needs a NIST EC key, not the site's Ed25519 signing key) and the SuperLink's default port
NODE_KEY_FILE, NODE_PUB_FILE, NODE_PUBS_DIR = "flower-node.key", "flower-node.pub", "flower-nodes"
DEFAULT_SUPERLINK_PORT = 9092


@dataclass(frozen=True)
class StudentSpec:
    """What a site needs to rebuild the global student and train it locally for one round."""

    model: ModelConfig
    train: TrainConfig
    resolution: int
    channels: int
    class_names: list[str]
    seed: int

    def to_json(self) -> str:
        return json.dumps({"model": self.model.model_dump(mode="json"), "train": self.train.model_dump(mode="json"),
                           "resolution": self.resolution, "channels": self.channels,
                           "class_names": list(self.class_names), "seed": self.seed}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StudentSpec:
        raw: dict[str, Any] = json.loads(text)
        return cls(model=ModelConfig.model_validate(raw["model"]), train=TrainConfig.model_validate(raw["train"]),
                   resolution=int(raw["resolution"]), channels=int(raw["channels"]),
                   class_names=[str(c) for c in raw["class_names"]], seed=int(raw["seed"]))


def refusal_reason(site: str, reason: str, detail: str) -> str:
    """The Error.reason of a refusal: machine-readable site and reason code, then the human message."""
    return f"privdistill-refused site={site} reason={reason}: {detail}"


def parse_refusal(text: str | None) -> dict[str, str] | None:
    """(site, reason, detail) of a refusal reason string; None when the text is not one."""
    m = _REASON.match(text or "")
    return None if m is None else m.groupdict()
