"""DP-SGD teacher: RDP accounting against published and independently computed values, noise calibration,
Opacus on the diffusers UNet (per-unit clipping, multiplicity, Poisson sampling), resume, semantic query."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from privdistill.config import DPConfig, ModelConfig, PublicPretrainingConfig, TrainConfig, parse_config
from privdistill.data.types import ImageSet
from privdistill.dp import (
    DPPlan,
    DPTrainer,
    epsilon_of,
    gaussian_query_entry,
    noise_for_budget,
    plan_dp,
    privacy_units,
    resolve_delta,
)
from privdistill.dp_pretrain import semantic_query, unit_votes
from privdistill.errors import ConfigError, StageError
from privdistill.models import DiffusionModel
from privdistill.train import diffusion_loss, step_generator

FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ----------------------------------------------------------------------------- helpers
def _data(n_patients: int = 30, visits: int = 2, res: int = 16, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    n = n_patients * visits
    return ImageSet(images=rng.uniform(-1, 1, (n, 1, res, res)).astype(np.float32),
                    labels=np.repeat(rng.integers(0, 3, n_patients), visits),
                    patient_ids=np.repeat([f"p{i:03d}" for i in range(n_patients)], visits), class_names=["a", "b", "c"])


def _model(res: int = 16) -> DiffusionModel:
    return DiffusionModel.from_config(ModelConfig(block_out_channels=[16, 32], norm_num_groups=8), resolution=res,
                                      channels=1, class_names=["a", "b", "c"], seed=0)


def _plan(sigma: float, batch: int, n_units: int, steps: int, delta: float = 1e-3) -> DPPlan:
    return DPPlan(noise_multiplier=sigma, sample_rate=batch / n_units, steps=steps, delta=delta, n_units=n_units,
                  expected_batch_size=batch, planned_epsilon=float("nan"))


def _rdp_sampled_gaussian_int(q: float, sigma: float, alpha: int) -> float:
    """Independent RDP of the Poisson-subsampled Gaussian at integer order (Mironov, Talwar, Zhang 2019, eq. for
    integer alpha): log(sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2-k)/(2 sigma^2))) / (a-1), via log-sum-exp."""
    terms = [math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
             + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2) for k in range(alpha + 1)]
    m = max(terms)
    return (m + math.log(sum(math.exp(t - m) for t in terms))) / (alpha - 1)


# ----------------------------------------------------------------------------- accounting
def test_rdp_matches_tf_privacy_published_example() -> None:
    # TF-Privacy's README: compute_dp_sgd_privacy --N=60000 --batch_size=256 --noise_multiplier=1.1 --epochs=60
    # --delta=1e-5 "satisfies differential privacy with eps = 3.01" (RDP, classic RDP->DP conversion).
    from opacus.accountants.analysis.rdp import compute_rdp

    q, steps, delta = 256 / 60000, math.ceil(60 * 60000 / 256), 1e-5
    orders = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)
    rdp = compute_rdp(q=q, noise_multiplier=1.1, steps=steps, orders=orders)
    classic = float(np.min(rdp - math.log(delta) / (orders - 1)))
    assert round(classic, 2) == 3.01
    # Opacus' accountant uses the tighter conversion (Balle et al. 2020): smaller, never larger
    eps = epsilon_of([(1.1, q, steps)], delta)
    assert 2.55 < eps < classic
    # ... and equals an independent computation at integer orders with that conversion
    ints = list(range(2, 64))
    rdp_int = np.array([steps * _rdp_sampled_gaussian_int(q, 1.1, a) for a in ints])
    a = np.array(ints, dtype=float)
    mine = float(np.min(rdp_int + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1)))
    opacus_int = float(np.min(compute_rdp(q=q, noise_multiplier=1.1, steps=steps, orders=a)
                              + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1)))
    assert mine == pytest.approx(opacus_int, rel=1e-9)
    assert eps <= mine + 1e-9 and eps == pytest.approx(mine, rel=0.03)


def test_noise_for_budget_is_tight_and_agrees_with_opacus() -> None:
    from opacus.accountants.utils import get_noise_multiplier

    q, steps, delta, target = 0.01, 1000, 1e-5, 3.0
    sigma = noise_for_budget(target, delta, sample_rate=q, steps=steps)
    assert epsilon_of([(sigma, q, steps)], delta) <= target
    assert epsilon_of([(sigma * 0.99, q, steps)], delta) > target  # not wastefully large
    ref = get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps, accountant="rdp")
    assert sigma == pytest.approx(ref, rel=0.02)


def test_semantic_query_cost_is_composed_into_the_same_accountant() -> None:
    q, steps, delta = 0.05, 200, 1e-5
    entry = gaussian_query_entry(noise_std=20.0, l2_sensitivity=math.sqrt(4))
    assert entry == (10.0, 1.0, 1)
    # a Gaussian mechanism with multiplier z has RDP alpha / (2 z^2): check one order through Opacus
    from opacus.accountants.analysis.rdp import compute_rdp

    assert compute_rdp(q=1.0, noise_multiplier=10.0, steps=1, orders=[8.0])[0] == pytest.approx(8 / 200)
    train_only = epsilon_of([(1.0, q, steps)], delta)
    assert epsilon_of([entry, (1.0, q, steps)], delta) > train_only
    # with the same budget, the query leaves less for training: more noise
    assert noise_for_budget(3.0, delta, sample_rate=q, steps=steps, prior=[entry]) > \
        noise_for_budget(3.0, delta, sample_rate=q, steps=steps)
    with pytest.raises(ConfigError, match="semantic query alone"):
        noise_for_budget(0.1, delta, sample_rate=q, steps=steps, prior=[gaussian_query_entry(1.0, 1.0)])


def test_an_impossible_budget_is_refused_before_the_query_touches_real_images(monkeypatch) -> None:
    import privdistill.dp_pretrain as pretrain
    from privdistill.dp import train_teacher_dp

    touched = []
    monkeypatch.setattr(pretrain, "prepare_start", lambda *a, **k: touched.append(1) or ([], None))
    public = PublicPretrainingConfig(source={"type": "idx", "images": str(FMNIST / "t10k-images-idx3-ubyte.gz")},
                                     classes_k=1, query_sigma=0.5)  # the query alone spends far more than eps 1
    dp = DPConfig(epsilon=1.0, delta=1e-3, public_pretraining=public)

    with pytest.raises(ConfigError, match="semantic query alone"):
        train_teacher_dp(_model(), _data(), TrainConfig(steps=5, batch_size=8), dp, seed=0, resolution=16, channels=1)

    assert touched == []


def test_plan_delta_rule_and_refusals() -> None:
    train = TrainConfig(steps=100, batch_size=10)
    plan = plan_dp(DPConfig(epsilon=5), train, 200)
    assert plan.delta == 1e-5 and plan.sample_rate == pytest.approx(0.05)  # min(1e-5, 1/(N ln N))
    assert plan.planned_epsilon <= 5 and epsilon_of([(plan.noise_multiplier * 0.98, 0.05, 100)], plan.delta) > 5
    with pytest.raises(ConfigError, match="not below 1/N"):
        resolve_delta(DPConfig(epsilon=5, delta=0.01), 100)
    with pytest.raises(ConfigError, match="above the budget"):
        plan_dp(DPConfig(epsilon=1, noise_multiplier=0.3), train, 200)
    with pytest.raises(ConfigError, match="sample rate"):
        plan_dp(DPConfig(epsilon=5), TrainConfig(steps=10, batch_size=50), 50)


def test_privacy_units_are_patients() -> None:
    data = _data(n_patients=5, visits=3)
    units = privacy_units(data, "patient")
    assert len(units) == 5 and all(len(set(data.patient_ids[u])) == 1 and len(u) == 3 for u in units)
    assert len(privacy_units(data, "image")) == 15


# ----------------------------------------------------------------------------- config
def _raw(dp: dict, **teacher: dict) -> dict:
    return {"data": {"source": {"type": "idx", "images": str(FMNIST / "train-images-idx3-ubyte.gz"),
                                "labels": str(FMNIST / "train-labels-idx1-ubyte.gz")}, "resolution": 16},
            "teacher": {"model": {"block_out_channels": [16, 32]}, **teacher}, "privacy": {"dp": dp}}


@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_config_lists_every_dp_problem() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_raw({"epsilon": 0, "delta": 1.5, "max_grad_norm": -1, "poisson_sampling": False, "sigma": 1}))
    text = "\n".join(err.value.problems)
    for needle in ("privacy.dp.epsilon", "privacy.dp.delta", "privacy.dp.max_grad_norm", "privacy.dp.sigma"):
        assert needle in text
    with pytest.raises(ConfigError) as err:  # cross-section problems, all at once
        parse_config(_raw({"epsilon": 1, "physical_batch_size": 64, "init_from": "/nonexistent-model"},
                          train={"batch_size": 32}, model={"block_out_channels": [16, 32], "conditioning": "text"}) |
                     {"data": _raw({})["data"] | {"prompt_template": "a {label}"}})
    problems = err.value.problems
    assert any("class conditioning only" in p for p in problems)
    assert any("physical_batch_size" in p for p in problems)
    assert any("init_from: not a directory" in p for p in problems)
    with pytest.raises(ConfigError, match="poisson_sampling"):
        parse_config(_raw({"epsilon": 1, "poisson_sampling": False}))
    cfg = parse_config(_raw({"epsilon": 10, "delta": 1e-5}))
    assert cfg.privacy.dp.augment_multiplicity == 1 and cfg.privacy.dp.poisson_sampling
    assert parse_config({k: v for k, v in _raw({}).items() if k != "privacy"}).privacy is None


# ----------------------------------------------------------------------------- Opacus on the UNet
def test_unet_trains_under_opacus_with_per_patient_clipping(one_thread) -> None:
    torch.manual_seed(0)
    data, model = _data(), _model()
    before = [p.detach().clone() for p in model.unet.parameters()]
    cfg = TrainConfig(steps=3, batch_size=8, learning_rate=1e-3, warmup_steps=0, log_every=1)
    dp = DPConfig(epsilon=10, max_grad_norm=0.05, physical_batch_size=4)
    tr = DPTrainer(model, data, cfg, dp, seed=0, plan=_plan(0.0, 8, 30, 3), secret_seed=1)
    captured: dict[str, list] = {"expected": [], "grad": []}
    orig_clip, orig_step = tr.dp_optimizer.clip_and_accumulate, tr.dp_optimizer.original_optimizer.step

    def clip_spy() -> None:
        gs = [g.detach().clone() for g in tr.dp_optimizer.grad_samples]
        norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in gs], 1).norm(dim=1)
        captured.setdefault("norms", []).append(norms)
        factor = (dp.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        captured["expected"].append([torch.einsum("i,i...", factor, g) for g in gs])
        orig_clip()

    def step_spy(*a, **k):
        captured["grad"].append(([p.grad.detach().clone() for p in tr.dp_optimizer.params], len(captured["expected"])))
        return orig_step(*a, **k)

    tr.dp_optimizer.clip_and_accumulate = clip_spy
    tr.dp_optimizer.original_optimizer.step = step_spy
    with pytest.raises(StageError, match="epsilon=inf"):  # sigma = 0 is no privacy: the run is refused at the end
        tr.fit()

    assert tr.step == 3 and all(math.isfinite(loss) for _, loss in tr.history)
    assert max((a - b).abs().max().item() for a, b in zip(before, model.unet.parameters(), strict=True)) > 0
    assert (torch.cat(captured["norms"]) > dp.max_grad_norm).all()  # every per-patient gradient was clipped
    assert len(captured["grad"]) == 3
    done = 0
    for grads, upto in captured["grad"]:  # the physical chunks since the previous real step form this step
        chunks = captured["expected"][done:upto]
        assert chunks, "a logical step without any physical batch"
        for j, g in enumerate(grads):  # sigma = 0: the optimizer gets exactly sum(clipped) / expected batch
            assert torch.allclose(g * 8, sum(c[j] for c in chunks).view_as(g), atol=1e-7, rtol=1e-4)
        n_units = sum(len(c[0]) for c in chunks)
        total = torch.cat([g.flatten() for g in grads]).norm().item() * 8
        assert 0 < total <= n_units * dp.max_grad_norm * (1 + 1e-4)  # each clipped gradient has norm C
        done = upto


def test_noise_multiplicity_averages_draws_inside_one_patient_gradient(one_thread) -> None:
    data, model = _data(), _model()
    cfg = TrainConfig(steps=1, batch_size=8, warmup_steps=0)
    tr = DPTrainer(model, data, cfg, DPConfig(epsilon=10, augment_multiplicity=3), seed=0,
                   plan=_plan(1.0, 8, 30, 1), secret_seed=1)
    units = [4, 17]
    tr.dp_optimizer.zero_grad(set_to_none=True)
    tr._physical_backward(units, step_generator(0, 0))
    params = [p for p in model.unet.parameters()]
    assert all(p.grad_sample.shape[0] == 2 for p in params)  # one gradient per patient, not per draw
    per_unit = [p.grad_sample.detach().clone() for p in params]
    # recompute patient 17's gradient by hand: the same draws, loss averaged over its 3 rows
    g = step_generator(0, 0)
    pick = [int(tr.units[u][torch.randint(len(tr.units[u]), (1,), generator=g)]) for u in units]
    idx = torch.tensor(pick).repeat_interleave(3)
    t = torch.randint(0, model.scheduler.config.num_train_timesteps, (6,), generator=g)
    noise = torch.randn((6, 1, 16, 16), generator=g)
    tr.dp_optimizer.zero_grad(set_to_none=True)
    rows = slice(3, 6)
    loss = diffusion_loss(model, model.unet, tr.images[idx][rows], t[rows], noise[rows],
                          {"class_labels": tr.labels[idx][rows]})
    loss.backward()
    for p, ref in zip(params, per_unit, strict=True):
        assert torch.allclose(p.grad, ref[1], atol=1e-6, rtol=1e-4)


def test_poisson_sampling_of_patients_and_accountant_steps(one_thread) -> None:
    data, model = _data(n_patients=40), _model()
    cfg = TrainConfig(steps=6, batch_size=10, warmup_steps=0, log_every=100)
    dp = DPConfig(epsilon=10, physical_batch_size=4)
    plan = plan_dp(dp, cfg, 40)
    tr = DPTrainer(model, data, cfg, dp, seed=0, plan=plan, secret_seed=3)
    sizes, chunks = [], []
    orig = tr._physical_backward

    def spy(units, g):
        chunks.append(list(units))
        return orig(units, g)

    tr._physical_backward = spy
    for _ in range(6):
        tr.train_step()
        sizes.append(len(tr.last_batch_units))
        assert len(set(tr.last_batch_units)) == len(tr.last_batch_units)  # a patient at most once per batch
    assert len(set(sizes)) > 1  # Poisson: the logical batch size varies around q N = 10
    assert all(len(c) <= 4 for c in chunks)  # BatchSplittingSampler: physical batches of at most 4
    assert tr.accountant.history == [(plan.noise_multiplier, 0.25, 6)]
    # the sampler itself: over many draws, inclusion frequency ~ q for every patient
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    draws = list(UniformWithReplacementSampler(num_samples=40, sample_rate=0.25, generator=torch.Generator()
                                               .manual_seed(0), steps=2000))
    freq = np.bincount(np.concatenate(draws), minlength=40) / 2000
    assert np.abs(freq - 0.25).max() < 0.04


def test_resume_after_kill_keeps_the_accountant(tmp_path: Path, one_thread) -> None:
    data = _data()
    cfg = TrainConfig(steps=4, batch_size=8, warmup_steps=0, checkpoint_every=2, log_every=100)
    dp = DPConfig(epsilon=10)
    plan = plan_dp(dp, cfg, 30)
    tr = DPTrainer(_model(), data, cfg, dp, seed=0, plan=plan, checkpoint_dir=tmp_path)
    real_step = tr.train_step

    def killed_at_3() -> float:
        if tr.step == 3:
            raise KeyboardInterrupt("simulated kill")
        return real_step()

    tr.train_step = killed_at_3
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    resumed = DPTrainer(_model(), data, cfg, dp, seed=0, plan=plan, checkpoint_dir=tmp_path)
    assert resumed.step == 2 and resumed.accountant.history == [(plan.noise_multiplier, plan.sample_rate, 2)]
    report = resumed.fit()
    assert report["dp"]["accountant_steps"] == 4
    assert report["dp"]["epsilon"] == pytest.approx(epsilon_of([(plan.noise_multiplier, plan.sample_rate, 4)],
                                                                plan.delta))
    assert report["dp"]["epsilon"] > epsilon_of([(plan.noise_multiplier, plan.sample_rate, 2)], plan.delta)
    # a checkpoint without accountant state (a non-DP run's) is refused, not silently restarted at epsilon 0
    state = torch.load(tmp_path / "train_state.pt", weights_only=False)
    state.pop("dp")
    torch.save(state, tmp_path / "train_state.pt")
    with pytest.raises(StageError, match="no privacy accountant"):
        DPTrainer(_model(), data, cfg, dp, seed=0, plan=plan, checkpoint_dir=tmp_path)


# ----------------------------------------------------------------------------- semantic query (PrivImage)
def _pattern_set(patterns: list[int], per: int, seed: int, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Images of 4 public classes: class j is a bright quadrant j on a dark 8x8 image, plus noise."""
    rng = np.random.default_rng(seed)
    imgs, labels = [], []
    for lab, j in enumerate(patterns):
        base = -np.ones((8, 8), np.float32)
        r, c = divmod(j, 2)
        base[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] = 1
        imgs.append(base + noise * rng.standard_normal((per, 8, 8)).astype(np.float32))
        labels.append(np.full(per, lab))
    return np.concatenate(imgs)[:, None].clip(-1, 1), np.concatenate(labels)


def test_unit_votes_have_l2_sensitivity_sqrt_k() -> None:
    rng = np.random.default_rng(0)
    probs, labels = rng.dirichlet(np.ones(6), 20), rng.integers(0, 3, 20)
    units = [np.array([i]) for i in range(20)]
    for k in (1, 2, 4):
        full = unit_votes(probs, labels, units, 3, k)
        assert full.sum() == 20 * k
        for drop in range(20):
            diff = full - unit_votes(probs, labels, units[:drop] + units[drop + 1:], 3, k)
            assert np.linalg.norm(diff) == pytest.approx(math.sqrt(k))


def test_semantic_query_selects_the_matching_public_classes(one_thread) -> None:
    pub_x, pub_y = _pattern_set([0, 1, 2, 3], per=60, seed=0)
    public = ImageSet(images=pub_x, labels=pub_y, class_names=["q0", "q1", "q2", "q3"])
    sens_x, sens_y = _pattern_set([2, 0], per=20, seed=1)  # sensitive "x" looks like q2, "y" like q0
    sensitive = ImageSet(images=sens_x, labels=sens_y, patient_ids=np.array([f"p{i}" for i in range(40)]),
                         class_names=["x", "y"])
    pp = PublicPretrainingConfig(source={"type": "npz", "path": "/unused"}, classes_k=1, query_sigma=1.0,
                                 n_classes_selected=1, classifier_steps=60)
    query = semantic_query(sensitive, privacy_units(sensitive, "patient"), public, pp, seed=0,
                           secret=torch.Generator().manual_seed(0))
    assert query["selected"] == {"x": ["q2"], "y": ["q0"]}
    assert query["history_entry"] == [1.0, 1.0, 1]  # sigma 1 / sensitivity sqrt(1)
    noisy = np.array(query["noisy_counts"])
    assert noisy.shape == (2, 4) and abs(noisy.sum() - 40) < 12 and not np.allclose(noisy, noisy.round())


@pytest.mark.parametrize("attention", [False, True])
def test_hooks_mode_needs_contiguous_conv_inputs_on_the_diffusers_unet(attention: bool, one_thread) -> None:
    from opacus.grad_sample.utils import prepare_module

    from privdistill.dp import check_grad_samples, contiguous_conv_inputs

    def model() -> DiffusionModel:
        return DiffusionModel.from_config(ModelConfig(block_out_channels=[16, 32], norm_num_groups=8,
                                                      attention=attention), resolution=16, channels=1,
                                          class_names=["a", "b", "c"], seed=1)
    # plain hooks: the mid block's attention hands a channels-last tensor to the next conv -> wrong grads
    raw = model()
    with pytest.raises(StageError, match="per-sample gradients are wrong"):
        check_grad_samples(raw, prepare_module(raw.unet, grad_sample_mode="hooks", batch_first=True,
                                               loss_reduction="mean"))
    for mode in ("hooks", "functorch"):
        fixed = model()
        contiguous_conv_inputs(fixed.unet)
        check_grad_samples(fixed, prepare_module(fixed.unet, grad_sample_mode=mode, batch_first=True,
                                                 loss_reduction="mean"))


# ----------------------------------------------------------------------------- where epsilon is shown
def test_model_card_shows_each_shards_teacher_epsilon_or_no_dp() -> None:
    from coordinator.model_card import _shard_table
    from coordinator.student import privacy_summary

    dp_shard = privacy_summary({"kept": 5, "teacher_dp": {"epsilon": 2.345, "delta": 1e-5, "accountant": "rdp"}})
    plain = privacy_summary({"kept": 5})
    assert dp_shard["teacher_dp_epsilon"] == 2.345 and plain["teacher_dp_epsilon"] is None
    rows = _shard_table([{"site": s, "shard_id": s, "tar_sha256": "ab", "sample_count": 5, "privacy": p}
                         for s, p in (("s1", dp_shard), ("s2", plain))])
    assert "teacher DP-SGD" in rows[0]
    assert rows[2].endswith("| ε = 2.35, δ = 1.0e-05 |") and rows[3].endswith("| no DP |")


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_tiny_dp_pipeline_reports_epsilon(tmp_path: Path, one_thread) -> None:
    import json

    from privdistill.config import load_config
    from privdistill.pipeline import run_pipeline

    cfg = load_config(Path(__file__).parent.parent / "examples" / "tiny-dp.yaml")
    run_pipeline(cfg, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    dp = report["teacher_dp"]
    assert 0 < dp["epsilon"] <= cfg.privacy.dp.epsilon and dp["delta"] == cfg.privacy.dp.delta
    assert dp["privacy_unit"] == "patient" and dp["public_pretraining"] is True
    assert 0 < dp["semantic_query_epsilon"] < dp["epsilon"]
    full = json.loads((tmp_path / "train-teacher" / "dp_report.json").read_text())
    assert full["public_pretraining"]["selected"] == {"Trouser": ["Trouser"], "Sneaker": ["Sneaker"], "Bag": ["Bag"]}
    assert json.loads((tmp_path / "filter" / "privacy_report.json").read_text())["teacher_dp"] == dp
    assert "teacher_dp" in (tmp_path / "report.html").read_text()


# ----------------------------------------------------------------------------- delta and the site's budget ledger
def test_default_delta_is_at_most_1e5_and_below_1_over_n_log_n() -> None:
    from privdistill.budget import default_delta

    assert resolve_delta(DPConfig(epsilon=5), 30) == 1e-5  # was 1/(10 N) = 3.3e-3
    assert default_delta(100_000) == pytest.approx(1 / (100_000 * math.log(100_000)))  # < 1e-5 at large N
    assert all(default_delta(n) < 1 / (n * math.log(n)) * 1.000001 for n in (10, 1000, 10**6))


def test_ledger_composes_per_patient_and_refuses_past_the_budget(tmp_path: Path) -> None:
    import sqlite3

    from privdistill.budget import PrivacyLedger
    from privdistill.errors import PrivacyPolicyError

    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    run = [(1.0, 0.1, 200)]
    one = epsilon_of(run, 1e-5)
    pool = [f"p{i}" for i in range(30)]
    first = ledger.charge(run_id="r1", kind="dp-sgd", unit_ids=pool, history=run, delta=1e-5, reason="first",
                          config_hash="c", budget_epsilon=1.2 * one)
    assert first["pool_epsilon_after"] == pytest.approx(one) and first["earlier_runs"] == 0
    # the same pool again: two runs compose to ~1.44x one run (RDP), more than 1.2x's epsilon -> refused, nothing written
    with pytest.raises(PrivacyPolicyError, match=r"from epsilon .* spent by 1 earlier recorded run\(s\) to") as err:
        ledger.charge(run_id="r2", kind="dp-sgd", unit_ids=pool, history=run, delta=1e-5, reason="force",
                      config_hash="c", budget_epsilon=1.2 * one)
    assert f"budget privacy.budget.epsilon = {1.2 * one}" in str(err.value)
    assert len(ledger.charges()) == 1
    # one shared patient is enough: the overlapping pool's worst patient carries both runs
    overlap = ["p0"] + [f"q{i}" for i in range(29)]
    assert ledger.worst_patient(ledger.unit_hashes(overlap), 1e-5, run)["epsilon"] == \
        pytest.approx(epsilon_of(run + run, 1e-5))
    # a disjoint pool is not charged for the first one
    other = ledger.charge(run_id="r3", kind="dp-sgd", unit_ids=[f"z{i}" for i in range(30)], history=run,
                          delta=1e-5, reason="first", config_hash="c", budget_epsilon=1.2 * one)
    assert other["pool_epsilon_after"] == pytest.approx(one)
    # append-only, and no patient id in the file
    db = sqlite3.connect(tmp_path / "ledger.sqlite")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM charges")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE charges SET epsilon_alone = 0")
    db.close()
    assert b"p17" not in (tmp_path / "ledger.sqlite").read_bytes()


def test_a_second_dp_run_on_the_same_pool_is_refused_before_training(tmp_path: Path, one_thread) -> None:
    # Prepare: a site budget that one run fits and two do not
    from privdistill.config import BudgetConfig
    from privdistill.dp import train_teacher_dp
    from privdistill.errors import PrivacyPolicyError

    data, cfg, dp = _data(), TrainConfig(steps=2, batch_size=8, warmup_steps=0, log_every=100), DPConfig(epsilon=10)
    budget = BudgetConfig(epsilon=12, ledger=tmp_path / "state" / "ledger.sqlite")
    report = train_teacher_dp(_model(), data, cfg, dp, seed=0, resolution=16, channels=1,
                              checkpoint_dir=tmp_path / "ck1", budget=budget)
    pool = report["dp"]["budget"]
    assert pool["recorded_runs"] == 1 and pool["pool_epsilon"] == pytest.approx(report["dp"]["epsilon"], rel=1e-6)
    assert pool["delta"] == 1e-5 and pool["n_units"] == 30

    # Execute: the same patients again (as --force or a deleted work directory would), other checkpoint dir
    trained = []
    import privdistill.dp as dpmod
    real = dpmod.DPTrainer.fit
    dpmod.DPTrainer.fit = lambda self: trained.append(1) or real(self)  # type: ignore[method-assign]  # a spy, restored below
    try:
        with pytest.raises(PrivacyPolicyError) as err:
            train_teacher_dp(_model(), data, cfg, dp, seed=0, resolution=16, channels=1,
                             checkpoint_dir=tmp_path / "ck2", budget=budget)
    finally:
        dpmod.DPTrainer.fit = real  # type: ignore[method-assign]  # the spy removed

    # Assert: refused with the figures, before any training step; the ledger still holds one run
    msg = str(err.value)
    assert trained == [] and "30 patients" in msg and "1 earlier recorded run(s)" in msg and "= 12" in msg
    from privdistill.budget import PrivacyLedger

    assert [c["kind"] for c in PrivacyLedger(budget.ledger).charges()] == ["dp-sgd"]
    # a run resumed from its own checkpoint (killed before it finished) is not charged twice
    (tmp_path / "ck1").mkdir(exist_ok=True)
    again = train_teacher_dp(_model(), data, cfg, dp, seed=0, resolution=16, channels=1,
                             checkpoint_dir=tmp_path / "ck1", budget=budget)
    assert again["dp"]["budget"]["recorded_runs"] == 1


def test_model_card_gives_the_mia_interval_and_claims_no_guarantee_for_the_student() -> None:
    from coordinator.model_card import NOT_MEASURED, _shard_table
    from coordinator.student import privacy_summary

    p = privacy_summary({"kept": 5, "teacher_dp": {"epsilon": 2.0, "delta": 1e-5},
                         "mia": {"teacher": {"auc": 0.53, "auc_ci95": [0.41, 0.66], "n_member_units": 30,
                                             "n_nonmember_units": 28}},
                         "non_dp_aggregates": {"keys": ["mia", "kept"]}})
    assert p["non_dp_aggregates"] == ["mia", "kept"]
    row = _shard_table([{"site": "s", "shard_id": "s", "tar_sha256": "ab", "sample_count": 5, "privacy": p}])[2]
    assert "| 0.530 [0.410, 0.660], n = 30/28 |" in row
    guarantee = [x for x in NOT_MEASURED if "formal differential-privacy" in x]
    assert len(guarantee) == 1 and "none exists, even where a site trained its teacher with DP-SGD" in guarantee[0]


def test_dp_report_says_which_rng_it_used() -> None:
    from privdistill.dp import secure_rng_report

    rep = secure_rng_report()
    assert rep["floating_point_safe_noise"] is True
    try:
        import torchcsprng  # noqa: F401  # only whether it imports matters
        assert rep["csprng"] is True
    except ImportError:
        assert rep["csprng"] is False and "not a cryptographically secure stream" in rep["generator"]
