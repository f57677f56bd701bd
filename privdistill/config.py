"""Typed run configuration: YAML -> pydantic models that reject unknown keys and list every problem
(loaded by privdistill.config_loader in one pass; relative paths resolve against the config file's folder)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, Field, ValidationInfo, field_validator, model_validator

from privdistill.config_loader import (
    ClassList,
    ConfigPath,
    CrossCheck,
    ExistingDir,
    ExistingFile,
    ExistingPath,
    Strict,
    load_context,
    load_model,
    parse_model,
    resolved,
)


# --------------------------------------------------------------------------- data sources
class IdxSource(Strict):
    """gzip (or raw) IDX files, as Fashion-MNIST / MNIST ship them."""

    type: Literal["idx"]
    images: ExistingPath
    labels: ExistingPath | None = None
    class_names: list[str] | None = None


class NpzSource(Strict):
    """A MedMNIST-layout .npz (``{split}_images``, ``{split}_labels``)."""

    type: Literal["npz"]
    path: ExistingPath
    split: str = "train"
    class_names: list[str] | None = None


class FolderSource(Strict):
    """A folder of images plus a CSV manifest with columns file, and optionally label, prompt, patient_id."""

    type: Literal["folder"]
    root: ExistingPath
    manifest: ExistingPath | None = None  # default: root/manifest.csv
    class_names: list[str] | None = None


class DicomSource(Strict):
    """A folder tree of DICOM files; label and patient id come from named tags only."""

    type: Literal["dicom"]
    root: ExistingPath
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


def _private_file(path: Path, info: ValidationInfo) -> Path:
    """A secret's file: there, and readable by its owner only."""
    full = resolved(path, info)
    if load_context(info) is None:
        return full
    if not full.is_file():
        raise ValueError(f"file not found: {full} (write the PACS password there, then chmod 600 it)")
    from privdistill.identity import loose_mode

    if (mode := loose_mode(full)) is not None:
        raise ValueError(f"{full} is readable by group or others (mode {mode:04o}); run `chmod 600 {full}`")
    return full


class PacsCredentials(Strict):
    """HTTP basic credentials for a PACS; the password is read from a file (mode 0600), never written inline."""

    username: str = Field(min_length=1)
    password_file: Annotated[Path, AfterValidator(_private_file)]

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
    ca_file: ExistingFile | None = None  # https: CA bundle that signed the server's certificate (default: system CAs)
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

    rules = (CrossCheck(("index", "count"), lambda index, count: [f"partition index {index} must be below count "
                                                                  f"{count}"] if index >= count else []),)


class DataConfig(Strict):
    source: Source
    test_source: Source | None = None  # default: a patient-disjoint split of `source`
    test_fraction: float = Field(0.2, gt=0, lt=1)
    resolution: int = Field(28, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    classes: ClassList | None = None  # keep only these label values
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


def _groups_divide(widths: list[int], groups: int) -> list[str]:
    bad = [c for c in widths if c % groups]
    return [f"block_out_channels {bad} are not divisible by norm_num_groups={groups}"] if bad else []


def _model_source(kind: str, pretrained_path: Path | None, lora: LoraConfig | None) -> list[str]:
    if kind == "latent" and pretrained_path is None:
        return ["type: latent needs pretrained_path: a local diffusers pipeline folder (model_index.json, vae/, "
                "unet/, scheduler/[, text_encoder/, tokenizer/]), e.g. a Stable Diffusion checkpoint"]
    if kind == "pixel" and (pretrained_path is not None or lora is not None):
        return ["pretrained_path and lora need type: latent (a pixel model is built from this section)"]
    return []


class ModelConfig(Strict):
    # pixel: a UNet built from this section and trained from scratch on images;
    # latent: a frozen AutoencoderKL + pretrained UNet read from pretrained_path (a local diffusers pipeline
    # folder, e.g. a Stable Diffusion checkpoint), fine-tuned on VAE latents; the architecture keys below
    # (block_out_channels ... beta_schedule) are then the checkpoint's and are ignored
    type: Literal["pixel", "latent"] = "pixel"
    pretrained_path: ConfigPath | None = None  # checked with the data's resolution (privdistill.latent)
    lora: LoraConfig | None = None  # latent only
    conditioning: Literal["class", "text"] = "class"
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64, 64], min_length=1)
    layers_per_block: int = Field(1, ge=1, le=4)
    norm_num_groups: int = Field(8, ge=1)
    attention: bool = False  # attention blocks at the lowest resolution (class conditioning)
    num_train_timesteps: int = Field(1000, ge=10)
    beta_schedule: Literal["linear", "squaredcos_cap_v2", "scaled_linear"] = "squaredcos_cap_v2"
    # text conditioning only: small CLIP-style encoder built from config, or loaded from a local dir
    text_encoder_dim: int = Field(64, ge=8)
    text_encoder_layers: int = Field(2, ge=1)
    text_max_length: int = Field(16, ge=4)
    text_encoder_path: ExistingDir | None = None

    rules = (CrossCheck(("block_out_channels", "norm_num_groups"), _groups_divide),
             CrossCheck(("type", "pretrained_path", "lora"), _model_source))


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
    # ddim, or dpmpp (DPM-Solver++ 2M) / unipc (UniPC-2M), diffusers' multistep solvers; one model evaluation per
    # step for each. Default DPM-Solver++ 25 (was DDIM 50): at the demo's fully trained teacher it had better domain
    # FID and TSTR than DDIM 50 at half its model evaluations, by the rule registered before that run
    # (benchmarks/results/sampling_default.md). At 10 vs DDIM 20 it had not held (sampling.md): few steps are worse.
    solver: Literal["ddim", "dpmpp", "unipc"] = "dpmpp"
    steps: int = Field(25, ge=1, le=1000)  # solver steps = model evaluations per sample
    eta: float = Field(0.0, ge=0, le=1)  # DDIM only
    batch_size: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _eta_is_ddim(self) -> SampleConfig:
        if self.eta > 0 and self.solver != "ddim":  # eta is DDIM's stochasticity
            raise ValueError(f"sample.eta applies to the ddim solver only; set eta: 0 or solver: ddim "
                             f"(solver is {self.solver}{'' if 'solver' in self.model_fields_set else ', the default'})")
        return self


TARGET_TPR_REMOVED = (
    "removed: the filter is now calibrated on the decision it makes (each fresh image's best match against the "
    "training gallery); set filter.max_fresh_drop instead (alpha, the share of fresh images of new patients the "
    "filter may drop; default 0.05) and delete this key")


class ReidConfig(Strict):
    embedding_dim: int = Field(64, ge=8)
    width: int = Field(32, ge=4)
    steps: int = Field(400, ge=1)
    batch_size: int = Field(64, ge=4)
    learning_rate: float = Field(1e-3, gt=0)
    temperature: float = Field(0.1, gt=0)
    calibration_fraction: float = Field(0.2, gt=0, lt=1)  # patients held out for the pair diagnostics

    renamed = {"target_tpr": TARGET_TPR_REMOVED}


Detector = Literal["reid", "pixel", "local"]
DETECTORS: tuple[Detector, ...] = ("reid", "pixel", "local")


class FilterConfig(Strict):
    enabled: bool = True
    # alpha: at most this share of fresh images of patients outside the training set is dropped (conformal
    # calibration on held-out patients' best-match scores, split evenly between the detectors)
    max_fresh_drop: float = Field(0.05, gt=0, le=0.5)
    detectors: list[Detector] = Field(default_factory=lambda: list(DETECTORS), min_length=1)
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

    renamed = {"target_tpr": TARGET_TPR_REMOVED}


class ViTArchConfig(Strict):
    """A small ViT built from config (transformers ``ViTConfig``); nothing is downloaded."""

    patch_size: int | None = Field(None, ge=1)  # None: data.resolution // 4 (a 4x4 grid of patches, 16-64 px)
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(3, ge=1)
    num_heads: int = Field(4, ge=1)
    mlp_ratio: int = Field(2, ge=1)

    rules = (CrossCheck(("hidden_size", "num_heads"), lambda size, heads: [
        f"hidden_size={size} is not a multiple of num_heads={heads}"] if size % heads else []),)

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
    poisson_sampling: bool = True
    augment_multiplicity: int = Field(1, ge=1, le=64)  # (t, noise) draws averaged inside one per-unit gradient
    privacy_unit: Literal["patient", "image"] = "patient"
    grad_sample_mode: Literal["hooks", "functorch"] = "hooks"
    public_pretraining: PublicPretrainingConfig | None = None
    init_from: ExistingDir | None = None  # a local, non-sensitive model directory (DiffusionModel.save layout)

    @field_validator("poisson_sampling")
    @classmethod
    def _poisson(cls, v: bool) -> bool:
        if not v:
            raise ValueError("false is not supported: the RDP accountant's epsilon only holds for Poisson-sampled "
                             "batches; delete the key or set it true")
        return v

    rules = (CrossCheck(("public_pretraining", "init_from"), lambda pre, init: [
        "set either public_pretraining or init_from, not both"] if pre is not None and init is not None else []),)


class BudgetConfig(Strict):
    """The site's privacy budget per patient over EVERY DP run and semantic query on that patient, kept in
    an append-only ledger outside the work directory (privdistill.budget). ``epsilon`` null: runs are
    recorded but none is refused. ``delta`` default: min(1e-5, 1/(N ln N)). ``ledger`` default:
    $PRIVDISTILL_STATE_DIR/privacy_ledger.sqlite, else ~/.local/state/privdistill/privacy_ledger.sqlite."""

    epsilon: float | None = Field(None, gt=0)
    delta: float | None = Field(None, gt=0, lt=1)
    ledger: ConfigPath | None = None


class PrivacyConfig(Strict):
    dp: DPConfig | None = None
    budget: BudgetConfig | None = None


# --------------------------------------------------------------------------- rules across sections
def model_problems(where: str, model: ModelConfig, resolution: int, resolution_key: str) -> list[str]:
    """A model section against the image size: a pixel UNet's downsampling must divide it; a latent model's
    pretrained_path must be a usable local pipeline folder that can make it."""
    if model.type == "latent" and model.pretrained_path is not None:
        from privdistill.latent import pipeline_problems

        return [f"{where}.model.pretrained_path: {p}"
                for p in pipeline_problems(model.pretrained_path, model, resolution)]
    factor = 2 ** (len(model.block_out_channels) - 1)
    if model.type == "pixel" and resolution % factor:
        return [f"{where}.model.block_out_channels: {len(model.block_out_channels)} levels downsample by {factor}, "
                f"which does not divide {resolution_key}={resolution}"]
    return []


def _model_fits(where: str) -> CrossCheck:
    return CrossCheck((f"{where}.model", "data.resolution"),
                      lambda model, res: model_problems(where, model, res, "data.resolution"))


def _prompts_for(where: str) -> CrossCheck:
    def run(conditioning: str, template: str | None, source: Any) -> list[str]:
        if conditioning == "text" and template is None and source.type != "folder":
            return [f"{where}.model.conditioning: 'text' needs prompts: set data.prompt_template or use a folder "
                    "source whose manifest has a prompt column"]
        return []
    return CrossCheck((f"{where}.model.conditioning", "data.prompt_template", "data.source"), run)


def _dp_conditioning(epsilon: float, conditioning: str) -> list[str]:  # epsilon: privacy.dp is set
    if conditioning != "class":
        return ["privacy.dp: DP-SGD supports class conditioning only (the text encoder and its tokenizer would be "
                "trained on real prompts outside the guarantee); set teacher.model.conditioning: class"]
    return []


def _dp_batch(physical: int | None, logical: int) -> list[str]:
    if physical is not None and physical > logical:
        return [f"privacy.dp.physical_batch_size: {physical} exceeds the logical batch "
                f"teacher.train.batch_size={logical}"]
    return []


def _vit_patches(downstream: DownstreamConfig, resolution: int) -> list[str]:
    """The ViT's patches must tile the images."""
    if downstream.model == "cnn":
        return []
    try:
        downstream.vit.patch_for(resolution)
    except ValueError as err:
        return [f"evaluate.downstream.vit.patch_size: {err}"]
    return []


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

    checks: ClassVar[tuple[CrossCheck, ...]] = (
        _model_fits("teacher"), _model_fits("student"), _prompts_for("teacher"), _prompts_for("student"),
        CrossCheck(("privacy.dp.epsilon", "teacher.model.conditioning"), _dp_conditioning),
        CrossCheck(("privacy.dp.physical_batch_size", "teacher.train.batch_size"), _dp_batch),
        CrossCheck(("evaluate.downstream", "data.resolution"), _vit_patches),
    )

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


def parse_config(
    raw: Any, source: str | None = None, base_dir: Path | None = None, *, model: type[RunConfig] = RunConfig
) -> RunConfig:
    """Validate a mapping into a RunConfig (or the subclass ``model``); relative paths resolve against ``base_dir``."""
    return parse_model(model, raw, source=source, base_dir=base_dir)


def load_config(path: str | Path, *, model: type[RunConfig] = RunConfig) -> RunConfig:
    """Read and validate a YAML config file; raise ConfigError listing every problem."""
    return load_model(model, path)


def config_hash(data: Any) -> str:
    """Stable sha256 of a JSON-serialisable object."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()
