"""A tiny, randomly initialised Stable-Diffusion-layout pipeline folder (AutoencoderKL + UNet2DConditionModel
+ CLIP text encoder + tokenizer + scheduler) written with diffusers' save_pretrained: what a hospital's
local checkpoint looks like, at a size CPU tests and benchmarks can afford."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from privdistill.text import train_tokenizer

WORDS = ["an", "image", "of", "a", "trouser", "sneaker", "bag", "chest", "x-ray", "normal", "effusion"]


def tiny_pipeline(path: Path, *, vae_channels: tuple[int, ...] = (8, 16, 16), unet_channels: tuple[int, ...] = (16, 32),
                  layers_per_block: int = 1, cross_attention_dim: int = 32, text: bool = True, seed: int = 0) -> Path:
    """Write the folder and return it. The VAE downsamples by 2**(len(vae_channels)-1)."""
    torch.manual_seed(seed)
    n_vae = len(vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n_vae,
                        up_block_types=("UpDecoderBlock2D",) * n_vae, block_out_channels=vae_channels,
                        layers_per_block=1, latent_channels=4, norm_num_groups=8)
    n = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=unet_channels,
        layers_per_block=layers_per_block, norm_num_groups=8, cross_attention_dim=cross_attention_dim,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1), attention_head_dim=4,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, steps_offset=1)
    tokenizer = train_tokenizer([" ".join(WORDS)])
    tokenizer.model_max_length = 16
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cross_attention_dim, intermediate_size=2 * cross_attention_dim,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    if not text:  # a checkpoint without text encoder (e.g. an unconditional or class-conditional LDM)
        import shutil

        for sub in ("text_encoder", "tokenizer"):
            shutil.rmtree(path / sub)
    return path
