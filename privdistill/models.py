"""Conditional diffusion models with diffusers: pixel-space UNet2DModel with class embeddings or
UNet2DConditionModel with a small text encoder, built from config; or a latent model (frozen VAE +
pretrained UNet, see privdistill.latent). Saved in diffusers' save_pretrained layout."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from transformers import CLIPTextModel, PreTrainedTokenizerFast

from privdistill.config import ModelConfig
from privdistill.errors import ConfigError, StageError
from privdistill.text import build_text_encoder, encode_prompts, load_text_encoder, train_tokenizer

META_FILE = "privdistill_model.json"
UNet: TypeAlias = UNet2DModel | UNet2DConditionModel


def check_resolution(cfg: ModelConfig, resolution: int) -> None:
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if resolution % factor:
        raise ConfigError(
            [
                f"model.block_out_channels: {len(cfg.block_out_channels)} levels downsample by {factor}, "
                f"which does not divide data.resolution={resolution}; use fewer levels or another resolution"
            ]
        )


def build_unet(cfg: ModelConfig, *, resolution: int, channels: int, num_classes: int) -> UNet:
    check_resolution(cfg, resolution)
    n = len(cfg.block_out_channels)
    common = dict(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
    )
    if cfg.conditioning == "class":
        down = ["DownBlock2D"] * n
        up = ["UpBlock2D"] * n
        if cfg.attention:
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        return UNet2DModel(
            **common,
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            num_class_embeds=num_classes,
        )
    down = ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)
    return UNet2DConditionModel(
        **common,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        cross_attention_dim=cfg.text_encoder_dim,
        attention_head_dim=max(1, min(cfg.block_out_channels) // 4),
    )


def build_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type="epsilon",
        clip_sample=True,
    )


@dataclass
class DiffusionModel:
    """A UNet with its noise scheduler and (for prompts) its text encoder and tokenizer."""

    unet: UNet
    scheduler: DDPMScheduler
    conditioning: str
    resolution: int
    channels: int
    class_names: list[str] = field(default_factory=list)
    text_encoder: CLIPTextModel | None = None
    tokenizer: PreTrainedTokenizerFast | None = None
    text_max_length: int = 16
    # latent models: the frozen autoencoder the UNet denoises the latents of; the text encoder is trained
    # only when it was built here (a pretrained one stays frozen)
    vae: AutoencoderKL | None = None
    text_trainable: bool = True
    vae_batch_size: int = 16  # images per VAE encode/decode pass (bounds its activation memory)

    def __post_init__(self) -> None:
        # the UNet's conv weights in channels-last (NHWC) layout: oneDNN then runs every convolution in NHWC, whatever
        # the input's layout; on CPU 1.2-1.3x per training step, 1.2-1.5x per forward pass at the demo's size
        # (benchmarks/channels_last.py; measured on CPU only). Saved files stay in the standard layout (``save``).
        self.unet.to(memory_format=torch.channels_last)

    @property
    def kind(self) -> str:
        return "pixel" if self.vae is None else "latent"

    @classmethod
    def from_config(
        cls, cfg: ModelConfig, *, resolution: int, channels: int, class_names: list[str],
        prompts: list[str] | None = None, seed: int = 0,
    ) -> DiffusionModel:
        """Build a fresh model; its initial weights depend only on ``seed`` (not on the process's RNG state)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls._build(cfg, resolution=resolution, channels=channels, class_names=class_names, prompts=prompts)

    @classmethod
    def _build(
        cls, cfg: ModelConfig, *, resolution: int, channels: int, class_names: list[str], prompts: list[str] | None,
    ) -> DiffusionModel:
        if cfg.type == "latent":
            return cls._build_latent(cfg, resolution=resolution, channels=channels, class_names=class_names,
                                     prompts=prompts)
        encoder = tokenizer = None
        if cfg.conditioning == "text":
            if cfg.text_encoder_path is not None:
                encoder, tokenizer = load_text_encoder(cfg.text_encoder_path)
            else:
                if not prompts:
                    raise StageError("text conditioning needs prompts in the training data")
                tokenizer = train_tokenizer(prompts)
                encoder = build_text_encoder(cfg, tokenizer)
        return cls(
            unet=build_unet(cfg, resolution=resolution, channels=channels, num_classes=max(1, len(class_names))),
            scheduler=build_scheduler(cfg),
            conditioning=cfg.conditioning,
            resolution=resolution,
            channels=channels,
            class_names=list(class_names),
            text_encoder=encoder,
            tokenizer=tokenizer,
            text_max_length=cfg.text_max_length,
        )

    @classmethod
    def _build_latent(
        cls, cfg: ModelConfig, *, resolution: int, channels: int, class_names: list[str], prompts: list[str] | None,
    ) -> DiffusionModel:
        from privdistill.latent import add_lora, build_parts

        parts = build_parts(cfg, resolution=resolution, class_names=class_names, prompts=prompts)
        vae_channels = int(parts.vae.config.in_channels)
        if {channels, vae_channels} - {1, 3}:
            raise ConfigError([f"data.channels={channels} cannot be mapped to the VAE's {vae_channels} channels"])
        if cfg.lora is not None:
            add_lora(parts.unet, cfg.lora)
        return cls(
            unet=parts.unet, scheduler=parts.scheduler, conditioning=cfg.conditioning, resolution=resolution,
            channels=channels, class_names=list(class_names), text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer, text_max_length=parts.text_max_length, vae=parts.vae,
            text_trainable=parts.text_trainable,
        )

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.text_encoder, self.vae) if m is not None]

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trained parameters: the UNet's (only its adapters under LoRA) and a text encoder built here."""
        mods = [self.unet] + ([self.text_encoder] if self.text_encoder is not None and self.text_trainable else [])
        return [p for m in mods for p in m.parameters() if p.requires_grad]

    def to(self, device: torch.device) -> DiffusionModel:
        for m in self.modules():
            m.to(device)
        return self

    # ------------------------------------------------------------------ the space the UNet denoises
    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the UNet denoises: the image, or for a latent model its VAE latent."""
        if self.vae is None:
            return (self.channels, self.resolution, self.resolution)
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (int(self.vae.config.latent_channels), self.resolution // f, self.resolution // f)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """NCHW images in [-1, 1] -> what the UNet denoises (identity for a pixel model). Latents are the
        scaled mean of the VAE posterior (deterministic); grayscale is repeated to the VAE's RGB."""
        if self.vae is None:
            return images
        vc = int(self.vae.config.in_channels)
        x = images.to(next(self.vae.parameters()).device, torch.float32)
        if x.shape[1] != vc:
            x = x.repeat(1, vc, 1, 1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        self.vae.eval()
        out = [(self.vae.encode(x[s : s + self.vae_batch_size]).latent_dist.mode() - shift)
               * self.vae.config.scaling_factor for s in range(0, len(x), self.vae_batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of ``encode``: latents -> NCHW images in [-1, 1] with the data's channel count."""
        if self.vae is None:
            return latents
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        self.vae.eval()
        z = latents.float() / self.vae.config.scaling_factor + shift
        x = torch.cat([self.vae.decode(z[s : s + self.vae_batch_size]).sample
                       for s in range(0, len(z), self.vae_batch_size)])
        if x.shape[1] != self.channels:
            x = x.mean(1, keepdim=True) if self.channels == 1 else x.repeat(1, self.channels, 1, 1)
        return x.clamp(-1, 1)

    def encode_images(self, images: np.ndarray, device: torch.device) -> torch.Tensor:
        """A whole NCHW float array, on ``device``, in the space the UNet denoises (a latent model: encoded
        chunk by chunk, so only the latents of the whole set are ever on the device)."""
        if self.vae is None:
            return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device)
        step = self.vae_batch_size
        return torch.cat([self.encode(torch.from_numpy(np.ascontiguousarray(images[s : s + step], np.float32)))
                          .to(device) for s in range(0, len(images), step)])

    def condition(
        self, labels: torch.Tensor | None, prompts: list[str] | None, device: torch.device,
        text_encoder: torch.nn.Module | None = None,
    ) -> dict:
        """Keyword arguments for the UNet's forward pass for this batch's conditioning."""
        if self.conditioning == "class":
            if labels is None:
                raise StageError("class-conditional model needs labels")
            cond = {"class_labels": labels.to(device)}
            width = getattr(self.unet.config, "cross_attention_dim", None)
            if width:  # a text (cross-attention) UNet used with classes: an empty context
                cond["encoder_hidden_states"] = torch.zeros(len(labels), 1, int(width), device=device)
            return cond
        if prompts is None:
            raise StageError("text-conditional model needs prompts")
        enc = text_encoder if text_encoder is not None else self.text_encoder
        if enc is None or self.tokenizer is None:
            raise StageError("text-conditional model has no text encoder or tokenizer")
        return {"encoder_hidden_states": encode_prompts(enc, self.tokenizer, prompts, self.text_max_length, device)}

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.unet(x, t, **cond).sample

    def save(self, path: Path) -> None:
        """A diffusers pipeline folder that ``DiffusionPipeline.from_pretrained`` opens: model_index.json, unet/,
        scheduler/[, text_encoder/, tokenizer/] (a latent model: vae/ too), the pipeline's code in pipeline.py where
        it is privdistill's own (privdistill.hub), and privdistill_model.json for ``load``."""
        path.mkdir(parents=True, exist_ok=True)
        # safetensors stores only contiguous tensors: the UNet goes back to the standard layout while it is written
        self.unet.to(memory_format=torch.contiguous_format)
        try:
            if self.vae is not None:
                from privdistill.latent import save_pipeline

                save_pipeline(path, vae=self.vae, unet=self.unet, scheduler=self.scheduler,
                              text_encoder=self.text_encoder, tokenizer=self.tokenizer)
            else:
                from privdistill.hub import PrivdistillPipeline, save_pipeline_folder

                save_pipeline_folder(PrivdistillPipeline(
                    unet=self.unet, scheduler=self.scheduler, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                    class_names=self.class_names if self.conditioning == "class" else [],
                    text_max_length=self.text_max_length), path)
        finally:
            self.unet.to(memory_format=torch.channels_last)
        meta = {
            "type": self.kind,
            "conditioning": self.conditioning,
            "resolution": self.resolution,
            "channels": self.channels,
            "class_names": self.class_names,
            "text_max_length": self.text_max_length,
        }
        (path / META_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: Path) -> DiffusionModel:
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise StageError(f"no privdistill model at {path} (missing {META_FILE})")
        meta = json.loads(meta_path.read_text())
        if meta.get("type", "pixel") == "latent":
            from privdistill.latent import load_saved

            parts = load_saved(path)
            return cls(
                unet=parts.unet, scheduler=parts.scheduler, conditioning=meta["conditioning"],
                resolution=meta["resolution"], channels=meta["channels"], class_names=meta["class_names"],
                text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                text_max_length=meta.get("text_max_length", parts.text_max_length), vae=parts.vae,
                text_trainable=False,
            )
        unet_cls = UNet2DModel if meta["conditioning"] == "class" else UNet2DConditionModel
        encoder = tokenizer = None
        if meta["conditioning"] == "text":
            encoder, tokenizer = load_text_encoder(path)
        return cls(
            unet=unet_cls.from_pretrained(path / "unet", local_files_only=True),
            scheduler=DDPMScheduler.from_pretrained(path / "scheduler", local_files_only=True),
            conditioning=meta["conditioning"],
            resolution=meta["resolution"],
            channels=meta["channels"],
            class_names=meta["class_names"],
            text_encoder=encoder,
            tokenizer=tokenizer,
            text_max_length=meta.get("text_max_length", 16),
        )
