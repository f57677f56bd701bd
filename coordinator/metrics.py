"""Prometheus counters of one coordinator app (its own CollectorRegistry, so several apps never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.uploads_created = Counter("privdistill_uploads_created", "Uploads started", registry=r)
        self.upload_bytes = Counter("privdistill_upload_bytes", "Shard bytes received in chunks", registry=r)
        self.shards_accepted = Counter("privdistill_shards_accepted", "Shards verified and stored", registry=r)
        self.shards_rejected = Counter("privdistill_shards_rejected", "Shards refused by manifest or tar checks",
                                       ["reason"], registry=r)
        self.requests_rejected = Counter("privdistill_requests_rejected", "Requests answered with an error",
                                         ["reason"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample (0.0 if never incremented): handy for tests and dashboards."""
        v = self.registry.get_sample_value(name, labels or None)
        return 0.0 if v is None else v
