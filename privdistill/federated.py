"""The federated round's wire contract shared by the coordinator's ServerApp and the site's ClientApp:
record keys, the refusal code and reason format, and the student spec the server sends each round."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from privdistill.config import ModelConfig, TrainConfig

# keys of the records in a train message and its reply
ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, PROVENANCE_KEY = "arrays", "config", "metrics", "provenance"
SPEC_FIELD = "student-spec"  # ConfigRecord field: the StudentSpec as JSON
LAYOUT_FIELD = "weights-layout"  # ConfigRecord field: sha256 of the student's parameter names, shapes and dtypes
FLAT_ARRAY = "flat"  # the one Array of the ARRAYS_KEY record: every parameter, float32, in state_dict order
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
# Flower's SuperExec looks for a new ClientApp/ServerApp task to start every second by default; a round's
# ClientApp start waits for that poll. 0.1 s costs a local API call ten times a second per SuperNode.
SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_S = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1"


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


# ----------------------------------------------------------------------------- the weights on the wire
# Flower 1.41 moves every Array of a message as its own object (a request each way per hop: SuperLink, SuperNode,
# ClientApp), so the student's ~100-150 parameter tensors cost hundreds of requests per round; one flat float32
# vector costs one (plus one per 5 MiB chunk). Both sides build the student from the same spec, and the client
# checks the announced layout before unpacking anything.
def weights_layout(state: Mapping[str, Any]) -> str:
    """sha256 over the parameters' names, shapes and dtypes in order (what a flat vector is unpacked by)."""
    h = hashlib.sha256()
    for key, value in state.items():
        h.update(f"{key}:{tuple(value.shape)}:{str(value.dtype).removeprefix('torch.')};".encode())
    return h.hexdigest()


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def pack_weights(state: Mapping[str, Any]) -> Any:
    """An ArrayRecord holding ``state`` (a state_dict of tensors or arrays) as one flat float32 Array."""
    from flwr.app import Array, ArrayRecord

    flat = np.concatenate([_numpy(v).astype(np.float32, copy=False).ravel() for v in state.values()]) \
        if state else np.zeros(0, np.float32)
    return ArrayRecord({FLAT_ARRAY: Array(flat)})


def unpack_weights(record: Any, like: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The state_dict packed in ``record``, split by the names and shapes of ``like`` (the receiver's own model,
    whose dtypes it takes); ValueError naming the problem when the record is not one flat vector of that size."""
    keys = list(record.keys())
    if keys != [FLAT_ARRAY]:
        raise ValueError(f"expected one array {FLAT_ARRAY!r}, got {len(keys)} array(s)")
    value = record[FLAT_ARRAY]
    flat = value if isinstance(value, np.ndarray) else _numpy(value.numpy() if hasattr(value, "deflate") else value)
    sizes = [int(np.prod(tuple(v.shape), dtype=np.int64)) for v in like.values()]
    if flat.ndim != 1 or flat.size != sum(sizes):
        raise ValueError(f"the weights hold {flat.size} values, the student has {sum(sizes)}")
    out, start = {}, 0
    for (key, value), size in zip(like.items(), sizes, strict=True):
        out[key] = flat[start:start + size].reshape(tuple(value.shape)).astype(_numpy(value).dtype, copy=False)
        start += size
    return out
