"""A class-conditional latent diffusion pipeline (VAE + UNet with a class embedding) for diffusers.

This file is self-contained (torch and diffusers only): privdistill copies it into every class-conditional
latent model folder as ``pipeline.py``, so the folder opens with
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` (diffusers runs a folder's pipeline.py only
with that flag, also through ``LatentClassPipeline.from_pretrained``)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput


class LatentClassPipeline(DiffusionPipeline):
    """Generate images of given class indices by DDIM in the VAE's latent space."""

    model_cpu_offload_seq = "unet->vae"

    def __init__(self, vae, unet, scheduler) -> None:
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, class_labels: list[int] | torch.Tensor, num_inference_steps: int = 50, eta: float = 0.0,
                 generator: torch.Generator | None = None, output_type: str = "pil", return_dict: bool = True):
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=self.device).reshape(-1)
        size = int(self.unet.config.sample_size)
        shape = (len(labels), int(self.unet.config.in_channels), size, size)
        latents = torch.randn(shape, generator=generator, dtype=self.unet.dtype).to(self.device)
        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps)
        cond = {"class_labels": labels}
        if getattr(self.unet.config, "cross_attention_dim", None):  # a text UNet used with classes: empty context
            cond["encoder_hidden_states"] = torch.zeros(len(labels), 1, int(self.unet.config.cross_attention_dim),
                                                        device=self.device, dtype=self.unet.dtype)
        for t in self.progress_bar(scheduler.timesteps):
            eps = self.unet(latents, t, **cond).sample
            latents = scheduler.step(eps, t, latents, eta=eta, generator=generator).prev_sample
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        images = self.vae.decode(latents / self.vae.config.scaling_factor + shift).sample
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            out = images
        else:
            out = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                out = self.numpy_to_pil(out)
        return ImagePipelineOutput(images=out) if return_dict else (out,)
