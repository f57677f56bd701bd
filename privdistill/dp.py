"""DP-SGD for the teacher with Opacus: per-unit clipping, Poisson sampling, virtual batches, RDP accounting."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from opacus.accountants import RDPAccountant
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchSplittingSampler
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator

from privdistill.config import BudgetConfig, DPConfig, TrainConfig
from privdistill.data.types import ImageSet
from privdistill.errors import ConfigError, StageError
from privdistill.models import DiffusionModel
from privdistill.train import Trainer, autocast_for, diffusion_loss, step_generator

log = structlog.get_logger(__name__)

History = list[tuple[float, float, int]]  # Opacus RDP history: (noise_multiplier, sample_rate, steps)


# ----------------------------------------------------------------------------- accounting
def epsilon_of(history: History, delta: float) -> float:
    """(epsilon, delta)-DP of the composed mechanisms in ``history`` (Opacus RDP accountant)."""
    acc = RDPAccountant()
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta)) if history else 0.0


def gaussian_query_entry(noise_std: float, l2_sensitivity: float) -> tuple[float, float, int]:
    """One un-subsampled Gaussian mechanism as an RDP history entry: noise multiplier std/sensitivity, q = 1."""
    return (noise_std / l2_sensitivity, 1.0, 1)


def noise_for_budget(
    target_epsilon: float, delta: float, *, sample_rate: float, steps: int, prior: Sequence[tuple[float, float, int]] = (), tol: float = 1e-3,
) -> float:
    """Smallest noise multiplier whose run (after ``prior``) stays within ``target_epsilon`` (bisection)."""
    prior = list(prior)
    spent = epsilon_of(prior, delta)
    if spent >= target_epsilon:
        raise ConfigError([f"privacy.dp.epsilon: the semantic query alone spends epsilon={spent:.3f} of the "
                           f"budget {target_epsilon}; raise public_pretraining.query_sigma or the budget"])

    def eps(sigma: float) -> float:
        return epsilon_of([*prior, (sigma, sample_rate, steps)], delta)

    lo, hi = 0.05, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ConfigError([f"privacy.dp.epsilon: no noise multiplier reaches epsilon={target_epsilon}"])
    while hi - lo > tol * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps(mid) > target_epsilon else (lo, mid)
    return hi


def privacy_units(data: ImageSet, unit: str) -> list[np.ndarray]:
    """Image indices of each privacy unit: all images of one patient, or each image alone."""
    if unit == "image" or data.patient_ids is None:
        return [np.array([i]) for i in range(len(data))]
    _, inverse = np.unique(np.asarray(data.patient_ids), return_inverse=True)
    return [np.flatnonzero(inverse == u) for u in range(inverse.max() + 1)]


def resolve_delta(dp: DPConfig, n_units: int) -> float:
    """The configured delta, or min(1e-5, 1/(N ln N)) (privdistill.budget.default_delta); a delta >= 1/N is
    refused (it would allow exposing a whole unit)."""
    from privdistill.budget import default_delta

    delta = dp.delta if dp.delta is not None else default_delta(n_units)
    if delta >= 1.0 / n_units:
        raise ConfigError([f"privacy.dp.delta: {delta:g} is not below 1/N = {1 / n_units:g} for N={n_units} "
                           "privacy units; use a delta well below 1/N (default min(1e-5, 1/(N ln N)))"])
    return delta


@dataclass(frozen=True)
class DPPlan:
    """What the accountant is told: noise, sample rate, steps, delta; and the epsilon the plan spends."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    n_units: int
    expected_batch_size: int
    planned_epsilon: float
    prior: History = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate, "steps": self.steps,
                "delta": self.delta, "n_units": self.n_units, "expected_batch_size": self.expected_batch_size,
                "planned_epsilon": self.planned_epsilon}


def plan_dp(dp: DPConfig, train: TrainConfig, n_units: int, *, prior: Sequence[tuple[float, float, int]] = ()) -> DPPlan:
    """Sample rate batch_size/N, delta, and the noise multiplier (given, or the smallest within the budget)."""
    problems = []
    if train.batch_size >= n_units:
        problems.append(f"teacher.train.batch_size: {train.batch_size} is not below the {n_units} privacy units; "
                        "DP-SGD needs sample rate batch_size/N < 1")
    if problems:
        raise ConfigError(problems)
    delta = resolve_delta(dp, n_units)
    q = train.batch_size / n_units
    sigma = dp.noise_multiplier
    if sigma is None:
        sigma = noise_for_budget(dp.epsilon, delta, sample_rate=q, steps=train.steps, prior=prior)
    planned = epsilon_of([*prior, (sigma, q, train.steps)], delta)
    if planned > dp.epsilon * (1 + 1e-9):
        raise ConfigError([f"privacy.dp.noise_multiplier: {sigma} spends epsilon={planned:.3f} over "
                           f"{train.steps} steps, above the budget epsilon={dp.epsilon}; raise it, or remove it "
                           "to have it computed"])
    return DPPlan(noise_multiplier=float(sigma), sample_rate=q, steps=train.steps, delta=delta, n_units=n_units,
                  expected_batch_size=train.batch_size, planned_epsilon=planned, prior=list(prior))


def make_compatible(unet: torch.nn.Module) -> tuple[torch.nn.Module, list[str]]:
    """Opacus' ModuleValidator on the UNet: the problems it names, and the module with them fixed."""
    unet.train()  # the validator checks training-mode behaviour (a pretrained model arrives in eval mode)
    problems = [str(e) for e in ModuleValidator.validate(unet, strict=False)]
    if problems:
        unet = ModuleValidator.fix(unet)
        left = ModuleValidator.validate(unet, strict=False)
        if left:
            raise StageError(f"the UNet has layers Opacus cannot train privately: {left}")
    return unet, problems


def contiguous_conv_inputs(module: torch.nn.Module) -> list[Any]:
    """Make every Conv2d see a contiguous input. diffusers' attention blocks hand channels-last-strided
    tensors to the next conv, and Opacus' hooks-mode conv grad sampler then returns wrong per-sample
    gradients (zeros for mid_block.resnets.1 in our tests) without any error."""

    def pre_hook(_: torch.nn.Module, args: tuple) -> tuple:
        return tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)

    return [m.register_forward_pre_hook(pre_hook) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


def check_grad_samples(model: DiffusionModel, wrapped: torch.nn.Module, *, n: int = 4) -> None:
    """Per-sample gradients must average to the batch gradient for every parameter: checked once on
    random inputs (no patient data) before training, because a wrong grad sampler fails silently."""
    shape = (n, *model.sample_shape)
    g = torch.Generator().manual_seed(0)
    device = next(model.unet.parameters()).device
    x, noise = torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device)
    t = torch.randint(0, model.scheduler.config.num_train_timesteps, (n,), generator=g).to(device)
    labels = torch.randint(0, max(1, len(model.class_names)), (n,), generator=g)
    for p in model.unet.parameters():  # gradients left by earlier (e.g. public pretraining) steps
        p.grad, p.grad_sample = None, None
    loss = diffusion_loss(model, wrapped, x, t, noise, model.condition(labels, None, device))
    loss.backward()
    bad = []
    for name, p in model.unet.named_parameters():
        if not p.requires_grad:  # frozen (LoRA: everything but the adapters)
            continue
        gs = getattr(p, "grad_sample", None)
        ref = p.grad if p.grad is not None else torch.zeros_like(p)
        if gs is None or not torch.allclose(gs.mean(0), ref, atol=1e-6, rtol=1e-3):
            bad.append(name)
        p.grad, p.grad_sample = None, None
    if bad:
        raise StageError(f"Opacus' per-sample gradients are wrong for {len(bad)} UNet parameter(s) "
                         f"({', '.join(bad[:4])}...); use privacy.dp.grad_sample_mode: functorch")


def _secret_generator() -> torch.Generator:
    """Sampling and noise randomness must be unknown to an adversary: torchcsprng's /dev/urandom generator
    where it is installed (Opacus' secure RNG), else a torch generator seeded from the OS, never from config."""
    csprng = _csprng()
    if csprng is not None:
        return csprng.create_random_device_generator("/dev/urandom")
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


def _csprng() -> Any:
    try:
        import torchcsprng
    except ImportError:
        return None
    return torchcsprng


def secure_rng_report() -> dict[str, Any]:
    """What randomness the DP mechanisms used, said plainly (it goes into the DP report and the manifest)."""
    csprng = _csprng() is not None
    return {
        "floating_point_safe_noise": True,  # Opacus secure_mode noise: 4 Gaussian draws per coordinate
        "csprng": csprng,
        "generator": ("torchcsprng /dev/urandom" if csprng else
                      "torch Mersenne Twister seeded from os.urandom: unpredictable seed, but not a cryptographically "
                      "secure stream (torchcsprng, Opacus' secure RNG, has no build for this torch version)"),
    }


# ----------------------------------------------------------------------------- the trainer
class DPTrainer(Trainer):
    """The shared Trainer with DP-SGD steps: each logical batch Poisson-samples privacy units (rate
    batch_size/N), takes one image per sampled unit and ``augment_multiplicity`` (t, noise) draws of it,
    averages those draws' per-sample gradients into ONE gradient per unit, clips it to
    ``max_grad_norm``, sums, adds N(0, (sigma C)^2) and divides by the expected batch size.

    Sampling and noise come from OS entropy (``secret_seed`` only for tests), so DP runs are not
    bit-reproducible; the image choice within a unit and the diffusion draws follow (seed, step)."""

    def __init__(
        self, model: DiffusionModel, data: ImageSet, cfg: TrainConfig, dp: DPConfig, *, seed: int, plan: DPPlan,
        checkpoint_dir: Path | None = None, device: torch.device | None = None, secret_seed: int | None = None,
    ) -> None:
        if model.conditioning != "class":
            raise ConfigError(["privacy.dp: DP-SGD supports class-conditional teachers only"])
        self.dp, self.plan = dp, plan
        self.units = privacy_units(data, dp.privacy_unit)
        self.unit_kind = "patient" if dp.privacy_unit == "patient" and data.patient_ids is not None else "image"
        if len(self.units) != plan.n_units:
            raise StageError(f"the plan counts {plan.n_units} privacy units but the data has {len(self.units)}")
        self.accountant = RDPAccountant()
        self.accountant.history = list(plan.prior)
        model.unet, self.fixed_layers = make_compatible(model.unet)
        super().__init__(model, data, cfg, seed=seed, checkpoint_dir=checkpoint_dir, device=device)
        self._conv_hooks = contiguous_conv_inputs(model.unet)
        self.gsm = prepare_module(model.unet, grad_sample_mode=dp.grad_sample_mode, batch_first=True,
                                  loss_reduction="mean")
        check_grad_samples(model, self.gsm)
        self.gsm.forbid_grad_accumulation()
        self.unet = self.gsm
        self.secret = (_secret_generator() if secret_seed is None
                       else torch.Generator().manual_seed(secret_seed))
        self.dp_optimizer = DPOptimizer(
            self.optimizer, noise_multiplier=plan.noise_multiplier, max_grad_norm=dp.max_grad_norm,
            expected_batch_size=plan.expected_batch_size, loss_reduction="mean", generator=self.secret,
            secure_mode=True,  # noise robust to floating-point attacks (Opacus; needs no torchcsprng)
        )
        self.dp_optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
        self.physical = dp.physical_batch_size or cfg.batch_size
        self._last_loss = 0.0
        self.last_clip_norms: torch.Tensor | None = None  # per-unit gradient norms of the last physical batch

    # ------------------------------------------------------------------ checkpoint: the accountant travels with it
    def _extra_state(self) -> dict[str, Any]:
        return {"dp": {"accountant": self.accountant.state_dict(), "plan": self.plan.to_json(),
                       "epsilon": self.epsilon()}}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("dp")
        if saved is None:
            raise StageError("the checkpoint has no privacy accountant state (written by a non-DP run); "
                             "delete the stage's checkpoint directory to restart DP training from scratch")
        self.accountant.load_state_dict(saved["accountant"])

    def save_checkpoint(self) -> None:
        super().save_checkpoint()
        if self.checkpoint_dir is not None:
            log.info("dp.checkpoint", step=self.step, epsilon=round(self.epsilon(), 4), delta=self.plan.delta)

    def epsilon(self) -> float:
        return epsilon_of(self.accountant.history, self.plan.delta)

    # ------------------------------------------------------------------ one logical step
    def _physical_backward(self, units: list[int], g: torch.Generator) -> float:
        k, n = self.dp.augment_multiplicity, len(units)
        pick = [int(self.units[u][torch.randint(len(self.units[u]), (1,), generator=g)]) for u in units]
        idx = torch.tensor(pick).repeat_interleave(k)
        t = torch.randint(0, self.model.scheduler.config.num_train_timesteps, (n * k,), generator=g)
        noise = torch.randn((n * k, *self.images.shape[1:]), generator=g)
        x0 = self.images[idx.to(self.device)]
        with autocast_for(self.device, self.cfg.mixed_precision):
            cond = self.model.condition(None if self.labels is None else self.labels[idx], None, self.device)
            loss = diffusion_loss(self.model, self.unet, x0, t.to(self.device), noise.to(self.device), cond)
        loss.backward()
        params = [p for p in self.model.unet.parameters() if p.requires_grad]
        if k > 1:  # DPDM noise multiplicity: one gradient per unit = mean over its k draws
            for p in params:
                p.grad_sample = p.grad_sample.reshape(n, k, *p.grad_sample.shape[1:]).mean(1)
        norms = torch.stack([p.grad_sample.reshape(n, -1).norm(dim=1) for p in params], 1).norm(dim=1)
        self.last_clip_norms = norms.detach()
        return float(loss.detach())

    def train_step(self) -> float:
        """One DP-SGD step over one Poisson-sampled logical batch, in physical batches (Opacus' splitter)."""
        g = step_generator(self.seed, self.step)
        sampler = UniformWithReplacementSampler(num_samples=len(self.units), sample_rate=self.plan.sample_rate,
                                                generator=self.secret, steps=1)
        splitter = BatchSplittingSampler(sampler=sampler, max_batch_size=self.physical, optimizer=self.dp_optimizer)
        losses, sizes = [], []
        self.last_batch_units: list[int] = []
        for chunk in splitter:
            self.dp_optimizer.zero_grad(set_to_none=True)
            if len(chunk) == 0:  # an empty Poisson batch still takes a (pure-noise) step
                for p in self.model.unet.parameters():
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            else:
                losses.append(self._physical_backward(chunk, g))
                sizes.append(len(chunk))
                self.last_batch_units += chunk
            self.dp_optimizer.step()
        self.dp_optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        self.ema.step(self.model.parameters())
        self.step += 1
        if sizes:
            self._last_loss = float(np.average(losses, weights=sizes))
        return self._last_loss

    def fit(self) -> dict[str, Any]:
        if self.step >= self.cfg.steps:
            log.info("dp.resumed_complete", step=self.step)
        try:
            report = super().fit()
        finally:
            self.gsm.to_standard_module()  # remove Opacus' hooks: the saved/sampled UNet is a plain module
            for h in self._conv_hooks:
                h.remove()
        eps = self.epsilon()
        report["dp"] = {
            "enabled": True,
            "epsilon": eps,
            "delta": self.plan.delta,
            "target_epsilon": self.dp.epsilon,
            "accountant": "rdp",
            "accountant_steps": sum(int(h[2]) for h in self.accountant.history) - sum(int(h[2]) for h in self.plan.prior),
            "history": [list(h) for h in self.accountant.history],
            "max_grad_norm": self.dp.max_grad_norm,
            "augment_multiplicity": self.dp.augment_multiplicity,
            "privacy_unit": self.unit_kind,
            "physical_batch_size": self.physical,
            "poisson_sampling": True,
            "grad_sample_mode": self.dp.grad_sample_mode,
            "fixed_layers": self.fixed_layers,
            "secure_rng": secure_rng_report(),
            **self.plan.to_json(),
        }
        if eps > self.dp.epsilon * (1 + 1e-6):
            raise StageError(f"DP training spent epsilon={eps:.4f}, above the budget {self.dp.epsilon}")
        log.info("dp.done", epsilon=round(eps, 4), delta=self.plan.delta, steps=self.step)
        return report


# ----------------------------------------------------------------------------- front door
def train_teacher_dp(
    model: DiffusionModel, data: ImageSet, cfg: TrainConfig, dp: DPConfig, *, seed: int, resolution: int,
    channels: int, checkpoint_dir: Path | None = None, budget: BudgetConfig | None = None,
) -> dict[str, Any]:
    """Optional public start (semantic query + pretraining, or init_from), then DP-SGD on ``data``.
    The report's ``dp`` section holds the spent epsilon and delta of everything that saw ``data``, and
    ``budget`` what the site's ledger (privdistill.budget) composes for these patients over every run."""
    from privdistill.dp_pretrain import prepare_start

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(["privacy.dp: DP-SGD runs in one process; launch the teacher without torchrun"])
    units = privacy_units(data, dp.privacy_unit)
    resolve_delta(dp, len(units))  # refuse a bad delta before spending anything
    pp = dp.public_pretraining if dp.init_from is None else None
    # refuse an impossible budget (batch >= N, the query alone over epsilon) before the query sees real images
    query = [gaussian_query_entry(pp.query_sigma, math.sqrt(pp.classes_k))] if pp is not None else []
    first = plan_dp(dp, cfg, len(units), prior=query)
    from privdistill.budget import LedgerRun

    ledger = LedgerRun.open(budget, data, dp, cfg, checkpoint_dir, n_units=len(units))
    ledger.check([*query, (first.noise_multiplier, first.sample_rate, first.steps)])  # before any real image is used
    if query:
        ledger.charge("semantic-query", query)
    secret = _secret_generator()
    prior, start = prepare_start(model, data, units, dp, cfg, resolution=resolution, channels=channels, seed=seed,
                                 checkpoint_dir=checkpoint_dir, secret=secret)
    plan = plan_dp(dp, cfg, len(units), prior=prior)
    ledger.charge("dp-sgd", [(plan.noise_multiplier, plan.sample_rate, plan.steps)])
    log.info("dp.plan", noise_multiplier=round(plan.noise_multiplier, 4), sample_rate=round(plan.sample_rate, 5),
             steps=plan.steps, delta=plan.delta, planned_epsilon=round(plan.planned_epsilon, 4))
    report = DPTrainer(model, data, cfg, dp, seed=seed, plan=plan, checkpoint_dir=checkpoint_dir).fit()
    if prior:
        report["dp"]["semantic_query_epsilon"] = epsilon_of(prior, plan.delta)
    if start is not None:
        report["dp"].update(start)
    report["dp"]["budget"] = ledger.summary()
    return report


def dp_summary(dp_report: dict[str, Any]) -> dict[str, Any]:
    """The aggregate DP numbers that may leave a site (shard manifest, model card)."""
    keys = ("epsilon", "delta", "accountant", "privacy_unit", "noise_multiplier", "sample_rate", "steps",
            "max_grad_norm", "augment_multiplicity", "semantic_query_epsilon", "secure_rng")
    out = {k: dp_report[k] for k in keys if k in dp_report}
    if "budget" in dp_report:  # every recorded DP run on these patients, composed (privdistill.budget)
        out["pool"] = {k: dp_report["budget"].get(k) for k in ("pool_epsilon", "delta", "budget_epsilon",
                                                               "recorded_runs", "n_units")}
    out["public_pretraining"] = "public_pretraining" in dp_report
    out["scope"] = "teacher weights and unfiltered samples; the filter's use of real images is not covered"
    return out
