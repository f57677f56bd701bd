"""model.type: latent: a frozen VAE + pretrained UNet read from a local diffusers pipeline folder (a tiny
random one here), fine-tuned in full or through LoRA, run through the whole pipeline at 64x64, and saved /
released as folders that diffusers' DiffusionPipeline opens."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from privdistill.config import ModelConfig, TrainConfig, parse_config
from privdistill.data.types import ImageSet
from privdistill.errors import ConfigError
from privdistill.models import DiffusionModel
from privdistill.train import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from _fixtures import FMNIST
from _latent import tiny_pipeline

RES = 64
NAMES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle-boot"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """What a hospital holds: a (here tiny, random) Stable-Diffusion-layout pipeline folder."""
    return tiny_pipeline(tmp_path_factory.mktemp("ckpt") / "sd")


def _source(split: str) -> dict:
    return {"type": "idx", "images": str(FMNIST / f"{split}-images-idx3-ubyte.gz"),
            "labels": str(FMNIST / f"{split}-labels-idx1-ubyte.gz"), "class_names": NAMES}


def _run_config(checkpoint: Path) -> dict:
    latent = {"type": "latent", "pretrained_path": str(checkpoint), "conditioning": "text"}
    train = {"steps": 4, "batch_size": 4, "warmup_steps": 0, "checkpoint_every": 2, "log_every": 2,
             "learning_rate": 1e-4}
    return {
        "name": "latent-tiny", "seed": 0,
        "data": {"source": _source("train"), "test_source": _source("t10k"), "classes": [1, 7], "max_per_class": 6,
                 "max_test_per_class": 20, "resolution": RES, "visits": {"count": 2, "max_shift": 1},
                 "prompt_template": "an image of a {label}"},
        "teacher": {"model": latent, "train": train},
        "student": {"model": {**latent, "lora": {"rank": 4}}, "train": train},
        "reid": {"steps": 10, "batch_size": 8, "width": 8, "embedding_dim": 16},
        "sample": {"per_class": 3, "steps": 3, "batch_size": 6},
        # 40 held-out images, 20 of them the calibration null: alpha 0.3 (0.1 per detector) is the smallest
        # level that many null images can calibrate (the default 0.05 needs >= 59 per detector)
        "filter": {"analysis_resolution": 16, "max_fresh_drop": 0.3},
        "evaluate": {"classifier_steps": 5, "classifier_batch_size": 8},
    }


# ----------------------------------------------------------------------------- configuration
def test_latent_config_lists_every_problem_with_the_checkpoint(tmp_path: Path, checkpoint: Path) -> None:
    # Prepare: no pretrained_path at all; then a missing folder, a folder without vae/, a resolution the
    # checkpoint cannot make
    raw = _run_config(checkpoint)
    raw["teacher"]["model"].pop("pretrained_path")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    raw_bad = _run_config(checkpoint)
    raw_bad["teacher"]["model"]["pretrained_path"] = str(tmp_path / "nowhere")
    raw_bad["student"]["model"]["pretrained_path"] = "half"
    raw_res = _run_config(checkpoint)
    raw_res["data"]["resolution"] = 60

    # Execute / Assert
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert "teacher.model" in str(err.value) and "type: latent needs pretrained_path" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config(raw_bad, base_dir=tmp_path)
    text = str(err.value)
    assert f"teacher.model.pretrained_path: not a directory: {tmp_path / 'nowhere'}" in text
    assert "student.model.pretrained_path" in text and "no readable vae/config.json" in text
    with pytest.raises(ConfigError, match=r"data.resolution=60 is not a multiple of 8"):
        parse_config(raw_res)
    with pytest.raises(ConfigError, match="pretrained_path and lora need type: latent"):
        parse_config({**raw_res, "teacher": {"model": {"lora": {"rank": 2}}}})


# ----------------------------------------------------------------------------- analysis resolution
def test_resize_to_analysis_resolution_is_chunked_exact_and_keeps_the_set() -> None:
    from privdistill.imaging import at_resolution, resize_images

    x = np.random.default_rng(0).uniform(-1, 1, (10, 1, RES, RES)).astype(np.float32)
    x[0] = 0.5
    small = resize_images(x, 16, chunk=3)
    np.testing.assert_array_equal(small, resize_images(x, 16, chunk=100))  # chunking changes nothing
    assert small.shape == (10, 1, 16, 16) and small.min() >= -1 and small.max() <= 1
    np.testing.assert_allclose(small[0], 0.5, atol=1e-6)  # a flat image stays flat
    # antialiased: at scale 4 a triangle filter over 8 input pixels per axis (weights .219 .156 .094 .031
    # each side, sum of squares 0.164 per axis), so i.i.d. noise of std 0.577 drops to 0.577 * 0.164 = 0.095
    # (a little more at the clipped borders); without antialiasing it would stay ~0.58
    assert 0.08 < small[1:].std() < 0.12
    assert resize_images(x, RES) is x
    data = ImageSet(images=x, labels=np.arange(10) % 2, patient_ids=np.array([f"p{i}" for i in range(10)]),
                    class_names=["a", "b"])
    a = at_resolution(data, 16)
    assert a.images.shape[-1] == 16 and list(a.patient_ids) == list(data.patient_ids) and a.labels is data.labels


# ----------------------------------------------------------------------------- LoRA
def _data(n: int = 8) -> ImageSet:
    x = np.random.default_rng(0).uniform(-1, 1, (n, 1, RES, RES)).astype(np.float32)
    return ImageSet(images=x, labels=np.arange(n) % 2, class_names=["a", "b"])


def test_lora_trains_adapters_only_and_saves_a_merged_unet_that_predicts_the_same(tmp_path: Path,
                                                                                   checkpoint: Path) -> None:
    # Prepare: a class-conditional model (new class embedding) with rank-4 adapters, and the full fine-tune
    full = DiffusionModel.from_config(ModelConfig(type="latent", pretrained_path=checkpoint), resolution=RES,
                                      channels=1, class_names=["a", "b"])
    model = DiffusionModel.from_config(ModelConfig(type="latent", pretrained_path=checkpoint, lora={"rank": 4}),
                                       resolution=RES, channels=1, class_names=["a", "b"])
    cfg = TrainConfig(steps=4, batch_size=4, warmup_steps=0, learning_rate=1e-2, ema_decay=0.5, log_every=2,
                      checkpoint_every=2)

    # Execute: resume after 2 steps, then train to the end
    (tmp_path / "ck").mkdir()
    first = Trainer(model, _data(), cfg, seed=0, checkpoint_dir=tmp_path / "ck")
    while first.step < 2:
        first.train_step()
    first.save_checkpoint()
    model = DiffusionModel.from_config(ModelConfig(type="latent", pretrained_path=checkpoint, lora={"rank": 4}),
                                       resolution=RES, channels=1, class_names=["a", "b"])
    report = Trainer(model, _data(), cfg, seed=0, checkpoint_dir=tmp_path / "ck").fit()
    model.save(tmp_path / "m")
    loaded = DiffusionModel.load(tmp_path / "m")

    # Assert: only adapters (+ the 2 x time_embed_dim class embedding) train; the VAE stays the checkpoint's
    n_full = sum(p.numel() for p in full.parameters())
    assert report["resumed_from"] == 2 and report["model_type"] == "latent"
    assert report["parameters"] < n_full / 10, (report["parameters"], n_full)
    assert not any(p.requires_grad for p in model.vae.parameters())
    pretrained_vae = AutoencoderKL.from_pretrained(checkpoint / "vae")
    for k, v in pretrained_vae.state_dict().items():
        assert torch.equal(loaded.vae.state_dict()[k], v), k
    assert model.sample_shape == (4, RES // 4, RES // 4)
    # the merged, plain UNet predicts what the adapted one does, and the adapters did change the UNet
    x = torch.randn(3, *model.sample_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 500, 900])
    cond = model.condition(torch.tensor([0, 1, 1]), None, torch.device("cpu"))
    with torch.no_grad():
        adapted, merged = model.predict_noise(x, t, cond), loaded.predict_noise(x, t, cond)
        base = full.predict_noise(x, t, cond)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)
    assert (adapted - base).abs().max() > 1e-3
    assert "peft" not in json.dumps(json.loads((tmp_path / "m" / "unet" / "config.json").read_text()))


# ----------------------------------------------------------------------------- the whole pipeline at 64x64
@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, checkpoint: Path, one_thread) -> dict:
    from privdistill.pipeline import run_pipeline

    work = tmp_path_factory.mktemp("latent-run")
    cfg = parse_config(_run_config(checkpoint))
    return {"records": run_pipeline(cfg, work), "work": work, "cfg": cfg}


def test_whole_pipeline_runs_latent_at_64px_with_privacy_checks_at_16px(pipeline_run: dict) -> None:
    work, records = pipeline_run["work"], pipeline_run["records"]
    assert list(records) == ["ingest", "train-teacher", "train-reid", "sample", "filter", "train-student", "evaluate"]
    samples = ImageSet.load(work / "sample" / "samples.npz")
    kept = ImageSet.load(work / "filter" / "kept.npz")
    assert samples.images.shape == (6, 1, RES, RES) and np.isfinite(samples.images).all()
    assert samples.images.min() >= -1 and samples.images.max() <= 1 and samples.images.std() > 0.01
    assert kept.images.shape[1:] == (1, RES, RES)  # the filter decides at 16 px, keeps full-size images
    assert json.loads((work / "train-reid" / "reid" / "reid.json").read_text())["resolution"] == 16
    privacy = json.loads((work / "filter" / "privacy_report.json").read_text())
    assert privacy["analysis_resolution"] == 16 and privacy["n_synthetic"] == 6
    teacher = records["train-teacher"]["report"]
    student = records["train-student"]["report"]
    assert teacher["model_type"] == student["model_type"] == "latent"
    assert student["parameters"] < teacher["parameters"] / 10  # LoRA student vs full fine-tune teacher
    report = json.loads((work / "report.json").read_text())
    for name in ("teacher", "student"):
        assert 0 <= report[name]["memorization_rate"] <= 1 and 0 <= report[name]["mia_auc"] <= 1


def test_trained_latent_model_is_a_stable_diffusion_folder_diffusers_opens(pipeline_run: dict) -> None:
    folder = pipeline_run["work"] / "train-student" / "model"
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and type(pipe.scheduler).__name__ == "DDIMScheduler"
    # diffusers conditions on exactly what privdistill trained with (same tokens, attention mask, encoder)
    ours = DiffusionModel.load(folder).condition(None, ["an image of a trouser"], torch.device("cpu"))
    theirs = pipe.encode_prompt("an image of a trouser", torch.device("cpu"), 1, False)[0]
    torch.testing.assert_close(theirs, ours["encoder_hidden_states"])
    out = pipe("an image of a trouser", num_inference_steps=2, height=RES, width=RES, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, RES, RES, 3) and np.isfinite(out).all()


# ----------------------------------------------------------------------------- coordinator release
def test_released_class_conditional_latent_student_opens_in_diffusers(tmp_path: Path, checkpoint: Path,
                                                                      one_thread) -> None:
    from test_coordinator_student import _accepted, _kept_set, _shard

    from coordinator.release import release
    from coordinator.student import ShardRef, evaluate_student, parse_training_config, train_student

    # Prepare: one site's shard of 64x64 class-labelled images; a LoRA student on the local checkpoint
    shard = _shard(tmp_path / "store", "site-a", "a1", seed=1, data=_kept_set(1, per_class=4, res=RES))
    refs = [ShardRef(a.dir, a.tar_sha256) for a in _accepted([shard])]
    cfg = parse_training_config({
        "name": "latent-student", "resolution": RES,
        "student": {"model": {"type": "latent", "pretrained_path": checkpoint.name, "lora": {"rank": 4}},
                    "train": {"steps": 2, "batch_size": 4, "warmup_steps": 0, "log_every": 1}},
        "sample": {"per_class": 2, "steps": 2, "batch_size": 4},
        "evaluation": {"classifier_steps": 5, "classifier_batch_size": 8},
        "release": {"max_site_kept_memorization_rate": 0.02},
    }, base_dir=checkpoint.parent)
    assert cfg.student.model.pretrained_path == checkpoint  # relative to the config file's folder

    # Execute
    train_student(refs, cfg, tmp_path / "work")
    evaluate_student(refs, cfg, tmp_path / "work")
    path = release(tmp_path / "work", tmp_path / "out", cfg, shards=refs)

    # Assert: the released folder is a diffusers pipeline (its class-conditional code travels in pipeline.py)
    record = json.loads((path / "release.json").read_text())
    assert "DiffusionPipeline.from_pretrained" in record["model"]["layout"] and (path / "pipeline.py").is_file()
    pipe = DiffusionPipeline.from_pretrained(path, trust_remote_code=True, local_files_only=True)
    assert type(pipe).__name__ == "LatentClassPipeline"
    images = pipe([0, 1], num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, RES, RES, 3) and np.isfinite(images).all()
    assert DiffusionModel.load(path).class_names == ["square", "bar"]


# ----------------------------------------------------------------------------- DP-SGD on LoRA adapters
@pytest.mark.slow
def test_dp_sgd_trains_only_the_lora_adapters_with_per_sample_gradients(checkpoint: Path, one_thread) -> None:
    from privdistill.config import DPConfig
    from privdistill.dp import train_teacher_dp

    # Prepare: 40 single-image patients; rank-4 adapters on a class-conditional latent teacher
    model = DiffusionModel.from_config(ModelConfig(type="latent", pretrained_path=checkpoint, lora={"rank": 4}),
                                       resolution=RES, channels=1, class_names=["a", "b"])
    data = _data(40)
    data.patient_ids = np.array([f"p{i}" for i in range(40)])
    frozen = {k: v.clone() for k, v in model.unet.state_dict().items() if "lora" not in k and "class_emb" not in k}

    # Execute
    report = train_teacher_dp(model, data, TrainConfig(steps=3, batch_size=8, warmup_steps=0, log_every=1),
                              DPConfig(epsilon=10, physical_batch_size=4), seed=0, resolution=RES, channels=1)

    # Assert: the accountant ran within budget, Opacus' per-sample-gradient check passed (it raises
    # otherwise), and only the adapters and the class embedding moved
    assert 0 < report["dp"]["epsilon"] <= 10 and report["parameters"] < 10_000
    after = model.unet.state_dict()
    assert len(set(frozen) & set(after)) == len(frozen) > 100
    for k, v in frozen.items():
        assert torch.equal(after[k], v), k
