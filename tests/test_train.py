"""Trainer: loss goes down, resume equals an unbroken run, DDP ranks end identical (and equal to one
process on the same global batch), sampling is deterministic."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from privdistill.config import ModelConfig, SampleConfig, TrainConfig
from privdistill.data.types import ImageSet
from privdistill.models import DiffusionModel
from privdistill.sample import ddim_sample, sample_dataset
from privdistill.train import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from _ddp_worker import tiny_setup


def _weights(model: DiffusionModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.unet.state_dict().items()}


def test_resume_from_checkpoint_matches_unbroken_run(tmp_path: Path) -> None:
    model, data, cfg = tiny_setup()
    Trainer(model, data, cfg, seed=1).fit()
    unbroken = _weights(model)

    # Execute: stop after 3 steps with a checkpoint, then resume in a fresh trainer
    model2, _, _ = tiny_setup()
    half = cfg.model_copy(update={"steps": 3, "checkpoint_every": 3})
    t = Trainer(model2, data, half, seed=1, checkpoint_dir=tmp_path)
    while t.step < 3:
        t.train_step()
    t.save_checkpoint()
    model3, _, _ = tiny_setup()
    resumed = Trainer(model3, data, cfg, seed=1, checkpoint_dir=tmp_path)
    assert resumed.step == 3
    report = resumed.fit()

    assert report["resumed_from"] == 3
    for k, v in unbroken.items():
        torch.testing.assert_close(model3.unet.state_dict()[k], v, rtol=0, atol=1e-6)


def test_loss_decreases_on_structured_data() -> None:
    x = np.zeros((32, 1, 8, 8), np.float32) - 1
    x[:16, :, 2:6, 2:6] = 1
    x[16:, :, :, 3:5] = 1
    data = ImageSet(images=x, labels=np.repeat([0, 1], 16), class_names=["sq", "bar"])
    torch.manual_seed(0)
    model = DiffusionModel.from_config(ModelConfig(block_out_channels=[16, 16], norm_num_groups=4),
                                       resolution=8, channels=1, class_names=["sq", "bar"])
    rep = Trainer(model, data, TrainConfig(steps=120, batch_size=16, warmup_steps=5, log_every=20,
                                           learning_rate=2e-3), seed=0).fit()
    first, last = rep["loss_curve"][0][1], rep["loss_curve"][-1][1]
    assert last < 0.5 * first, rep["loss_curve"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path: Path) -> None:
    # Prepare
    worker = Path(__file__).parent / "_ddp_worker.py"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(worker), str(tmp_path)]
    # Execute
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    # Assert: ranks identical, and equal to one process on the same global batches
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    model, data, cfg = tiny_setup()
    Trainer(model, data, cfg, seed=3).fit()
    single = model.unet.state_dict()
    for k in r0:
        torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-5)


def test_ddim_sampling_is_deterministic_and_batch_size_independent() -> None:
    model, _, _ = tiny_setup()
    labels = np.array([0, 1, 0, 1, 1])
    a = ddim_sample(model, labels=labels, steps=4, batch_size=5, seed=7, progress=False)
    b = ddim_sample(model, labels=labels, steps=4, batch_size=2, seed=7, progress=False)
    c = ddim_sample(model, labels=labels, steps=4, batch_size=5, seed=8, progress=False)
    assert a.shape == (5, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.abs(a - c).mean() > 0.1


def test_sample_dataset_gives_n_per_class() -> None:
    model, _, _ = tiny_setup()
    s = sample_dataset(model, SampleConfig(per_class=3, steps=2, batch_size=4), seed=0)
    assert len(s) == 6 and list(s.labels) == [0, 0, 0, 1, 1, 1] and s.patient_ids is None


def test_unet_runs_channels_last_and_saves_standard_layout(tmp_path: Path) -> None:
    """DiffusionModel keeps its UNet's conv weights channels-last (faster on CPU: benchmarks/channels_last.py);
    the saved safetensors are in the standard layout, a loaded model is channels-last again, and both layouts
    compute the same noise prediction."""
    from safetensors.torch import load_file

    model, data, cfg = tiny_setup()
    # (a 1x1 kernel or a single input channel is laid out the same either way: only the others tell)
    convs = [m.weight for m in model.unet.modules()
             if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1 and m.kernel_size != (1, 1)]
    assert len(convs) > 5
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    model.save(tmp_path / "m")
    stored = load_file(next((tmp_path / "m" / "unet").glob("*.safetensors")))
    assert all(v.is_contiguous() for v in stored.values())
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)  # save left the layout as it was

    loaded = DiffusionModel.load(tmp_path / "m")
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
               for m in loaded.unet.modules()
               if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1 and m.kernel_size != (1, 1))
    x = torch.from_numpy(data.images[:4])
    t = torch.tensor([10, 200, 500, 900])
    cond = loaded.condition(torch.from_numpy(data.labels[:4]).long(), None, torch.device("cpu"))
    with torch.no_grad():
        fast = loaded.predict_noise(x, t, cond)
        loaded.unet.to(memory_format=torch.contiguous_format)
        standard = loaded.predict_noise(x, t, cond)
    assert float((fast - standard).abs().max()) < 1e-4
    assert float(standard.abs().mean()) > 0.1  # a real prediction, not zeros
