"""Sampling solvers: each one (DDIM, DPM-Solver++, UniPC) lands on the data when the noise prediction is
exact, is deterministic and independent of the batch size; eta belongs to DDIM only."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from privdistill.config import SampleConfig
from privdistill.errors import StageError
from privdistill.hub import SOLVERS
from privdistill.models import build_scheduler
from privdistill.sample import sample_dataset, sample_images

sys.path.insert(0, str(Path(__file__).parent))
from _ddp_worker import tiny_setup


def _alphas_cumprod(scheduler: Any) -> torch.Tensor:
    return scheduler.alphas_cumprod


class _PointModel:
    """A stand-in model whose data distribution is one image per class, with the exact noise prediction
    eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t): every correct solver must end on x0."""

    def __init__(self) -> None:
        from privdistill.config import ModelConfig

        self.scheduler: Any = build_scheduler(ModelConfig.model_validate({}))
        self.unet = torch.nn.Linear(1, 1)
        self.channels, self.resolution = 1, 4
        self.sample_shape = (1, 4, 4)
        self.targets = torch.stack([torch.full((1, 4, 4), -0.5), torch.linspace(-0.9, 0.9, 16).reshape(1, 4, 4)])
        self.abar = _alphas_cumprod(self.scheduler)

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet]

    def condition(self, labels: torch.Tensor, prompts: object, device: object) -> torch.Tensor:
        return labels

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        a = self.abar[t.long()].reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * self.targets[cond]) / (1 - a).sqrt()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize("solver", SOLVERS)
def test_solver_ends_on_the_data_with_exact_noise_prediction(solver: str) -> None:
    model = _PointModel()
    labels = np.array([0, 1, 1, 0])
    out = sample_images(model, labels=labels, solver=solver, steps=10, seed=3, progress=False)  # type: ignore[arg-type]  # duck-typed stand-in
    expected = model.targets[labels].numpy()
    assert np.abs(out - expected).max() < 1e-2


@pytest.mark.parametrize("solver", ["dpmpp", "unipc"])
def test_multistep_solvers_are_deterministic_and_batch_size_independent(solver: str) -> None:
    model, _, _ = tiny_setup()
    labels = np.array([0, 1, 0, 1, 1])
    a = sample_images(model, labels=labels, solver=solver, steps=4, batch_size=5, seed=7, progress=False)
    b = sample_images(model, labels=labels, solver=solver, steps=4, batch_size=2, seed=7, progress=False)
    c = sample_images(model, labels=labels, solver=solver, steps=4, batch_size=5, seed=8, progress=False)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.abs(a - c).mean() > 0.1


def test_sample_dataset_uses_the_configured_solver() -> None:
    model, _, _ = tiny_setup()
    default = SampleConfig.model_validate({})  # the default (benchmarks/results/sampling_default.md)
    assert (default.solver, default.steps) == ("dpmpp", 25)
    ddim = sample_dataset(model, SampleConfig.model_validate({"per_class": 2, "steps": 3, "solver": "ddim"}), seed=0)
    unipc = sample_dataset(model, SampleConfig.model_validate({"per_class": 2, "steps": 3, "solver": "unipc"}), seed=0)
    assert unipc.labels is not None and list(unipc.labels) == [0, 0, 1, 1]
    assert np.abs(ddim.images - unipc.images).mean() > 1e-3


def test_eta_with_a_multistep_solver_is_refused() -> None:
    with pytest.raises(ValidationError, match="eta applies to the ddim solver only"):
        SampleConfig.model_validate({"solver": "dpmpp", "eta": 0.5})
    with pytest.raises(ValidationError, match="set eta: 0 or solver: ddim .solver is dpmpp, the default"):
        SampleConfig.model_validate({"eta": 0.5})  # a config written for the old DDIM default: told what to set
    assert SampleConfig.model_validate({"solver": "ddim", "eta": 0.5}).eta == 0.5
    model, _, _ = tiny_setup()  # the sampler itself, called without a config, refuses it too
    with pytest.raises(StageError, match="eta applies to the ddim solver only .solver is unipc"):
        sample_images(model, labels=np.array([0]), solver="unipc", steps=2, eta=0.5, progress=False)


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_model_samples_the_same_built_in_memory_and_loaded_from_disk(solver: str, tmp_path: Path) -> None:
    """diffusers' from_config drops config keys held only as defaults, so a fresh model's scheduler handed the
    multistep solvers their own timestep spacing and a loaded one the model's: other timesteps, other images."""
    from privdistill.models import DiffusionModel

    model, _, _ = tiny_setup()
    model.save(tmp_path / "m")
    loaded = DiffusionModel.load(tmp_path / "m")
    labels = np.array([0, 1, 1])
    a = sample_images(model, labels=labels, solver=solver, steps=3, seed=4, progress=False)
    b = sample_images(loaded, labels=labels, solver=solver, steps=3, seed=4, progress=False)
    np.testing.assert_allclose(a, b, atol=1e-5)
