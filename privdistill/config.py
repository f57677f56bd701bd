"""Typed run configuration: YAML -> pydantic models that reject unknown keys and list every problem."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


def _not_keywords(names: list[str]) -> list[str]:
    from pydicom.datadict import tag_for_keyword

    return [n for n in names if tag_for_keyword(n) is None]


def _dicom_keyword(value: str) -> str:
    if _not_keywords([value]):
        raise ValueError(f"{value!r} is not a DICOM keyword (e.g. 'PatientID', 'StudyDescription', 'Modality')")
    return value


class PacsCredentials(Strict):
    """HTTP basic credentials for a PACS; the password is read from a file (mode 0600), never written inline."""

    username: str = Field(min_length=1)
    password_file: Path

    @model_validator(mode="before")
    @classmethod
    def _no_inline_password(cls, data: Any) -> Any:
        if isinstance(data, dict) and "password" in data:
            raise ValueError(
                "an inline 'password' is refused (configs get copied, logged and committed): write the password "
                "to a file readable only by the site agent's user (chmod 600) and set password_file to its path"
            )
        return data


class PacsSource(Strict):
    """A DICOM server (Orthanc REST or DICOMweb QIDO-RS/WADO-RS); label and patient id come from named tags only."""

    type: Literal["pacs"]
    url: str  # http(s)://HOST:PORT[/prefix] of the server
    api: Literal["orthanc", "dicomweb"] = "orthanc"
    dicomweb_root: str = "/dicom-web"  # api: dicomweb only; path of the DICOMweb service under url
    ca_file: Path | None = None  # https: CA bundle that signed the server's certificate (default: system CAs)
    credentials: PacsCredentials | None = None
    query: dict[str, str] = Field(default_factory=dict)  # DICOM keyword -> matching value (wildcards * ?)
    label_tag: str | None = None
    patient_id_tag: str = "PatientID"
    class_names: list[str] | None = None
    timeout_s: float = Field(30.0, gt=0, le=600)
    max_instances: int | None = Field(None, ge=1)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s)://HOST:PORT URL of the PACS (e.g. http://127.0.0.1:8042)")
        if parts.username or parts.password:
            raise ValueError("must not carry a user name or password; use data.source.credentials")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment; matching keys go in data.source.query")
        return v.rstrip("/")

    @field_validator("dicomweb_root")
    @classmethod
    def _root(cls, v: str) -> str:
        if not v.startswith("/") or "?" in v or "#" in v:
            raise ValueError("must be a path starting with '/' (e.g. /dicom-web)")
        return v.rstrip("/") or "/"

    @field_validator("label_tag", "patient_id_tag")
    @classmethod
    def _tag(cls, v: str | None) -> str | None:
        return v if v is None else _dicom_keyword(v)

    @field_validator("query")
    @classmethod
    def _query(cls, v: dict[str, str]) -> dict[str, str]:
        bad = _not_keywords(list(v))
        if bad:
            raise ValueError(f"{bad}: not DICOM keywords (e.g. Modality, StudyDescription, BodyPartExamined)")
        return v


Source = Annotated[IdxSource | NpzSource | FolderSource | DicomSource | PacsSource, Field(discriminator="type")]


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
    def _index_in_range(self) -> PartitionConfig:
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
class LoraConfig(Strict):
    """Low-rank adapters (peft) on the pretrained UNet's ``target_modules``: only the adapters (and a new
    class embedding) are trained, so optimiser state and, under DP-SGD, per-sample gradients are small."""

    rank: int = Field(8, ge=1, le=512)
    alpha: float | None = Field(None, gt=0)  # default: rank (scale 1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], min_length=1)


class ModelConfig(Strict):
    # pixel: a UNet built from this section and trained from scratch on images;
    # latent: a frozen AutoencoderKL + pretrained UNet read from pretrained_path (a local diffusers pipeline
    # folder, e.g. a Stable Diffusion checkpoint), fine-tuned on VAE latents; the architecture keys below
    # (block_out_channels ... beta_schedule) are then the checkpoint's and are ignored
    type: Literal["pixel", "latent"] = "pixel"
    pretrained_path: Path | None = None
    lora: LoraConfig | None = None  # latent only
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
    def _groups_divide(self) -> ModelConfig:
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}"
            )
        if not self.block_out_channels:
            raise ValueError("block_out_channels must list at least one width")
        if self.type == "latent" and self.pretrained_path is None:
            raise ValueError("type: latent needs pretrained_path: a local diffusers pipeline folder (model_index.json, "
                             "vae/, unet/, scheduler/[, text_encoder/, tokenizer/]), e.g. a Stable Diffusion checkpoint")
        if self.type == "pixel" and (self.pretrained_path is not None or self.lora is not None):
            raise ValueError("pretrained_path and lora need type: latent (a pixel model is built from this section)")
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
    # dpmpp (DPM-Solver++ 2M) or unipc (UniPC-2M), diffusers' multistep solvers, or ddim; one model evaluation
    # per step for each. DPM-Solver++ at half DDIM's steps held FID and TSTR on the demo teacher
    # (benchmarks/results/sampling.md), so it is the default, at half the former 50 DDIM steps.
    solver: Literal["ddim", "dpmpp", "unipc"] = "dpmpp"
    steps: int = Field(25, ge=1, le=1000)  # solver steps = model evaluations per sample
    eta: float = Field(0.0, ge=0, le=1)  # DDIM only
    batch_size: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _eta_is_ddim(self) -> SampleConfig:
        if self.eta > 0 and self.solver != "ddim":  # eta is DDIM's stochasticity
            raise ValueError(f"sample.eta applies to the ddim solver only; set eta: 0 or solver: ddim "
                             f"(solver is {self.solver})")
        return self


class ReidConfig(Strict):
    embedding_dim: int = Field(64, ge=8)
    width: int = Field(32, ge=4)
    steps: int = Field(400, ge=1)
    batch_size: int = Field(64, ge=4)
    learning_rate: float = Field(1e-3, gt=0)
    temperature: float = Field(0.1, gt=0)
    calibration_fraction: float = Field(0.2, gt=0, lt=1)  # patients held out for the pair diagnostics

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        return _refuse_target_tpr(data, "reid.target_tpr")


def _refuse_target_tpr(data: Any, where: str) -> Any:
    """The removed ``target_tpr`` key (reid or filter section): an error that names its replacement."""
    if isinstance(data, dict) and "target_tpr" in data:
        raise ValueError(
            f"{where} was removed: the filter is now calibrated on the decision it makes (each fresh image's best "
            "match against the training gallery); set filter.max_fresh_drop instead (alpha, the share of fresh "
            f"images of new patients the filter may drop; default 0.05) and delete {where}")
    return data


class FilterConfig(Strict):
    enabled: bool = True
    # alpha: at most this share of fresh images of patients outside the training set is dropped (conformal
    # calibration on held-out patients' best-match scores, split evenly between the detectors)
    max_fresh_drop: float = Field(0.05, gt=0, le=0.5)
    detectors: list[Literal["reid", "pixel", "local"]] = Field(default_factory=lambda: ["reid", "pixel", "local"],
                                                              min_length=1)
    # re-id score: "max" (best cosine similarity) or "cohort" (minus the next cohort_k patients' mean, over their spread)
    reid_score: Literal["max", "cohort"] = "max"
    cohort_k: int = Field(10, ge=2)
    local_patch: int = Field(4, ge=2)  # side (px) of the local detector's patches (stride half of it)
    null_fraction: float = Field(0.5, gt=0, lt=1)  # held-out patients for calibration; the rest audit it
    pixel_near_duplicate: bool = True
    # a synthetic image is a pixel near-duplicate when its (smoothed) L2 distance to a training image
    # is below this fraction of the median nearest-neighbour distance between training images
    pixel_ratio: float = Field(1 / 3, gt=0, lt=1)
    pixel_max_shift: int = Field(1, ge=0, le=4)  # also match copies displaced by up to this many pixels
    chunk_size: int = Field(4096, ge=16)
    review_grid_max: int = Field(32, ge=0)
    # the re-identification model, the filter, the memorization metric and the audits see images
    # downsampled to this size (never upsampled); null = data.resolution
    analysis_resolution: int | None = Field(None, ge=8, le=1024)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        return _refuse_target_tpr(data, "filter.target_tpr")


class ViTArchConfig(Strict):
    """A small ViT built from config (transformers ``ViTConfig``); nothing is downloaded."""

    patch_size: int | None = Field(None, ge=1)  # None: data.resolution // 4 (a 4x4 grid of patches, 16-64 px)
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(3, ge=1)
    num_heads: int = Field(4, ge=1)
    mlp_ratio: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _heads_divide(self) -> ViTArchConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        return self

    def patch_for(self, resolution: int) -> int:
        """The patch size for square images of ``resolution`` px; ValueError when it does not tile them."""
        p = self.patch_size if self.patch_size is not None else max(1, resolution // 4)
        if resolution % p:
            raise ValueError(f"patch size {p} does not divide the image size {resolution} px; "
                             f"set it to a divisor of {resolution}")
        return p


class DownstreamConfig(Strict):
    """The second downstream evaluator. ``cnn`` (default): only the fully labelled CNN TSTR; ``vit``: a ViT
    trained on a ``label_fraction`` of labelled images; ``semi_vit``: that ViT, then Semi-ViT's semi-supervised
    stage (EMA teacher, confidence-thresholded pseudo-labels, probabilistic pseudo-mixup) on the rest unlabelled."""

    model: Literal["cnn", "vit", "semi_vit"] = "cnn"
    label_fraction: float = Field(0.1, gt=0, le=1)
    vit: ViTArchConfig = ViTArchConfig()
    supervised_steps: int = Field(200, ge=1)
    semi_steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)  # labelled images per step
    unlabelled_ratio: int = Field(3, ge=1)  # unlabelled images per step = ratio x batch_size
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(20, ge=0)
    ema_decay: float = Field(0.99, gt=0, lt=1)
    confidence_threshold: float = Field(0.7, gt=0, le=1)
    unlabelled_weight: float = Field(1.0, ge=0)
    mixup_alpha: float = Field(0.8, ge=0)  # Beta(alpha, alpha) mixing ratio; 0 turns pseudo-mixup off


class EvaluateConfig(Strict):
    classifier_steps: int = Field(600, ge=1)
    classifier_batch_size: int = Field(128, ge=1)
    memorization_ratio: float = Field(1 / 3, gt=0, lt=1)
    independent_reid_seed_offset: int = 1000
    # the independent re-identification model's own operating point, fixed so that reid_rate does
    # not move when the filter's settings are tuned
    reid_target_tpr: float = Field(0.95, gt=0, le=1)
    downstream: DownstreamConfig = DownstreamConfig()


# --------------------------------------------------------------------------- differential privacy
class PublicPretrainingConfig(Strict):
    """PrivImage-style pretraining: a classifier trained on a PUBLIC labelled set votes, for each
    sensitive class, for its top-k public classes (one vote vector per privacy unit; L2 sensitivity
    sqrt(classes_k)); Gaussian noise of std ``query_sigma`` on the counts; the ``n_classes_selected``
    top public classes per sensitive class pretrain the teacher non-privately for ``steps`` steps."""

    source: Source
    classes_k: int = Field(1, ge=1)
    query_sigma: float = Field(gt=0)
    n_classes_selected: int = Field(1, ge=1)
    steps: int = Field(200, ge=1)
    max_per_class: int | None = Field(None, ge=1)  # public images kept per public class
    classifier_steps: int = Field(300, ge=1)


class DPConfig(Strict):
    """DP-SGD for the teacher (Opacus, RDP accountant, Poisson sampling of privacy units).

    ``epsilon`` is this run's budget (semantic query + training); ``delta`` defaults to min(1e-5, 1/(N ln N)),
    N = number of privacy units (patients), and a delta >= 1/N is refused. Every run is also charged to the
    site's ledger (``privacy.budget``), which refuses a run that takes a patient past the site's total.
    Without ``noise_multiplier`` the smallest noise that keeps the planned run within ``epsilon`` is computed; with it, a run whose
    planned epsilon exceeds the budget is refused. ``teacher.train.batch_size`` is the expected logical
    batch (sample rate = batch_size / N); ``physical_batch_size`` bounds memory."""

    epsilon: float = Field(gt=0)
    delta: float | None = Field(None, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    noise_multiplier: float | None = Field(None, gt=0)
    physical_batch_size: int | None = Field(None, ge=1)
    accountant: Literal["rdp"] = "rdp"
    poisson_sampling: bool = True
    augment_multiplicity: int = Field(1, ge=1, le=64)  # (t, noise) draws averaged inside one per-unit gradient
    privacy_unit: Literal["patient", "image"] = "patient"
    grad_sample_mode: Literal["hooks", "functorch"] = "hooks"
    public_pretraining: PublicPretrainingConfig | None = None
    init_from: Path | None = None  # a local, non-sensitive model directory (DiffusionModel.save layout)

    @model_validator(mode="after")
    def _sound(self) -> DPConfig:
        problems = []
        if not self.poisson_sampling:
            problems.append("poisson_sampling: false is not supported: the RDP accountant's epsilon only holds "
                            "for Poisson-sampled batches")
        if self.public_pretraining is not None and self.init_from is not None:
            problems.append("set either public_pretraining or init_from, not both")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class BudgetConfig(Strict):
    """The site's privacy budget per patient over EVERY DP run and semantic query on that patient, kept in
    an append-only ledger outside the work directory (privdistill.budget). ``epsilon`` null: runs are
    recorded but none is refused. ``delta`` default: min(1e-5, 1/(N ln N)). ``ledger`` default:
    $PRIVDISTILL_STATE_DIR/privacy_ledger.sqlite, else ~/.local/state/privdistill/privacy_ledger.sqlite."""

    epsilon: float | None = Field(None, gt=0)
    delta: float | None = Field(None, gt=0, lt=1)
    ledger: Path | None = None


class PrivacyConfig(Strict):
    dp: DPConfig | None = None
    budget: BudgetConfig | None = None


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
    privacy: PrivacyConfig | None = None  # absent: no formal guarantee (filter only)

    @property
    def student_config(self) -> DiffusionConfig:
        return self.student if self.student is not None else self.teacher

    @property
    def analysis_resolution(self) -> int:
        """The resolution privacy checks run at: filter.analysis_resolution, at most data.resolution."""
        res = self.filter.analysis_resolution
        return self.data.resolution if res is None else min(res, self.data.resolution)

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
    names = {"idx": ["images", "labels"], "npz": ["path"], "folder": ["root", "manifest"], "dicom": ["root"],
             "pacs": ["ca_file"]}
    return [(n, getattr(src, n)) for n in names[src.type] if getattr(src, n) is not None]


def _password_file_problems(key: str, src: BaseModel, base_dir: Path | None, resolved: dict[str, Any]) -> list[str]:
    """A PACS source's password_file must exist and be readable by its owner only; resolves it against base_dir."""
    creds = getattr(src, "credentials", None)
    if creds is None:
        return []
    path = creds.password_file
    full = path if path.is_absolute() or base_dir is None else (base_dir / path)
    resolved["data"][key]["credentials"]["password_file"] = full
    where = f"data.{key}.credentials.password_file"
    if not full.is_file():
        return [f"{where}: file not found: {full} (write the PACS password there, then chmod 600 it)"]
    from privdistill.identity import loose_mode

    if (mode := loose_mode(full)) is not None:
        return [f"{where}: {full} is readable by group or others (mode {mode:04o}); run `chmod 600 {full}`"]
    return []


def latent_problems(where: str, model: ModelConfig, resolution: int, base_dir: Path | None,
                    resolved: dict[str, Any]) -> list[str]:
    """A latent model's pretrained_path must be a usable local pipeline folder; resolves it against base_dir."""
    from privdistill.latent import pipeline_problems

    path = model.pretrained_path
    full = path if path.is_absolute() or base_dir is None else base_dir / path
    resolved["pretrained_path"] = full
    return [f"{where}.model.pretrained_path: {p}" for p in pipeline_problems(full, model, resolution)]


def _dp_problems(cfg: RunConfig, base_dir: Path | None, resolved: dict[str, Any]) -> list[str]:
    """Cross-section checks of privacy.dp; resolves its paths against base_dir."""
    budget = cfg.privacy.budget if cfg.privacy is not None else None
    if budget is not None and budget.ledger is not None and not budget.ledger.is_absolute() and base_dir is not None:
        resolved["privacy"]["budget"]["ledger"] = base_dir / budget.ledger
    dp = cfg.privacy.dp if cfg.privacy is not None else None
    if dp is None:
        return []
    problems, where, out = [], "privacy.dp", resolved["privacy"]["dp"]
    if cfg.teacher.model.conditioning != "class":
        problems.append(f"{where}: DP-SGD supports class conditioning only (the text encoder and its tokenizer "
                        "would be trained on real prompts outside the guarantee); set teacher.model.conditioning: class")
    if dp.physical_batch_size is not None and dp.physical_batch_size > cfg.teacher.train.batch_size:
        problems.append(f"{where}.physical_batch_size: {dp.physical_batch_size} exceeds the logical batch "
                        f"teacher.train.batch_size={cfg.teacher.train.batch_size}")
    if dp.init_from is not None:
        full = dp.init_from if dp.init_from.is_absolute() or base_dir is None else base_dir / dp.init_from
        out["init_from"] = full
        if not full.is_dir():
            problems.append(f"{where}.init_from: not a directory: {full}")
    if dp.public_pretraining is not None:
        src = dp.public_pretraining.source
        for name, path in _source_paths(src):
            full = path if path.is_absolute() or base_dir is None else (base_dir / path)
            out["public_pretraining"]["source"][name] = full
            if not full.exists():
                problems.append(f"{where}.public_pretraining.source.{name}: path does not exist: {full}")
    return problems


def _downstream_problems(cfg: RunConfig) -> list[str]:
    """The ViT's patches must tile the images."""
    ds = cfg.evaluate.downstream
    if ds.model == "cnn":
        return []
    try:
        ds.vit.patch_for(cfg.data.resolution)
    except ValueError as err:
        return [f"evaluate.downstream.vit.patch_size: {err}"]
    return []


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
        problems.extend(_password_file_problems(key, src, base_dir, resolved))
    for sec in ("teacher", "student"):
        m = getattr(cfg, sec)
        if m is not None and m.model.text_encoder_path is not None:
            p = m.model.text_encoder_path
            full = p if p.is_absolute() or base_dir is None else (base_dir / p)
            resolved[sec]["model"]["text_encoder_path"] = full
            if not full.is_dir():
                problems.append(f"{sec}.model.text_encoder_path: not a directory: {full}")
        if m is not None and m.model.type == "latent":
            problems.extend(latent_problems(sec, m.model, cfg.data.resolution, base_dir, resolved[sec]["model"]))
        elif m is not None:
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
    problems.extend(_dp_problems(cfg, base_dir, resolved))
    problems.extend(_downstream_problems(cfg))
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
