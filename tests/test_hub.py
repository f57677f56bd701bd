"""A saved pixel-space model is a diffusers pipeline folder: DiffusionPipeline.from_pretrained opens it and samples
exactly what privdistill's own sampler gives from the same starting noise."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from privdistill.config import ModelConfig, SampleConfig
from privdistill.models import DiffusionModel
from privdistill.sample import ddim_sample, sample_images

RES = 8
PROMPTS = ["an image of a trouser", "an image of a bag"]


def _model(conditioning: str) -> DiffusionModel:
    cfg = ModelConfig.model_validate({"block_out_channels": [8, 16], "norm_num_groups": 4, "num_train_timesteps": 50,
                                      "conditioning": conditioning, "text_encoder_dim": 8, "text_encoder_layers": 1})
    return DiffusionModel.from_config(cfg, resolution=RES, channels=1, class_names=["trouser", "bag"],
                                      prompts=PROMPTS, seed=3)


def _open(folder: Path) -> Any:  # a PrivdistillPipeline loaded from the folder's pipeline.py
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_class_conditional_model_opens_in_diffusers_and_samples_as_privdistill(tmp_path: Path, one_thread) -> None:
    # Prepare
    model = _model("class")
    model.save(tmp_path / "m")

    # Execute
    pipe = _open(tmp_path / "m")
    out = pipe(class_labels=["bag", 0], num_inference_steps=3, output_type="np",
               generator=torch.Generator().manual_seed(5)).images

    # Assert: the folder follows diffusers' custom-pipeline convention and samples as privdistill does
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "PrivdistillPipeline"] and index["text_encoder"] == [None, None]
    assert type(pipe).__name__ == "PrivdistillPipeline" and pipe.config.class_names == ["trouser", "bag"]
    assert out.shape == (2, RES, RES, 1)
    # with its defaults (DPM-Solver++), as privdistill samples with its own defaults
    ours = sample_images(model, labels=np.array([1, 0]), steps=3, seed=5, progress=False)
    np.testing.assert_allclose(out, ours.transpose(0, 2, 3, 1) / 2 + 0.5, atol=1e-5)
    call = inspect.signature(type(pipe).__call__).parameters
    assert (call["solver"].default, call["num_inference_steps"].default) == (SampleConfig().solver,
                                                                             SampleConfig().steps)
    with pytest.raises(ValueError, match="eta applies to the ddim solver only"):
        pipe(class_labels=[0], num_inference_steps=2, eta=0.5)
    assert DiffusionModel.load(tmp_path / "m").class_names == ["trouser", "bag"]  # privdistill's loader still works
    from privdistill.hub import PrivdistillPipeline

    local = PrivdistillPipeline.from_folder(tmp_path / "m")  # the installed class, pipeline.py not executed
    local.set_progress_bar_config(disable=True)
    again = local(class_labels=[1, 0], num_inference_steps=3, output_type="np",
                  generator=torch.Generator().manual_seed(5)).images
    np.testing.assert_allclose(again, out, atol=1e-6)
    with pytest.raises(ValueError, match="unknown class 'coat'"):
        pipe(class_labels=["coat"], num_inference_steps=1)


def test_text_conditioned_model_opens_in_diffusers_and_samples_as_privdistill(tmp_path: Path, one_thread) -> None:
    # Prepare
    model = _model("text")
    model.save(tmp_path / "m")

    # Execute
    pipe = _open(tmp_path / "m")
    out = pipe(prompt=PROMPTS, num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(2),
               solver="ddim")

    # Assert: tokenizer/ and text_encoder/ are pipeline components; same images as privdistill's sampler
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel" and pipe.tokenizer is not None
    images = out.images
    assert images.shape == (2, 1, RES, RES)
    ours = ddim_sample(model, prompts=PROMPTS, steps=3, seed=2, progress=False)
    np.testing.assert_allclose(images.numpy(), ours / 2 + 0.5, atol=1e-5)
    loaded = DiffusionModel.load(tmp_path / "m")
    assert loaded.conditioning == "text" and loaded.text_max_length == model.text_max_length
    with pytest.raises(ValueError, match="text-conditioned: pass prompt"):
        pipe(class_labels=[0], num_inference_steps=1)
