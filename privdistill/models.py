"""Conditional diffusion models built from config with diffusers: UNet2DModel with class embeddings,
or UNet2DConditionModel with a small text encoder; saved in diffusers' save_pretrained layout."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from transformers import CLIPTextModel, PreTrainedTokenizerFast

from privdistill.config import ModelConfig
from privdistill.errors import ConfigError, StageError
from privdistill.text import build_text_encoder, encode_prompts, load_text_encoder, train_tokenizer

META_FILE = "privdistill_model.json"


def check_resolution(cfg: ModelConfig, resolution: int) -> None:
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if resolution % factor:
        raise ConfigError(
            [
                f"model.block_out_channels: {len(cfg.block_out_channels)} levels downsample by {factor}, "
                f"which does not divide data.resolution={resolution}; use fewer levels or another resolution"
            ]
        )


def build_unet(cfg: ModelConfig, *, resolution: int, channels: int, num_classes: int) -> torch.nn.Module:
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

    unet: torch.nn.Module
    scheduler: DDPMScheduler
    conditioning: str
    resolution: int
    channels: int
    class_names: list[str] = field(default_factory=list)
    text_encoder: CLIPTextModel | None = None
    tokenizer: PreTrainedTokenizerFast | None = None
    text_max_length: int = 16

    @classmethod
    def from_config(
        cls, cfg: ModelConfig, *, resolution: int, channels: int, class_names: list[str],
        prompts: list[str] | None = None, seed: int = 0,
    ) -> "DiffusionModel":
        """Build a fresh model; its initial weights depend only on ``seed`` (not on the process's RNG state)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls._build(cfg, resolution=resolution, channels=channels, class_names=class_names, prompts=prompts)

    @classmethod
    def _build(
        cls, cfg: ModelConfig, *, resolution: int, channels: int, class_names: list[str], prompts: list[str] | None,
    ) -> "DiffusionModel":
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

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.text_encoder) if m is not None]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.modules() for p in m.parameters()]

    def to(self, device: torch.device) -> "DiffusionModel":
        for m in self.modules():
            m.to(device)
        return self

    def condition(
        self, labels: torch.Tensor | None, prompts: list[str] | None, device: torch.device,
        text_encoder: torch.nn.Module | None = None,
    ) -> dict:
        """Keyword arguments for the UNet's forward pass for this batch's conditioning."""
        if self.conditioning == "class":
            if labels is None:
                raise StageError("class-conditional model needs labels")
            return {"class_labels": labels.to(device)}
        if prompts is None:
            raise StageError("text-conditional model needs prompts")
        enc = text_encoder if text_encoder is not None else self.text_encoder
        return {"encoder_hidden_states": encode_prompts(enc, self.tokenizer, prompts, self.text_max_length, device)}

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.unet(x, t, **cond).sample

    def save(self, path: Path) -> None:
        """diffusers/transformers save_pretrained layout: unet/, scheduler/, text_encoder/, tokenizer/."""
        path.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(path / "unet")
        self.scheduler.save_pretrained(path / "scheduler")
        if self.text_encoder is not None:
            self.text_encoder.save_pretrained(path / "text_encoder")
            self.tokenizer.save_pretrained(path / "tokenizer")
        meta = {
            "conditioning": self.conditioning,
            "resolution": self.resolution,
            "channels": self.channels,
            "class_names": self.class_names,
            "text_max_length": self.text_max_length,
        }
        (path / META_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: Path) -> "DiffusionModel":
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise StageError(f"no privdistill model at {path} (missing {META_FILE})")
        meta = json.loads(meta_path.read_text())
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
