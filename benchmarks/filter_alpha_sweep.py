"""Diagnostic (TUNED settings, not the defaults): the headline's filter at other alphas, reusing a finished
run's stages; counts how many of the independent metric's teacher copies each alpha drops.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/filter_alpha_sweep.py WORKDIR OUT.json"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

from privdistill.config import FilterConfig
from privdistill.data.types import ImageSet
from privdistill.filter import calibrate_filter, filter_synthetic, scorer_for, split_null
from privdistill.filter_audit import binomial_ci, flagged
from privdistill.metrics import memorization
from privdistill.reid import OnnxEmbedder

torch.set_num_threads(1)
wd = Path(sys.argv[1])
train = ImageSet.load(wd / "ingest/train.npz")
held = ImageSet.load(wd / "ingest/test.npz")
samples = ImageSet.load(wd / "sample/samples.npz")
emb = OnnxEmbedder(wd/"train-reid/reid.onnx")
mem = memorization(samples.images, train, ratio=1/3)["memorized"]
ni, ai = split_null(held, 0.5, seed=5)
out = []
for alpha in (0.05, 0.1, 0.2, 0.3):
    cfg = FilterConfig(max_fresh_drop=alpha)
    sc = scorer_for(train, emb.embed, cfg)
    cal = calibrate_filter(sc, held.images[ni], cfg)
    res = filter_synthetic(samples, train, embed=emb.embed, cfg=cfg, calibration=cal, scorer=sc)
    fresh = flagged(sc, cal, held.images[ai])
    caught = np.isin(np.flatnonzero(mem), res.dropped)
    row = {"alpha": alpha, "kept": len(res.kept), "copies": int(mem.sum()), "copies_dropped": int(caught.sum()),
           "fresh_drop": float(fresh.mean()), "fresh_drop_ci": binomial_ci(int(fresh.sum()), len(fresh))}
    print(json.dumps(row), flush=True)
    out.append(row)
Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
