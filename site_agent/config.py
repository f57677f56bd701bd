"""Site configuration: the run configuration plus a `site:` section (identity, connection, approval, export policy)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from privdistill.config import RunConfig, config_hash
from privdistill.config_loader import (
    ConfigPath,
    CrossCheck,
    Strict,
    load_context,
    load_model,
    parse_model,
    resolved,
)
from privdistill.errors import ConfigError
from privdistill.privacy_report import RENAMED_REQUIRE_FILTER
from privdistill.prompts import is_vocabulary_word
from privdistill.shard import ID_PATTERN, prompt_vocabulary

# site fields that say how to reach the coordinator or how strict to be, not what is in a shard:
# changing them neither re-packages nor renames a shard
CONNECTION_FIELDS = ("coordinator_url", "ca_file", "key_file", "approval", "production")


class PolicyConfig(Strict):
    """What a shard's aggregate privacy numbers must show before it may leave the site."""

    # share of the KEPT synthetic images that copy a training image (pixel memorization, privdistill.metrics)
    max_kept_memorization_rate: float = Field(0.0, ge=0, le=1)
    # the same for ALL teacher samples before filtering; null = not a criterion
    max_teacher_memorization_rate: float | None = Field(None, ge=0, le=1)
    # the filter's recall on planted copies of training images (worst kind: exact, shift, noise, contrast)
    min_planted_recall: float = Field(1.0, ge=0, le=1)
    # the worst 95% lower bound of the filter's recall over the audited kinds of copies with enough cases
    # (blur, teacher near-copies, local marks, repeat visits...; filter.audit.recall); null = not a criterion
    min_recall_lower_bound: float | None = Field(None, ge=0, le=1)
    # the filter's measured drop rate of fresh images of new patients (filter.audit.fresh_drop_rate); null = not a criterion
    max_fresh_drop_rate: float | None = Field(None, ge=0, le=1)
    # the re-identification filter must have been enabled for the kept set
    require_filter: bool = True
    # fewest kept images a shard may hold
    min_kept: int = Field(1, ge=1)
    # the teacher's membership-inference ROC AUC (privdistill.audit.mia; 0.5 = no leak); null = not a criterion.
    # Compared with the UPPER end of its patient-level bootstrap 95% interval, not the point estimate
    max_teacher_mia_auc: float | None = Field(None, ge=0.5, le=1)
    # fewest member and non-member patients that AUC must rest on (checked when max_teacher_mia_auc is set)
    min_mia_patients: int = Field(20, ge=2)
    # the teacher's DP-SGD epsilon; null = not a criterion; when set, a teacher trained without DP fails
    max_epsilon: float | None = Field(None, gt=0)
    # the teacher's DP delta (checked when max_epsilon is set): a guarantee at delta 1e-2 is not one at 1e-5
    max_delta: float = Field(1e-5, gt=0, lt=1)
    # a passed fingerprint audit of this configuration, continued through the student
    # (`privdistill audit CONFIG --workdir WORKDIR` before `privdistill-site run`)
    require_fingerprint_audit: bool = False

    renamed = {"require_filter_enabled": RENAMED_REQUIRE_FILTER}


# a site's name as the coordinator registered it (and as shards carry it)
SiteId = Annotated[str, Field(pattern=ID_PATTERN,
                              description="1 to 63 lower-case letters, digits, '-' and '_', the first a letter or digit")]


def _provisioned_file(path: Path, info: ValidationInfo) -> Path:
    """A file from the provisioning bundle: missing is an error in production, a warning on a test site."""
    full = resolved(path, info)
    ctx = load_context(info)
    if ctx is None or full.is_file():
        return full
    problem = f"file not found: {full} (copy it from the site's provisioning bundle)"
    if info.data.get("production", True) is False:
        ctx.warnings.append(f"site.{info.field_name}: {problem}")
        return full
    raise ValueError(problem)


def _site_key(path: Path, info: ValidationInfo) -> Path:
    """The site's private key: see _provisioned_file; when it is there it must load and be private (any site)."""
    from privdistill.identity import load_private_key

    full = _provisioned_file(path, info)
    if load_context(info) is not None and full.is_file():
        try:
            load_private_key(full)
        except ConfigError as err:
            raise ValueError("; ".join(err.problems)) from None
    return full


class SiteSection(Strict):
    """Who this site is, where it sends shards, and who must approve them."""

    # the site name the coordinator registered (site-connection.yaml: site_id)
    id: SiteId
    coordinator_url: str  # https://HOST:PORT
    # production: a disabled filter or a missing key/CA file is an error, not a warning (before the files:
    # their validators read it)
    production: bool = True
    # CA certificate that signed the coordinator's TLS certificate (relative to this yaml)
    ca_file: Annotated[Path, AfterValidator(_provisioned_file)]
    # the site's Ed25519 private key, mode 0600 (relative to this yaml)
    key_file: Annotated[Path, AfterValidator(_site_key)]
    approval: Literal["manual", "auto"] = "manual"  # auto: a shard that passes the policy is approved at once
    vocabulary_extra: list[str] = Field(default_factory=list)  # extra allow-listed prompt words (lowercase)
    policy: PolicyConfig = PolicyConfig()

    @field_validator("coordinator_url")
    @classmethod
    def _https(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError("must be an https://HOST:PORT URL (shards are never sent in clear)")
        if parts.query or parts.fragment or parts.username:
            raise ValueError("must not carry a query, fragment or user name")
        return v.rstrip("/")

    @field_validator("vocabulary_extra")
    @classmethod
    def _words(cls, v: list[str]) -> list[str]:
        bad = [i + 1 for i, w in enumerate(v) if not is_vocabulary_word(w)]
        if bad:  # entries by position only: a wrong entry may be a name
            raise ValueError(f"entries {bad}: each entry must be one lowercase ASCII word of letters/digits "
                             "(no spaces, no other script)")
        return v


def _filter_on(enabled: bool) -> list[str]:
    if not enabled:
        return ["filter.enabled: false lets unfiltered synthetic images leave the site; "
                "set it true (or site.production: false for a test site)"]
    return []


def _filter_required(required: bool) -> list[str]:
    if not required:
        return ["site.policy.require_filter: false lets an unfiltered shard pass the export policy; "
                "set it true (or site.production: false for a test site)"]
    return []


class SiteConfig(RunConfig):
    """The run configuration of a site agent: every privdistill section plus `site:`."""

    site: SiteSection

    checks: ClassVar[tuple[CrossCheck, ...]] = (
        *RunConfig.checks,
        CrossCheck(("filter.enabled",), _filter_on, strict_when="site.production"),
        CrossCheck(("site.policy.require_filter",), _filter_required, strict_when="site.production"),
    )


def parse_site_config(raw: Any, source: str | None = None, base_dir: Path | None = None) -> SiteConfig:
    """Validate a mapping into a SiteConfig, listing every problem of the run part and the site part at once."""
    return parse_model(SiteConfig, raw, source=source, base_dir=base_dir)


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate a site YAML file; relative paths resolve against the file's folder."""
    return load_model(SiteConfig, path, missing_hint=" (create one with `privdistill-site init DIR`)")


def shard_config_hash(cfg: SiteConfig) -> str:
    """sha256 of the resolved config minus the connection fields: what made the shard's content."""
    dump = cfg.model_dump(mode="json")
    dump["site"] = {k: v for k, v in dump["site"].items() if k not in CONNECTION_FIELDS}
    return config_hash(dump)


def vocabulary(cfg: SiteConfig, class_names: list[str]) -> list[str]:
    """The allow-listed prompt words: the template's fixed words, the class names and site.vocabulary_extra."""
    return prompt_vocabulary(cfg.data.prompt_template, class_names, cfg.site.vocabulary_extra)


class SiteConnection(Strict):
    """The provisioning bundle's site-connection.yaml (written by `privdistill-coordinator provision`)."""

    site_id: SiteId
    coordinator_url: str
    ca_file: ConfigPath
    key_file: ConfigPath
    superlink: str | None = None  # HOST:PORT of the Flower SuperLink
    flower_node_key: ConfigPath | None = None


def read_connection(path: Path) -> dict[str, str]:
    """The provisioned site-connection.yaml as `site:` values, with its file paths made absolute."""
    conn = load_model(SiteConnection, path, missing_hint=" (it is in the site's provisioning bundle)")
    return {"id": conn.site_id, "coordinator_url": conn.coordinator_url, "ca_file": str(conn.ca_file),
            "key_file": str(conn.key_file)}


TEMPLATE = """\
# privdistill site agent configuration. Fill every CHANGE-ME, then check it with
#   privdistill-site run site.yaml --workdir WORKDIR     (every problem is listed at once).
# Relative paths resolve against this file's folder. The sections other than `site:` are the
# privdistill run configuration (see examples/*.yaml in the privdistill repository).
name: site-run
seed: 0
data:
  source:                       # the real training images; they never leave this machine
    type: idx                   # idx | npz | folder (+ manifest.csv) | dicom
    images: CHANGE-ME/train-images-idx3-ubyte.gz
    labels: CHANGE-ME/train-labels-idx1-ubyte.gz
    class_names: [T-shirt, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle-boot]
  test_source:                  # real held-out images for the filter audit and local evaluation
    type: idx
    images: CHANGE-ME/t10k-images-idx3-ubyte.gz
    labels: CHANGE-ME/t10k-labels-idx1-ubyte.gz
    class_names: [T-shirt, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle-boot]
  classes: [1, 7, 8]
  max_per_class: 40
  max_test_per_class: 100
  resolution: 16
  visits: {count: 2, max_shift: 1}
  # prompt_template: "an image of a {label}"   # text conditioning: prompts are built ONLY from this
teacher:
  model: {block_out_channels: [16, 32], norm_num_groups: 8}
  train: {steps: 300, batch_size: 32, learning_rate: 1.0e-3, warmup_steps: 20, ema_decay: 0.99}
reid: {steps: 120, batch_size: 48, width: 16, embedding_dim: 32}
sample: {per_class: 30, steps: 20, batch_size: 90}
filter:
  enabled: true                 # production refuses false
  max_fresh_drop: 0.05          # alpha: share of fresh images of new patients the filter may drop (calibrated)
# privacy:                      # optional DP-SGD teacher (class conditioning only)
#   dp: {epsilon: 10}           # this run's budget; delta defaults to min(1e-5, 1/(N ln N))
#   budget: {epsilon: 10}       # the site's total per patient over EVERY DP run (ledger outside the work dir)
site:
  # From the provisioning bundle's site-connection.yaml (`privdistill-site init --connection FILE` fills these):
  id: CHANGE-ME                 # lowercase letters, digits, - and _ (the name the coordinator registered)
  coordinator_url: https://CHANGE-ME:8443
  ca_file: CHANGE-ME/ca.pem     # the coordinator's CA certificate
  key_file: CHANGE-ME/site.key  # this site's private key (mode 0600); it signs every shard and request
  approval: manual              # manual: a data steward runs `privdistill-site approve SHARD`; auto: policy decides
  production: true              # true: a disabled filter or a missing key/CA file is an error
  vocabulary_extra: []          # extra allow-listed prompt words; never names, dates or report text
  policy:                       # a shard failing any criterion is never exported
    max_kept_memorization_rate: 0.0       # kept synthetic images that copy a training image (fraction)
    max_teacher_memorization_rate: null   # the same before filtering (null: not checked)
    min_planted_recall: 1.0               # filter recall on planted copies of training images (worst kind)
    min_recall_lower_bound: null          # worst 95% lower bound of filter recall over audited kinds (null: not checked)
    max_fresh_drop_rate: null             # filter's drop rate of fresh images of new patients (null: not checked)
    require_filter: true                  # the re-identification filter must have run
    min_kept: 1                           # fewest images a shard may hold
    max_teacher_mia_auc: null             # upper end of the teacher's MIA AUC 95% interval (0.5 = no leak; null: not checked)
    min_mia_patients: 20                  # fewest member / non-member patients behind that AUC
    max_epsilon: null                     # teacher DP-SGD epsilon (null: not checked; set: DP is required)
    max_delta: 1.0e-5                     # teacher DP delta (checked with max_epsilon)
    require_fingerprint_audit: false      # a passed `privdistill audit` of this config, through the student
"""


def render_template(connection: dict[str, str] | None = None) -> str:
    """The commented template, with the `site:` connection values filled when ``connection`` is given."""
    text = TEMPLATE
    if connection:
        for key in ("id", "coordinator_url", "ca_file", "key_file"):
            line = yaml.safe_dump(connection[key]).splitlines()[0]
            text = re.sub(rf"^(  {key}: )\S+", r"\g<1>" + line.replace("\\", r"\\"), text, count=1, flags=re.M)
    return text
