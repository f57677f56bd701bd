"""Typed run configuration: YAML -> pydantic models that reject unknown keys and list every problem."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from privdistill.errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- data sources
class IdxSource(Strict):
    """gzip (or raw) IDX files, as Fashion-MNIST / MNIST ship them."""

    type: Literal["idx"]
    images: Path
    labels: Path | None = None
    class_names: list[str] | None = None


class NpzSource(Strict):
    """A MedMNIST-layout .npz (``{split}_images``, ``{split}_labels``)."""

    type: Literal["npz"]
    path: Path
    split: str = "train"
    class_names: list[str] | None = None


class FolderSource(Strict):
    """A folder of images plus a CSV manifest with columns file, and optionally label, prompt, patient_id."""

    type: Literal["folder"]
    root: Path
    manifest: Path | None = None  # default: root/manifest.csv
    class_names: list[str] | None = None


class DicomSource(Strict):
    """A folder tree of DICOM files; label and patient id come from named tags only."""

    type: Literal["dicom"]
    root: Path
    label_tag: str | None = None
    patient_id_tag: str = "PatientID"
    class_names: list[str] | None = None


Source = Annotated[IdxSource | NpzSource | FolderSource | DicomSource, Field(discriminator="type")]


class VisitsConfig(Strict):
    """Simulated repeat acquisitions of one patient (demo data without patient ids)."""

    count: int = Field(2, ge=1, le=100)
    max_shift: int = Field(1, ge=0, le=8)
    max_rotation_deg: float = Field(3.0, ge=0, le=45)
    intensity_jitter: float = Field(0.05, ge=0, le=0.5)


class PartitionConfig(Strict):
    """Keep one of ``count`` disjoint patient partitions of ``source`` (simulates separate hospitals
    from one public dataset). Assignment hashes the patient id, so it is stable and disjoint."""

    index: int = Field(ge=0)
    count: int = Field(ge=2, le=1000)

    @model_validator(mode="after")
    def _index_in_range(self) -> "PartitionConfig":
        if self.index >= self.count:
            raise ValueError(f"partition index {self.index} must be below count {self.count}")
        return self


class DataConfig(Strict):
    source: Source
    test_source: Source | None = None  # default: a patient-disjoint split of `source`
    test_fraction: float = Field(0.2, gt=0, lt=1)
    resolution: int = Field(28, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    classes: list[int] | None = None  # keep only these label values
    max_per_class: int | None = Field(None, ge=1)
    max_test_per_class: int | None = Field(None, ge=1)
    visits: VisitsConfig | None = None
    partition: PartitionConfig | None = None  # train source only; the test source is not partitioned
    prompt_template: str | None = None  # e.g. "an image of a {label}"; enables text conditioning data


# --------------------------------------------------------------------------- models / training
class ModelConfig(Strict):
    conditioning: Literal["class", "text"] = "class"
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = Field(1, ge=1, le=4)
    norm_num_groups: int = Field(8, ge=1)
    attention: bool = False  # attention blocks at the lowest resolution (class conditioning)
    num_train_timesteps: int = Field(1000, ge=10)
    beta_schedule: Literal["linear", "squaredcos_cap_v2", "scaled_linear"] = "squaredcos_cap_v2"
    # text conditioning only: small CLIP-style encoder built from config, or loaded from a local dir
    text_encoder_dim: int = Field(64, ge=8)
    text_encoder_layers: int = Field(2, ge=1)
    text_max_length: int = Field(16, ge=4)
    text_encoder_path: Path | None = None

    @model_validator(mode="after")
    def _groups_divide(self) -> "ModelConfig":
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}"
            )
        if not self.block_out_channels:
            raise ValueError("block_out_channels must list at least one width")
        return self


class TrainConfig(Strict):
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(50, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    checkpoint_every: int = Field(200, ge=1)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    log_every: int = Field(50, ge=1)


class DiffusionConfig(Strict):
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()


class SampleConfig(Strict):
    per_class: int = Field(100, ge=1)  # N images per class (or per prompt)
    steps: int = Field(50, ge=1, le=1000)  # DDIM steps
    eta: float = Field(0.0, ge=0, le=1)
    batch_size: int = Field(128, ge=1)


class ReidConfig(Strict):
    embedding_dim: int = Field(64, ge=8)
    width: int = Field(32, ge=4)
    steps: int = Field(400, ge=1)
    batch_size: int = Field(64, ge=4)
    learning_rate: float = Field(1e-3, gt=0)
    temperature: float = Field(0.1, gt=0)
    calibration_fraction: float = Field(0.2, gt=0, lt=1)  # patients held out for threshold calibration
    target_tpr: float = Field(0.95, gt=0, le=1)


class FilterConfig(Strict):
    enabled: bool = True
    pixel_near_duplicate: bool = True
    # a synthetic image is a pixel near-duplicate when its (smoothed) L2 distance to a training image
    # is below this fraction of the median nearest-neighbour distance between training images
    pixel_ratio: float = Field(1 / 3, gt=0, lt=1)
    pixel_max_shift: int = Field(1, ge=0, le=4)  # also match copies displaced by up to this many pixels
    chunk_size: int = Field(4096, ge=16)
    review_grid_max: int = Field(32, ge=0)


class EvaluateConfig(Strict):
    classifier_steps: int = Field(600, ge=1)
    classifier_batch_size: int = Field(128, ge=1)
    memorization_ratio: float = Field(1 / 3, gt=0, lt=1)
    independent_reid_seed_offset: int = 1000
    # the independent re-identification model's own operating point, fixed so that reid_rate does
    # not move when the filter's reid.target_tpr is tuned
    reid_target_tpr: float = Field(0.95, gt=0, le=1)


class RunConfig(Strict):
    """The whole pipeline's configuration."""

    name: str = "privdistill-run"
    seed: int = 0
    data: DataConfig
    teacher: DiffusionConfig = DiffusionConfig()
    student: DiffusionConfig | None = None  # default: same as teacher
    reid: ReidConfig = ReidConfig()
    sample: SampleConfig = SampleConfig()
    filter: FilterConfig = FilterConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @property
    def student_config(self) -> DiffusionConfig:
        return self.student if self.student is not None else self.teacher

    def section(self, name: str) -> dict[str, Any]:
        """JSON-safe dict of one section (used for stage fingerprints)."""
        value = self.student_config if name == "student" else getattr(self, name)
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        return value


def _format_pydantic(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; see examples/*.yaml for valid keys)"
        problems.append(f"{loc or '<root>'}: {msg}")
    return problems


def _source_paths(src: BaseModel) -> list[tuple[str, Path]]:
    names = {"idx": ["images", "labels"], "npz": ["path"], "folder": ["root", "manifest"], "dicom": ["root"]}
    return [(n, getattr(src, n)) for n in names[src.type] if getattr(src, n) is not None]


def parse_config(
    raw: Any, source: str | None = None, base_dir: Path | None = None, *, model: type[RunConfig] = RunConfig
) -> RunConfig:
    """Validate a mapping into a RunConfig (or the subclass ``model``); relative paths resolve against ``base_dir``."""
    if not isinstance(raw, dict):
        raise ConfigError(["<root>: the configuration must be a YAML mapping"], source)
    try:
        cfg = model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_pydantic(err), source) from None
    problems = []
    resolved = cfg.model_dump()
    for key in ("source", "test_source"):
        src = getattr(cfg.data, key)
        if src is None:
            continue
        for name, path in _source_paths(src):
            full = path if path.is_absolute() or base_dir is None else (base_dir / path)
            resolved["data"][key][name] = full
            if not full.exists():
                problems.append(f"data.{key}.{name}: path does not exist: {full}")
    for sec in ("teacher", "student"):
        m = getattr(cfg, sec)
        if m is not None and m.model.text_encoder_path is not None:
            p = m.model.text_encoder_path
            full = p if p.is_absolute() or base_dir is None else (base_dir / p)
            resolved[sec]["model"]["text_encoder_path"] = full
            if not full.is_dir():
                problems.append(f"{sec}.model.text_encoder_path: not a directory: {full}")
        if m is not None:
            factor = 2 ** (len(m.model.block_out_channels) - 1)
            if cfg.data.resolution % factor:
                problems.append(
                    f"{sec}.model.block_out_channels: {len(m.model.block_out_channels)} levels downsample by "
                    f"{factor}, which does not divide data.resolution={cfg.data.resolution}"
                )
        if m is not None and m.model.conditioning == "text" and cfg.data.prompt_template is None:
            if cfg.data.source.type not in ("folder",):
                problems.append(
                    f"{sec}.model.conditioning: 'text' needs prompts: set data.prompt_template "
                    "or use a folder source whose manifest has a prompt column"
                )
    if cfg.data.classes is not None and len(set(cfg.data.classes)) != len(cfg.data.classes):
        problems.append("data.classes: duplicate class values")
    if problems:
        raise ConfigError(problems, source)
    return model.model_validate(resolved)


def read_yaml(path: str | Path, *, missing_hint: str = "") -> Any:
    """A config file's parsed YAML; a missing file or a syntax error is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}{missing_hint}"], str(path))
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError([f"YAML syntax error: {err}"], str(path)) from None


def load_config(path: str | Path, *, model: type[RunConfig] = RunConfig) -> RunConfig:
    """Read and validate a YAML config file; raise ConfigError listing every problem."""
    path = Path(path)
    return parse_config(read_yaml(path), source=str(path), base_dir=path.resolve().parent, model=model)


def config_hash(data: Any) -> str:
    """Stable sha256 of a JSON-serialisable object."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()
