"""How long the 2-D maps of notebook 05 take: PCA and t-SNE of 5,000 feature vectors.

    python benchmarks/embedding_speed.py                      # 5,000 synthetic 192-d features (10 clusters)
    python benchmarks/embedding_speed.py --checkpoint runs/notebook/checkpoint.pt   # a real model's features
    python benchmarks/embedding_speed.py --reference          # also scikit-learn's default t-SNE schedule

Features: by default a mixture of 10 Gaussian clusters in D=192 (the width of cpu-tiny's ViT), which needs no
model and is the same on every machine; with --checkpoint, the average-pooled target-encoder features of the
N training images of that run's dataset (the embedding time is reported, not counted in the total).

Times `features.pca_2d` and `features.tsne_2d` (its short default schedule: 300 iterations, 100 of them with
early exaggeration) with the caches cleared; with --reference, scikit-learn's defaults (1000 and 250) on the same
input. Each layout gets its trustworthiness (scikit-learn, 10 neighbours): 1.0 means every 2-D neighbourhood
holds only true neighbours. Goal: PCA + t-SNE within 15 s on the 2-core CPU of the project's machines.
The machine's load average is recorded: the timings are only comparable at similar loads.

Writes benchmarks/results/embedding_speed.json.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

GOAL_S = 15.0
OUT = Path(__file__).resolve().parent / "results" / "embedding_speed.json"


def synthetic_features(n: int, dim: int, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n vectors from `classes` Gaussian clusters, and their labels: two points of one cluster lie about 0.7 times
    as far apart as two points of different clusters, so the classes overlap a little."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 0.3, size=(classes, dim))
    labels = rng.integers(0, classes, n)
    return (centres[labels] + rng.normal(0, 1 / np.sqrt(dim) * 4, size=(n, dim))).astype(np.float32), labels


def model_features(checkpoint: str, n: int) -> tuple[np.ndarray, np.ndarray, float]:
    from ijepa_viz.data import load_uint8
    from ijepa_viz.train import load_model
    from ijepa_viz.viz.features import embed

    model, cfg = load_model(checkpoint)
    images, labels = load_uint8(cfg.data, "train", cfg.model.img_size, limit=n)
    start = time.perf_counter()
    feats = embed(model, images, cfg, cache=False).numpy()
    return feats, labels.numpy(), time.perf_counter() - start


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def knn_accuracy_2d(xy: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Accuracy of a k-NN classifier in the 2-D layout (half the points fit, half scored): do classes stay together?"""
    from sklearn.neighbors import KNeighborsClassifier

    half = len(xy) // 2
    return float(KNeighborsClassifier(k).fit(xy[:half], labels[:half]).score(xy[half:], labels[half:]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000, help="feature vectors (default 5000)")
    p.add_argument("--dim", type=int, default=192, help="width of the synthetic features (default 192)")
    p.add_argument("--checkpoint", help="embed test images with this training checkpoint instead")
    p.add_argument("--reference", action="store_true", help="also time scikit-learn's default t-SNE schedule")
    p.add_argument("--out", default=str(OUT), help=f"JSON output (default {OUT})")
    args = p.parse_args(argv)

    from sklearn.manifold import TSNE, trustworthiness  # imported before timing: the import is not the method

    from ijepa_viz.viz import features as fx

    embed_s = None
    if args.checkpoint:
        X, labels, embed_s = model_features(args.checkpoint, args.n)
        source = f"average-pooled target-encoder features of {len(X)} training images, checkpoint {args.checkpoint}"
    else:
        X, labels = synthetic_features(args.n, args.dim)
        source = f"synthetic: {len(X)} vectors, 10 Gaussian clusters in {X.shape[1]} dimensions"
    print(f"features: {source}" + (f" (embedded in {embed_s:.1f} s)" if embed_s else ""))
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")

    fx.clear_cache()
    tsne_defaults = {k: v.default for k, v in inspect.signature(fx.tsne_2d).parameters.items()
                     if k in ("perplexity", "iterations", "exaggeration_iterations")}
    pca_xy, pca_s = timed(fx.pca_2d, X)
    tsne_xy, tsne_s = timed(fx.tsne_2d, X)
    total = pca_s + tsne_s
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "load_average_1min": round(os.getloadavg()[0], 2),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "features": source, "n": int(len(X)), "dim": int(X.shape[1]),
        "pca_2d_s": round(pca_s, 3),
        "tsne_2d_s": round(tsne_s, 3),
        "total_s": round(total, 3),
        "goal_s": GOAL_S, "meets_goal": total <= GOAL_S,
        "tsne_settings": {**tsne_defaults, "angle": 0.8, "init": "pca", "learning_rate": "auto", "pca_first": 50},
        "trustworthiness": {"pca": round(float(trustworthiness(X, pca_xy, n_neighbors=10)), 4),
                            "tsne_2d": round(float(trustworthiness(X, tsne_xy, n_neighbors=10)), 4)},
        "knn_accuracy_2d": {"pca": round(knn_accuracy_2d(pca_xy, labels), 4),
                            "tsne_2d": round(knn_accuracy_2d(tsne_xy, labels), 4)},
    }
    if embed_s is not None:
        result["embed_s"] = round(embed_s, 3)
    print(f"PCA {pca_s:.2f} s + t-SNE {tsne_s:.2f} s = {total:.2f} s (goal {GOAL_S:.0f} s: "
          f"{'met' if total <= GOAL_S else 'NOT met'})")
    if args.reference:
        from sklearn.decomposition import PCA

        def reference():
            Z = PCA(50, svd_solver="randomized", random_state=0).fit_transform(X) if X.shape[1] > 50 else X
            return TSNE(2, perplexity=30, init="pca", learning_rate="auto", random_state=0).fit_transform(Z)

        ref_xy, ref_s = timed(reference)
        result["reference_tsne"] = {
            "settings": "scikit-learn defaults (1000 iterations, 250 exaggerated, angle 0.5) after PCA-50",
            "seconds": round(ref_s, 3),
            "trustworthiness": round(float(trustworthiness(X, ref_xy, n_neighbors=10)), 4),
            "knn_accuracy_2d": round(knn_accuracy_2d(ref_xy, labels), 4)}
        print(f"reference t-SNE (scikit-learn defaults): {ref_s:.2f} s")
    result["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps({k: result[k] for k in ("trustworthiness", "knn_accuracy_2d")}))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
