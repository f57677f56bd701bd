"""Latent diffusion from a locally held diffusers pipeline folder (e.g. a Stable Diffusion checkpoint):
a frozen AutoencoderKL and a pretrained UNet, fine-tuned in full or through LoRA adapters (peft), saved
back as a pipeline folder that ``diffusers.DiffusionPipeline.from_pretrained`` opens. Nothing is
downloaded: every load is ``local_files_only``."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from transformers import CLIPTextModel

from privdistill.config import LoraConfig, ModelConfig
from privdistill.errors import ConfigError, StageError
from privdistill.models import UNet

INDEX_FILE = "model_index.json"
UNETS = {"UNet2DConditionModel": UNet2DConditionModel, "UNet2DModel": UNet2DModel}
CLASS_PIPELINE_MODULE = "pipeline"  # the class-conditional pipeline's code travels in <folder>/pipeline.py


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _levels(config: dict[str, Any]) -> int:
    return 2 ** (len(config.get("block_out_channels") or [1]) - 1)


def pipeline_problems(path: Path, model: ModelConfig, resolution: int) -> list[str]:
    """Everything that keeps ``path`` from serving as ``model``'s pretrained pipeline folder (empty: usable).
    Reads only the folders' JSON configs, so a config is validated without loading weights."""
    hint = ("point it at a local diffusers pipeline folder (model_index.json, vae/, unet/, scheduler/[, "
            "text_encoder/, tokenizer/]), e.g. a Stable Diffusion checkpoint copied onto this machine")
    if not path.is_dir():
        return [f"not a directory: {path}; {hint}"]
    vae, unet = _read_json(path / "vae" / "config.json"), _read_json(path / "unet" / "config.json")
    if vae is None or unet is None:
        return [f"{path} has no readable {sub}/config.json; {hint}" for sub, c in (("vae", vae), ("unet", unet))
                if c is None]
    problems: list[str] = []
    if vae.get("_class_name") != "AutoencoderKL":
        problems.append(f"{path}/vae is a {vae.get('_class_name')}, not an AutoencoderKL")
    kind = unet.get("_class_name")
    if kind not in UNETS:
        problems.append(f"{path}/unet is a {kind}; supported: {', '.join(UNETS)}")
    elif model.conditioning == "text" and kind != "UNet2DConditionModel":
        problems.append(f"conditioning: text needs a UNet2DConditionModel (cross-attention); {path}/unet is a {kind}")
    if vae.get("latent_channels") != unet.get("in_channels"):
        problems.append(f"the VAE makes {vae.get('latent_channels')}-channel latents but the UNet takes "
                        f"{unet.get('in_channels')} channels: vae/ and unet/ do not belong together")
    factor = _levels(vae) * _levels(unet)
    if resolution % factor:
        problems.append(f"data.resolution={resolution} is not a multiple of {factor} (the VAE downsamples by "
                        f"{_levels(vae)}, the UNet by {_levels(unet)} more)")
    sched = _read_json(path / "scheduler" / "scheduler_config.json")
    if sched is not None and sched.get("prediction_type", "epsilon") != "epsilon":
        problems.append(f"the scheduler predicts {sched['prediction_type']!r}; only epsilon-prediction checkpoints "
                        "are supported (e.g. Stable Diffusion 1.x or 2.x-base)")
    if model.conditioning == "text" and model.text_encoder_path is None:
        has_enc = (path / "text_encoder" / "config.json").is_file()
        if has_enc != (path / "tokenizer").is_dir():
            problems.append(f"{path} has one of text_encoder/ and tokenizer/ without the other")
    return problems


@dataclass
class LatentParts:
    """What a pretrained pipeline folder contributes to a DiffusionModel."""

    vae: AutoencoderKL
    unet: UNet
    scheduler: DDPMScheduler
    text_encoder: CLIPTextModel | None = None
    tokenizer: Any = None
    text_trainable: bool = False
    text_max_length: int = 77


def load_vae(path: Path) -> AutoencoderKL:
    vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True)
    vae.requires_grad_(False)
    return vae.eval()


def load_unet(path: Path, *, num_classes: int | None = None) -> UNet:
    """The folder's UNet; with ``num_classes``, a (new, randomly initialised) class embedding of that size."""
    config = _read_json(path / "unet" / "config.json") or {}
    cls = UNETS[config["_class_name"]]
    if num_classes is None or config.get("num_class_embeds") == num_classes:
        return cls.from_pretrained(path / "unet", local_files_only=True)
    unet = cls.from_pretrained(path / "unet", local_files_only=True, num_class_embeds=num_classes,
                               low_cpu_mem_usage=False, ignore_mismatched_sizes=True)
    # diffusers may leave weights absent from the checkpoint uninitialised; zero = the pretrained model's
    # behaviour for every class at the start of fine-tuning
    torch.nn.init.zeros_(unet.class_embedding.weight)
    return unet


def load_scheduler(path: Path, cfg: ModelConfig) -> DDPMScheduler:
    """The training schedule the checkpoint was trained with (any scheduler class's config), as DDPM;
    latents are never clipped."""
    if (path / "scheduler" / "scheduler_config.json").is_file():
        config = DDPMScheduler.load_config(path / "scheduler", local_files_only=True)
        return DDPMScheduler.from_config(config, clip_sample=False, prediction_type="epsilon")
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type="epsilon", clip_sample=False)


def load_text(path: Path) -> tuple[CLIPTextModel, Any]:
    from transformers import AutoTokenizer

    encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    return encoder, tokenizer


def build_parts(cfg: ModelConfig, *, resolution: int, class_names: list[str], prompts: list[str] | None) -> LatentParts:
    """Load the pretrained pieces named by ``cfg.pretrained_path`` and add what the site's task needs:
    a class embedding (class conditioning), or a text encoder (text conditioning: the folder's, the one at
    ``text_encoder_path``, or a small one trained from scratch on the prompts when neither exists)."""
    from privdistill.text import build_text_encoder, load_text_encoder, train_tokenizer

    if cfg.pretrained_path is None:
        raise ConfigError(["model.pretrained_path: required by model.type: latent (a local diffusers pipeline folder)"])
    path = Path(cfg.pretrained_path)
    problems = pipeline_problems(path, cfg, resolution)
    if problems:
        raise ConfigError([f"model.pretrained_path: {p}" for p in problems])
    vae = load_vae(path)
    unet = load_unet(path, num_classes=max(1, len(class_names)) if cfg.conditioning == "class" else None)
    unet.register_to_config(sample_size=resolution // _levels(dict(vae.config)))
    parts = LatentParts(vae=vae, unet=unet, scheduler=load_scheduler(path, cfg))
    if cfg.conditioning != "text":
        return parts
    tokenizer: Any
    if cfg.text_encoder_path is not None:
        encoder, tokenizer = load_text_encoder(cfg.text_encoder_path)
    elif (path / "text_encoder").is_dir():
        encoder, tokenizer = load_text(path)
    else:
        if not prompts:
            raise StageError("text conditioning needs prompts in the training data")
        dim = int(unet.config.cross_attention_dim)
        tokenizer = train_tokenizer(prompts)
        encoder = build_text_encoder(cfg.model_copy(update={"text_encoder_dim": dim}), tokenizer)
        parts.text_trainable = True
    parts.text_encoder, parts.tokenizer = encoder, tokenizer
    hidden = int(encoder.config.hidden_size)
    if hidden != int(unet.config.cross_attention_dim):
        raise ConfigError([f"model: the text encoder's width {hidden} differs from the UNet's cross_attention_dim "
                           f"{unet.config.cross_attention_dim}"])
    if parts.text_trainable:
        parts.text_max_length = cfg.text_max_length
    else:
        encoder.requires_grad_(False)
        parts.text_max_length = min(int(tokenizer.model_max_length), int(encoder.config.max_position_embeddings))
    parts.tokenizer.model_max_length = parts.text_max_length
    return parts


def add_lora(unet: UNet, lora: LoraConfig) -> None:
    """Freeze the UNet and train rank-``lora.rank`` adapters on ``lora.target_modules`` (plus the class
    embedding, which is new and has no pretrained value to keep)."""
    from peft import LoraConfig as PeftLoraConfig

    unet.requires_grad_(False)
    alpha = lora.alpha or lora.rank  # peft annotates lora_alpha as int but scales by lora_alpha / r, a float
    peft_cfg = PeftLoraConfig(r=lora.rank, lora_alpha=alpha, lora_dropout=lora.dropout,  # type: ignore[arg-type]  # float alpha, see above
                              init_lora_weights="gaussian", target_modules=list(lora.target_modules))
    try:
        unet.add_adapter(peft_cfg)
    except ValueError as err:
        raise ConfigError([f"model.lora.target_modules {lora.target_modules}: {err} (the attention projections of "
                           "a diffusers UNet are to_q, to_k, to_v, to_out.0; a UNet without attention needs e.g. "
                           "conv1, conv2)"]) from None
    if getattr(unet, "class_embedding", None) is not None:
        unet.class_embedding.requires_grad_(True)


def has_lora(unet: UNet) -> bool:
    return bool(getattr(unet, "_hf_peft_config_loaded", False))


def plain_unet(unet: UNet) -> UNet:
    """The UNet with its LoRA adapters merged into the base weights (a copy; ``unet`` itself is unchanged),
    so the saved folder needs neither peft nor an adapter file."""
    if not has_lora(unet):
        return unet
    merged = copy.deepcopy(unet)
    merged.fuse_lora()
    merged.unload_lora()
    merged.requires_grad_(True)
    return merged


def save_pipeline(path: Path, *, vae: AutoencoderKL, unet: UNet, scheduler: DDPMScheduler,
                  text_encoder: CLIPTextModel | None, tokenizer: Any) -> None:
    """A diffusers pipeline folder: StableDiffusionPipeline for text conditioning, else the class-conditional
    LatentClassPipeline whose code is written beside the weights (open it with trust_remote_code=True)."""
    unet = plain_unet(unet)
    if text_encoder is not None:
        from diffusers import StableDiffusionPipeline

        # privdistill encodes prompts with their attention mask (privdistill.text.encode_prompts); this
        # flag makes StableDiffusionPipeline.encode_prompt do the same, so the folder samples as trained
        text_encoder.config.use_attention_mask = True

        from diffusers import DDIMScheduler

        # DDIM with the training schedule: the sampler privdistill itself uses (privdistill.sample)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=DDIMScheduler.from_config(scheduler.config), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(path)
        return
    from privdistill import latent_pipeline
    from privdistill.latent_pipeline import LatentClassPipeline

    LatentClassPipeline(vae=vae, unet=unet, scheduler=scheduler).save_pretrained(path)
    (path / f"{CLASS_PIPELINE_MODULE}.py").write_text(Path(latent_pipeline.__file__).read_text())
    index = json.loads((path / INDEX_FILE).read_text())
    index["_class_name"] = [CLASS_PIPELINE_MODULE, LatentClassPipeline.__name__]
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def load_saved(path: Path) -> LatentParts:
    """The pieces of a folder written by ``save_pipeline`` (text encoder frozen: the model is trained)."""
    unet_cfg = _read_json(path / "unet" / "config.json") or {}
    if unet_cfg.get("_class_name") not in UNETS:
        raise StageError(f"{path}/unet is not a UNet this project can load")
    parts = LatentParts(vae=load_vae(path), unet=UNETS[unet_cfg["_class_name"]].from_pretrained(path / "unet",
                        local_files_only=True), scheduler=DDPMScheduler.from_pretrained(path / "scheduler",
                        local_files_only=True))
    if (path / "text_encoder").is_dir():
        parts.text_encoder, parts.tokenizer = load_text(path)
        parts.text_max_length = int(parts.tokenizer.model_max_length)
    return parts
