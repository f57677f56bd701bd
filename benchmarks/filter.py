"""Benchmark: embedding filter (one pass per image + matrix products) against a pairwise Siamese scorer.

    python benchmarks/filter.py            # N = M = 1,000: both methods in full, same decisions asserted
    python benchmarks/filter.py --quick    # N = M = 200
    python benchmarks/filter.py --scale 100000   # embedding filter alone (re-id + calibrated pixel check)
    python benchmarks/filter.py --scale 100000 --local-only   # the local detector's phases alone
    python benchmarks/filter.py --pixel 10000    # calibrated pixel detector: exhaustive vs prefiltered search
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from privdistill import localsearch
from privdistill.audit.stats import clopper_pearson
from privdistill.config import FilterConfig, ReidConfig
from privdistill.data.types import ImageSet
from privdistill.filter import GalleryScorer, best_matches, calibrate_filter, conformal_threshold, filter_synthetic
from privdistill.reid import OnnxEmbedder, ReidModel, export_onnx, train_reid

FMNIST = Path("/usr/share/datasets/fashion-mnist")
RESULTS = Path(__file__).resolve().parent / "results"


def fashion(split: str) -> np.ndarray:
    with gzip.open(FMNIST / f"{split}-images-idx3-ubyte.gz") as fh:
        return np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)


def to_float(u8: np.ndarray) -> np.ndarray:
    return u8.astype(np.float32) / 127.5 - 1.0


def jitter(x: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """A re-acquisition: shift by up to 1 px, 5% intensity change, optional noise."""
    out = np.empty_like(x)
    for i, img in enumerate(x):
        out[i] = np.roll(img, tuple(int(v) for v in rng.integers(-1, 2, 2)), axis=(1, 2))
    out = (out + 1) * rng.uniform(0.95, 1.05, (len(x), 1, 1, 1)).astype(np.float32) - 1
    if noise:
        out += rng.normal(0, noise, out.shape).astype(np.float32)
    return np.clip(out, -1, 1)


def make_data(n: int, m: int, seed: int) -> tuple[ImageSet, ImageSet, int]:
    """M real images (M/2 patients x 2 visits), N synthetic: 5% planted copies of real images, rest fresh items."""
    rng = np.random.default_rng(seed)
    train, test = fashion("train"), fashion("t10k")
    n_patients = (m + 1) // 2
    if n_patients > len(train) - 1000:
        raise SystemExit(f"M={m} needs more than the {len(train)} Fashion-MNIST training items")
    base = to_float(train[:n_patients])
    real = np.concatenate([jitter(base, rng, 0), jitter(base, rng, 0)])[:m]
    pids = np.concatenate([np.arange(n_patients)] * 2)[:m].astype(str)
    n_plant = max(1, n // 20)
    planted = jitter(real[rng.choice(m, n_plant, replace=False)], rng, 0.05)
    pool = np.concatenate([test, train[n_patients:]])  # items no real patient has
    fresh = to_float(pool[np.arange(n - n_plant) % len(pool)])
    fresh = jitter(fresh, rng, 0.05) if n - n_plant > len(pool) else fresh
    synthetic = np.concatenate([planted, fresh]).astype(np.float32)
    return ImageSet(synthetic), ImageSet(real.astype(np.float32), patient_ids=pids), n_plant


def reid_model(real: ImageSet, steps: int, seed: int) -> ReidModel:
    subset = real.subset(np.arange(min(len(real), 2000)))
    return train_reid(subset, ReidConfig(steps=steps), seed=seed)


def pairwise_scores(embedder: OnnxEmbedder, synthetic: np.ndarray, real: np.ndarray, pair_batch: int) -> np.ndarray:
    """Siamese-style: every (synthetic, real) pair goes through both branches, then the pair head.

    Batched (``pair_batch`` pairs per network call) so the baseline is as efficient as it can be."""
    best = np.full(len(synthetic), -np.inf, np.float32)
    for i, s in enumerate(synthetic):
        for c in range(0, len(real), pair_batch):
            r = real[c : c + pair_batch]
            both = embedder.embed(np.concatenate([np.broadcast_to(s, r.shape), r]), batch_size=2 * len(r))
            f1, f2 = both[: len(r)], both[len(r) :]
            _abs_diff = np.abs(f1 - f2)  # Packhauser-style head input; the decision uses the cosine
            cos = (f1 * f2).sum(1) / (np.linalg.norm(f1, axis=1) * np.linalg.norm(f2, axis=1))
            best[i] = max(best[i], float(cos.max()))
    return best


def summarise(reid_match: np.ndarray, pixel_match: np.ndarray, n_plant: int) -> dict:
    drop = reid_match | pixel_match
    return {
        "dropped_reid": int(reid_match.sum()),
        "dropped_pixel": int(pixel_match.sum()),
        "planted_recall": float(drop[:n_plant].mean()),
        "fresh_dropped_fraction": float(drop[n_plant:].mean()),
    }


def pixel_scorer(real: ImageSet, search: str) -> GalleryScorer:
    """A scorer for the pixel detector alone (its re-id embeddings are placeholders it never uses)."""
    return GalleryScorer(real, lambda x: np.zeros((len(x), 1), np.float32), real_embeddings=np.zeros((len(real), 1)),
                         max_shift=FilterConfig().pixel_max_shift, pixel_search=search)


def null_images(n_null: int) -> np.ndarray:
    """Fresh items for the pixel detector's conformal calibration: the last Fashion-MNIST training items (no real
    patient's, and no synthetic image's below N = 100,000, where the fresh images are jittered re-uses)."""
    return to_float(fashion("train")[-n_null:])


def calibrate_pixel(scorer: GalleryScorer, n_null: int) -> float:
    """The calibrated filter's pixel threshold as a distance (library defaults: alpha 0.05 over 3 detectors)."""
    cfg = FilterConfig()
    cal = calibrate_filter(scorer, null_images(n_null), cfg.model_copy(update={"max_fresh_drop": cfg.max_fresh_drop / 3,
                                                                                 "detectors": ["pixel"]}))
    return -cal.thresholds["pixel"]


def plant_kinds(real: ImageSet, synthetic: ImageSet, n_plant: int, seed: int) -> np.ndarray:
    """Replace the planted block by thirds of exact copies, 1-px shifted copies and noisy copies (sd 0.1)."""
    rng = np.random.default_rng(seed + 1)
    src = rng.choice(len(real), n_plant, replace=False)
    kinds = np.array(["exact", "shift", "noise"])[np.arange(n_plant) * 3 // n_plant]
    x = real.images[src].copy()
    x[kinds == "shift"] = np.roll(x[kinds == "shift"], (1, -1), axis=(2, 3))
    noisy = x[kinds == "noise"]
    x[kinds == "noise"] = np.clip(noisy + rng.normal(0, 0.1, noisy.shape), -1, 1)
    synthetic.images[:n_plant] = x
    return kinds


LOCAL_EXTRA_THRESHOLDS = (-1e-3, -1e-2)  # stricter than the calibrated one: the detector live, larger radii


def local_alpha() -> float:
    """The local detector's share of the library default fresh-drop level (alpha over 3 detectors)."""
    return FilterConfig().max_fresh_drop / 3


def local_threshold(null: np.ndarray, real: ImageSet, scorer: GalleryScorer) -> float:
    """The local detector's conformal threshold (library alpha split over 3 detectors) from exact scores: the
    ceil((n+1)(1-alpha))-th smallest null score, found by `localsearch.top_score` without every null score."""
    n = len(null)
    k = int(math.ceil((n + 1) * (1 - local_alpha())))
    if k > n:  # too few null items: the library's own error
        return conformal_threshold(np.zeros(n), local_alpha())
    return localsearch.top_score(null, real.images, scorer.local_patch, scorer.local_floor, n - k + 1,
                                 workers=torch.get_num_threads())


def local_comparison(synthetic: ImageSet, real: ImageSet, n_plant: int, n_null: int, n_sub: int) -> dict:
    """The local detector: calibration on ``n_null`` fresh items (exhaustive float32 scores vs exact tree scores)
    and its decisions by the tree search vs the exhaustive scores on ``n_sub`` synthetic images (every k-th, so
    planted copies are among them), at the calibrated threshold and at stricter ones."""
    scorer = pixel_scorer(real, "grid")
    null = null_images(n_null)
    null_ex, cal_ex_s, cal_ex_cpu = timed(scorer.local, null)
    null_tree, cal_tr_s, cal_tr_cpu = timed(localsearch.best_scores, null, real.images, scorer.local_patch,
                                            scorer.local_floor, workers=torch.get_num_threads())
    thr_ex, thr_tree = conformal_threshold(null_ex, local_alpha()), conformal_threshold(null_tree, local_alpha())
    thr_top, top_s, top_cpu = timed(local_threshold, null, real, scorer)
    pick = np.arange(0, len(synthetic), max(1, len(synthetic) // n_sub))[:n_sub]
    sub = synthetic.images[pick]
    scores, ex_s, ex_cpu = timed(scorer.local, sub)
    rows = []
    for thr in (thr_ex, *LOCAL_EXTRA_THRESHOLDS):
        res, tr_s, tr_cpu = timed(localsearch.local_within, sub, real.images, scorer.local_patch, thr,
                                  scorer.local_floor, workers=torch.get_num_threads())
        ex = scores > thr
        # exhaustive scores within float32 rounding (1e-4, see tests/test_localsearch.py) of the threshold
        near = np.abs(scores - thr) < 1e-4
        rows.append({"threshold": thr, "tree_s": tr_s, "tree_cpu_s": tr_cpu, "dropped_exhaustive": int(ex.sum()),
                     "dropped_tree": int(res.within.sum()), "differ": int((ex != res.within).sum()),
                     "differ_away_from_rounding": int(((ex != res.within) & ~near).sum()),
                     "planted_dropped_tree": int(res.within[pick < n_plant].sum()),
                     "n_planted": int((pick < n_plant).sum()), "searched": res.searched,
                     "candidates": res.candidates, "pairs": res.pairs, "tree_queries": res.tree_queries})
        print(f"  local, threshold {thr:.6f}: exhaustive drops {int(ex.sum())}, tree {int(res.within.sum())} "
              f"({tr_s:.2f} s, {tr_cpu:.1f} s CPU); differ {rows[-1]['differ']}", flush=True)
    fin = np.isfinite(null_ex)
    out = {"n_null": n_null, "local_threshold_exhaustive": thr_ex, "local_threshold_tree": thr_tree,
           "null_max_abs_score_diff": float(np.abs(null_ex[fin] - null_tree[fin]).max()) if fin.any() else 0.0,
           "null_finite_equal": bool(np.array_equal(fin, np.isfinite(null_tree))),
           "calibration_exhaustive_s": cal_ex_s, "calibration_exhaustive_cpu_s": cal_ex_cpu,
           "calibration_tree_s": cal_tr_s, "calibration_tree_cpu_s": cal_tr_cpu,
           "local_threshold_top_score": thr_top, "top_score_equals_tree_threshold": thr_top == thr_tree,
           "calibration_top_score_s": top_s, "calibration_top_score_cpu_s": top_cpu,
           "n_subset": len(pick), "exhaustive_subset_s": ex_s, "exhaustive_subset_cpu_s": ex_cpu, "thresholds": rows}
    print(f"  local calibration ({n_null} null): exhaustive {cal_ex_s:.1f} s ({cal_ex_cpu:.1f} CPU) -> {thr_ex:.6g}; "
          f"tree {cal_tr_s:.1f} s ({cal_tr_cpu:.1f} CPU) -> {thr_tree:.6g}; top_score {top_s:.1f} s ({top_cpu:.1f} CPU) "
          f"-> {thr_top:.6g} (equal: {thr_top == thr_tree})", flush=True)
    return out


def timed(fn, *args, **kwargs):
    t, c = time.perf_counter(), time.process_time()
    value = fn(*args, **kwargs)
    return value, round(time.perf_counter() - t, 2), round(time.process_time() - c, 2)


def pixel_comparison(n: int, seed: int, n_null: int, local_n: int = 0) -> dict:
    """The calibrated pixel detector on N = M = n: exhaustive search vs the prefiltered one, same threshold."""
    synthetic, real, n_plant = make_data(n, n, seed)
    kinds = plant_kinds(real, synthetic, n_plant, seed)
    load = os.getloadavg()
    radius, cal_s, _ = timed(calibrate_pixel, pixel_scorer(real, "exhaustive"), n_null)
    (d_ex, i_ex, ex), ex_s, ex_cpu = timed(pixel_scorer(real, "exhaustive").pixel_within, synthetic.images, radius)
    (d_fa, i_fa, fa), fa_s, fa_cpu = timed(pixel_scorer(real, "grid").pixel_within, synthetic.images, radius)
    differ = np.flatnonzero(ex != fa)
    out = {
        "n_synthetic": n, "n_real": n, "n_null": n_null, "pixel_threshold": radius, "calibration_s": cal_s,
        "exhaustive_s": ex_s, "exhaustive_cpu_s": ex_cpu, "prefiltered_s": fa_s, "prefiltered_cpu_s": fa_cpu,
        "speedup": round(ex_s / fa_s, 1), "dropped_exhaustive": int(ex.sum()), "dropped_prefiltered": int(fa.sum()),
        "decision_differences": [{"image": int(i), "exhaustive_distance": float(d_ex[i]), "threshold": radius}
                                 for i in differ],
        # both searches drop it but name different nearest training images: the distances of both (exhaustive:
        # |q|^2 - 2qr + |r|^2 in float32; prefiltered: |q - r| directly), so near-ties can be told apart
        "nearest_index_differences": [
            {"image": int(i), "exhaustive": [int(i_ex[i]), float(d_ex[i])], "prefiltered": [int(i_fa[i]), float(d_fa[i])]}
            for i in np.flatnonzero(ex & fa & (i_ex != i_fa))],
        "max_abs_distance_diff_dropped": float(np.abs(d_ex[ex & fa] - d_fa[ex & fa]).max()) if (ex & fa).any() else 0.0,
        "planted": {k: {"n": int((kinds == k).sum()), "dropped_exhaustive": int(ex[:n_plant][kinds == k].sum()),
                        "dropped_prefiltered": int(fa[:n_plant][kinds == k].sum()),
                        "recall_ci95": clopper_pearson(int(fa[:n_plant][kinds == k].sum()), int((kinds == k).sum()))}
                    for k in ("exact", "shift", "noise")},
        "fresh_dropped": int(fa[n_plant:].sum()), "n_fresh": int(n - n_plant),
        "fresh_dropped_fraction": float(fa[n_plant:].mean()),
        "fresh_dropped_ci95": clopper_pearson(int(fa[n_plant:].sum()), int(n - n_plant)), "load_average_1m": load[0],
    }  # fmt: skip
    if local_n:
        out["local"] = local_comparison(synthetic, real, n_plant, n_null, local_n)
    print(f"pixel detector, N = M = {n:,}, threshold {radius:.4f} (conformal, {n_null} null images)")
    print(f"  exhaustive search : {ex_s:8.2f} s ({ex_cpu:.1f} s CPU), dropped {out['dropped_exhaustive']}")
    print(f"  prefiltered search: {fa_s:8.2f} s ({fa_cpu:.1f} s CPU), dropped {out['dropped_prefiltered']}")
    print(f"  speed-up {out['speedup']}x; decisions differing: {len(differ)}; planted: {out['planted']}")
    return out


def scale_phases(synthetic: ImageSet, real: ImageSet, embedder: OnnxEmbedder, threshold: float, n_plant: int,
                 n_null: int = 1000, strict: bool = True) -> dict:
    """The embedding filter's steps one by one (same functions filter_synthetic calls), each timed and printed:
    the re-id similarity and the calibrated pixel detector (conformal threshold on ``n_null`` fresh items)."""
    cfg, times, cpu = FilterConfig(), {}, {}

    def phase(name: str, fn):
        value, times[name], cpu[name] = timed(fn)
        print(f"  {name:<32} {times[name]:8.2f} s ({cpu[name]:7.1f} s CPU)  peak RSS {peak_rss_mib():7.0f} MiB  "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        return value

    e_real = phase("embed real (onnx)", lambda: embedder.embed(real.images))
    e_syn = phase("embed synthetic (onnx)", lambda: embedder.embed(synthetic.images))
    best, _ = phase("re-id similarity (matmul)", lambda: best_matches(e_syn, e_real, cfg.chunk_size))
    scorer = pixel_scorer(real, "grid")
    radius = phase("pixel calibration (exact null)", lambda: calibrate_pixel(scorer, n_null))
    _, _, near = phase("pixel search (prefiltered)", lambda: scorer.pixel_within(synthetic.images, radius))
    local_thr = phase("local calibration (exact top scores)", lambda: local_threshold(null_images(n_null), real,
                                                                                       scorer))
    local = phase("local search (bounds + tree)", lambda: localsearch.local_within(
        synthetic.images, real.images, scorer.local_patch, local_thr, scorer.local_floor,
        workers=torch.get_num_threads()))
    strict_res = phase("local search at -1e-3 (bounds + tree)", lambda: localsearch.local_within(
        synthetic.images, real.images, scorer.local_patch, -1e-3, scorer.local_floor,
        workers=torch.get_num_threads())) if strict else None
    out = {f"phase_{k.split(' (')[0].replace(' ', '_')}_s": v for k, v in times.items()}
    out.update({f"phase_{k.split(' (')[0].replace(' ', '_')}_cpu_s": v for k, v in cpu.items()})
    extra = "local search at -1e-3"  # shows the search's cost with the detector live; not part of the filter
    out["embedding_filter_full_s"] = round(sum(v for k, v in times.items() if not k.startswith(extra)), 2)
    out["embedding_filter_full_cpu_s"] = round(sum(v for k, v in cpu.items() if not k.startswith(extra)), 2)
    out["pixel_threshold"] = radius
    out["local_threshold"] = local_thr
    out["local_dropped"] = int(local.within.sum())
    if strict_res is not None:
        out["local_dropped_at_-1e-3"] = int(strict_res.within.sum())
        out["local_planted_dropped_at_-1e-3"] = int(strict_res.within[:n_plant].sum())
    out["local_searched"], out["local_candidates"] = local.searched, local.candidates
    out["local_pairs"], out["local_tree_queries"] = local.pairs, local.tree_queries
    if strict_res is not None:
        out["local_pairs_at_-1e-3"], out["local_tree_queries_at_-1e-3"] = strict_res.pairs, strict_res.tree_queries
    out["load_average_1m_end"] = os.getloadavg()[0]
    out.update(summarise(best >= threshold, near | local.within, n_plant))
    out["dropped_pixel"] = int(near.sum())
    return out


def local_only(n: int, seed: int, n_null: int, strict: bool) -> dict:
    """The local detector's phases alone at N = M = ``n`` (same data and calls as `scale_phases`, no re-id model):
    calibration by `local_threshold`, the search at it and, with ``strict``, at -1e-3."""
    synthetic, real, n_plant = make_data(n, n, seed)
    scorer, times, cpu, load = pixel_scorer(real, "grid"), {}, {}, [os.getloadavg()[0]]

    def phase(name: str, fn):
        value, times[name], cpu[name] = timed(fn)
        load.append(os.getloadavg()[0])
        print(f"  {name:<40} {times[name]:8.2f} s ({cpu[name]:7.1f} s CPU)  load {load[-1]:.1f}", flush=True)
        return value

    thr = phase("local calibration (exact top scores)", lambda: local_threshold(null_images(n_null), real, scorer))
    runs = {"calibrated": phase("local search (bounds + tree)", lambda: localsearch.local_within(
        synthetic.images, real.images, scorer.local_patch, thr, scorer.local_floor, workers=torch.get_num_threads()))}
    if strict:
        runs["-1e-3"] = phase("local search at -1e-3 (bounds + tree)", lambda: localsearch.local_within(
            synthetic.images, real.images, scorer.local_patch, -1e-3, scorer.local_floor,
            workers=torch.get_num_threads()))
    out = {"n_synthetic": n, "n_real": n, "n_null": n_null, "local_threshold": thr, "load_average_1m": load,
           "phases_s": times, "phases_cpu_s": cpu}
    for k, res in runs.items():
        out[k] = {"dropped": int(res.within.sum()), "planted_dropped": int(res.within[:n_plant].sum()),
                  "searched": res.searched, "candidates": res.candidates, "pairs": res.pairs,
                  "tree_queries": res.tree_queries}
    return out


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="synthetic images (and real, unless --m)")
    ap.add_argument("--m", type=int, default=None, help="real training images")
    ap.add_argument("--quick", action="store_true", help="N = M = 200")
    ap.add_argument("--scale", type=int, default=None, help="embedding filter alone at N = M = SCALE")
    ap.add_argument("--pixel", type=int, default=None, help="pixel detector alone: exhaustive vs prefiltered at N = M")
    ap.add_argument("--local-n", type=int, default=2000,
                    help="with --pixel: synthetic images on which the local detector's searches are compared (0: skip)")
    ap.add_argument("--no-strict", action="store_true",
                    help="with --scale: skip the extra local search at -1e-3 (not part of the filter)")
    ap.add_argument("--local-only", action="store_true",
                    help="with --scale: the local detector's calibration and search alone (no re-id model)")
    ap.add_argument("--n-null", type=int, default=1000, help="fresh items calibrating the pixel threshold")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime / torch threads")
    ap.add_argument("--train-steps", type=int, default=None, help="re-id training steps (150; 60 with --quick)")
    ap.add_argument("--pair-batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    n = args.scale or (200 if args.quick else args.n)
    m = args.scale or (200 if args.quick else (args.m or n))
    torch.set_num_threads(args.threads)
    if args.pixel:
        res = pixel_comparison(args.pixel, args.seed, args.n_null, args.local_n)
        res.update(threads=args.threads, peak_rss_mib=round(peak_rss_mib(), 1))
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"filter_pixel_{args.pixel}.json").write_text(json.dumps(res, indent=2) + "\n")
        return res
    if args.scale and args.local_only:
        res = local_only(args.scale, args.seed, args.n_null, strict=not args.no_strict)
        res.update(threads=args.threads, peak_rss_mib=round(peak_rss_mib(), 1))
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"filter_scale_{args.scale}_local.json").write_text(json.dumps(res, indent=2) + "\n")
        return res
    name = f"filter_scale_{n}" if args.scale else ("filter_quick" if args.quick else "filter")

    t0 = time.perf_counter()
    synthetic, real, n_plant = make_data(n, m, args.seed)
    steps = args.train_steps or (60 if args.quick else 150)
    model = reid_model(real, steps, args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="pd-bench-"))
    embedder = OnnxEmbedder(export_onnx(model, tmp / "reid.onnx"), threads=args.threads)
    setup_s = time.perf_counter() - t0
    out: dict = {
        "n_synthetic": n, "n_real": m, "planted_copies": n_plant, "threshold": model.threshold,
        "calibration": model.calibration, "setup_s": round(setup_s, 2), "threads": args.threads,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": torch.get_num_threads()},
    }  # fmt: skip

    print(f"setup (data, re-id training, ONNX export): {setup_s:.1f} s", flush=True)
    if args.scale:
        out.update(scale_phases(synthetic, real, embedder, model.threshold, n_plant, args.n_null,
                                strict=not args.no_strict))
    else:
        t = time.perf_counter()
        full = filter_synthetic(synthetic, real, embed=embedder.embed, threshold=model.threshold, cfg=FilterConfig())
        out["embedding_filter_full_s"] = round(time.perf_counter() - t, 3)
        out.update(summarise(full.reid_match, full.pixel_match, n_plant))
        t = time.perf_counter()
        reid_only = filter_synthetic(
            synthetic, real, embed=embedder.embed, threshold=model.threshold,
            cfg=FilterConfig(pixel_near_duplicate=False),
        )  # fmt: skip
        out["embedding_filter_reid_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        pair_best = pairwise_scores(embedder, synthetic.images, real.images, args.pair_batch)
        out["pairwise_s"] = round(time.perf_counter() - t, 3)
        out["pairwise_network_passes"] = 2 * n * m
        out["embedding_network_passes"] = n + m
        pair_drop = pair_best >= model.threshold
        differ = pair_drop != reid_only.reid_match
        borderline = np.abs(reid_only.best_similarity - model.threshold) < 1e-5
        out["max_abs_similarity_diff"] = float(np.abs(pair_best - reid_only.best_similarity).max())
        out["decision_mismatches"] = int(differ.sum())
        out["borderline_mismatches"] = int((differ & borderline).sum())
        out["speedup"] = round(out["pairwise_s"] / out["embedding_filter_reid_s"], 1)
        assert not (differ & ~borderline).any(), f"{int(differ.sum())} drop decisions differ"
    out["peak_rss_mib"] = round(peak_rss_mib(), 1)

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n== filter benchmark: N={n} synthetic x M={m} real, 28x28, {args.threads} threads ==")
    print(f"re-id threshold {model.threshold:.4f}  (calibration tpr {model.calibration['tpr']:.3f}, "
          f"fpr {model.calibration['fpr']:.4f}, auc {model.calibration['auc']:.4f})")  # fmt: skip
    print(f"embedding filter, re-id + pixel : {out['embedding_filter_full_s']:9.2f} s")
    print(f"dropped: re-id {out['dropped_reid']}, pixel {out['dropped_pixel']}; planted-copy recall "
          f"{out['planted_recall']:.3f}, fresh items dropped {out['fresh_dropped_fraction']:.3f}")  # fmt: skip
    if not args.scale:
        print(f"embedding filter, re-id only    : {out['embedding_filter_reid_s']:9.2f} s  ({n + m:,} network passes)")
        print(f"pairwise Siamese scorer         : {out['pairwise_s']:9.2f} s  ({2 * n * m:,} network passes)")
        print(f"speed-up {out['speedup']}x; same drop decisions: {out['decision_mismatches'] == 0} "
              f"(max |similarity diff| {out['max_abs_similarity_diff']:.2e})")  # fmt: skip
    print(f"peak RSS {out['peak_rss_mib']:.0f} MiB; results -> {RESULTS / (name + '.json')}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
