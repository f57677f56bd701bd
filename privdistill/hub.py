"""A pixel-space diffusion pipeline conditioned on class labels or on prompts, for diffusers.

This file is self-contained (torch and diffusers only): privdistill copies it into every pixel-space model
folder it saves as ``pipeline.py`` and names it in ``model_index.json`` (``"_class_name": ["pipeline",
"PrivdistillPipeline"]``, diffusers' convention for a pipeline whose code travels with its weights), so anyone
opens a released student without privdistill::

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, local_files_only=True)
    images = pipe(class_labels=["normal", 1]).images              # class-conditional, DPM-Solver++ 25 steps
    images = pipe(prompt=["an image of a trouser"]).images        # text-conditioned
    images = pipe(class_labels=[0], solver="ddim", num_inference_steps=50, eta=0.5).images

Where privdistill is installed, ``PrivdistillPipeline.from_folder(folder)`` opens it without running the folder's
code."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler

PIPELINE_MODULE = "pipeline"  # the pipeline's code travels in <folder>/pipeline.py
INDEX_FILE = "model_index.json"
SOLVERS = ("ddim", "dpmpp", "unipc")


def sampling_scheduler(config: Any, solver: str, eta: float = 0.0) -> Any:  # diffusers schedulers: untyped mixins
    """A fresh sampling scheduler over a model's training noise schedule (``from_config``, as a diffusers pipeline
    swaps schedulers): ddim, dpmpp (DPM-Solver++ 2M) or unipc (UniPC-2M). privdistill's own sampler uses this too.
    ValueError for an unknown solver, or for ``eta`` > 0 (DDIM's stochasticity) with another solver.

    The model's own timestep spacing is passed explicitly: diffusers' ``from_config`` leaves out the keys a config
    holds only as defaults, so a freshly built model's scheduler would hand a multistep solver ITS default spacing
    ("linspace") while the same model loaded from disk hands it the model's ("leading"): different timesteps, and
    different images, for the same weights. Every benchmark sampled loaded models, i.e. the model's spacing."""
    if eta > 0 and solver != "ddim":
        raise ValueError(f"eta applies to the ddim solver only (solver is {solver}); use the ddim solver or eta 0")
    spacing = {"timestep_spacing": config.get("timestep_spacing", "leading")}
    if solver == "ddim":
        return DDIMScheduler.from_config(config, **spacing)
    if solver == "dpmpp":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2, **spacing)
    if solver == "unipc":
        return UniPCMultistepScheduler.from_config(config, solver_order=2, **spacing)
    raise ValueError(f"unknown sampling solver {solver!r}: use one of {', '.join(SOLVERS)}")


class PrivdistillPipeline(DiffusionPipeline):
    """Generate images by DDIM in pixel space, one per class label (``class_labels``) or prompt (``prompt``)."""

    _optional_components = ["text_encoder", "tokenizer"]

    def __init__(self, unet: Any, scheduler: Any, text_encoder: Any = None, tokenizer: Any = None,
                 class_names: list[str] | None = None, text_max_length: int = 16) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
        self.register_to_config(class_names=list(class_names or []), text_max_length=int(text_max_length))

    @classmethod
    def from_folder(cls, folder: str | Path) -> PrivdistillPipeline:
        """Open a folder saved with this pipeline without executing its pipeline.py (this class is used instead):
        only diffusers and transformers classes named in model_index.json are loaded, from local files."""
        folder = Path(folder)
        index = json.loads((folder / INDEX_FILE).read_text())
        parts: dict[str, Any] = {}
        for name in ("unet", "scheduler", "text_encoder", "tokenizer"):
            library, class_name = index.get(name) or (None, None)
            if library is None:
                continue
            if library not in ("diffusers", "transformers"):
                raise ValueError(f"{folder / INDEX_FILE}: {name} is a {library}.{class_name}; expected a diffusers "
                                 "or transformers class")
            loader = getattr(importlib.import_module(library), str(class_name))
            parts[name] = loader.from_pretrained(folder / name, local_files_only=True)
        return cls(**parts, class_names=index.get("class_names"), text_max_length=index.get("text_max_length", 16))

    def _labels(self, class_labels: list[int | str] | torch.Tensor) -> torch.Tensor:
        """Class indices, or names from ``config.class_names``, as a 1-D long tensor."""
        if isinstance(class_labels, torch.Tensor):
            return class_labels.to(self.device, torch.long).reshape(-1)
        names = list(self.config["class_names"])
        out = []
        for c in class_labels:
            if isinstance(c, str):
                if c not in names:
                    raise ValueError(f"unknown class {c!r}; this model's classes: {names}")
                c = names.index(c)
            if not 0 <= int(c) < max(1, len(names)):
                raise ValueError(f"class index {c} out of range; this model has {len(names)} classes: {names}")
            out.append(int(c))
        return torch.tensor(out, dtype=torch.long, device=self.device)

    def _condition(self, class_labels: Any, prompt: str | list[str] | None) -> tuple[int, dict[str, torch.Tensor]]:
        if self.text_encoder is not None:
            if prompt is None:
                raise ValueError("this model is text-conditioned: pass prompt=[...]")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            tok = self.tokenizer(prompts, padding="max_length", truncation=True,
                                 max_length=int(self.config["text_max_length"]), return_tensors="pt")
            hidden = self.text_encoder(input_ids=tok["input_ids"].to(self.device),
                                       attention_mask=tok["attention_mask"].to(self.device)).last_hidden_state
            return len(prompts), {"encoder_hidden_states": hidden.to(self.unet.dtype)}
        if class_labels is None:
            raise ValueError(f"this model is class-conditional: pass class_labels=[...] (indices or names of "
                             f"{list(self.config['class_names'])})")
        labels = self._labels(class_labels)
        cond: dict[str, torch.Tensor] = {"class_labels": labels}
        width = getattr(self.unet.config, "cross_attention_dim", None)
        if width:  # a text (cross-attention) UNet used with classes: an empty context
            cond["encoder_hidden_states"] = torch.zeros(len(labels), 1, int(width), device=self.device,
                                                        dtype=self.unet.dtype)
        return len(labels), cond

    @torch.no_grad()
    def __call__(self, class_labels: list[int | str] | torch.Tensor | None = None,
                 prompt: str | list[str] | None = None, num_inference_steps: int = 25, eta: float = 0.0,
                 generator: torch.Generator | None = None, output_type: str = "pil",
                 return_dict: bool = True, solver: str = "dpmpp") -> Any:
        """Images in [0, 1]: PIL images, an NHWC numpy array (``"np"``) or an NCHW tensor (``"pt"``).
        ``solver``: dpmpp (default, as privdistill samples), unipc or ddim (``eta`` > 0 is DDIM's only)."""
        scheduler = sampling_scheduler(self.scheduler.config, solver, eta)
        n, cond = self._condition(class_labels, prompt)
        size = int(self.unet.config.sample_size)
        shape = (n, int(self.unet.config.in_channels), size, size)
        scheduler.set_timesteps(num_inference_steps)
        x = torch.randn(shape, generator=generator, dtype=self.unet.dtype).to(self.device) * scheduler.init_noise_sigma
        for t in self.progress_bar(scheduler.timesteps):
            eps = self.unet(scheduler.scale_model_input(x, t), t, **cond).sample
            if solver == "ddim":
                x = scheduler.step(eps, t, x, eta=eta, generator=generator).prev_sample
            else:
                x = scheduler.step(eps, t, x).prev_sample
        images = (x.clamp(-1, 1) / 2 + 0.5).float()
        if output_type == "pt":
            out: Any = images
        else:
            out = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                out = self.numpy_to_pil(out)
        return ImagePipelineOutput(images=out) if return_dict else (out,)


def save_pipeline_folder(pipe: PrivdistillPipeline, path: Path) -> None:
    """``pipe.save_pretrained(path)``, this file beside it as pipeline.py, and model_index.json naming it."""
    pipe.save_pretrained(path)
    shutil.copyfile(Path(__file__), path / f"{PIPELINE_MODULE}.py")
    index = json.loads((path / INDEX_FILE).read_text())
    index["_class_name"] = [PIPELINE_MODULE, PrivdistillPipeline.__name__]
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
