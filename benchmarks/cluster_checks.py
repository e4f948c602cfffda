"""Can any view of the shipped `dots` features gather the classes in a 2-D map? And what do the maps' scores mean?

    python benchmarks/cluster_checks.py                 # writes benchmarks/results/cluster_checks.json

Two parts, both printed as a table and saved with the command:

1. `views`: the shipped `dots-cpu-demo` model and its untrained twin (the same seed) on `--images` dots test
   images, seen in several ways that use no labels: the average-pooled target features as the paper
   evaluates them; standardised per dimension; PCA-whitened to 16, 32, 64 or all dimensions (every direction
   the same variance, so directions of small variance count as much as the background colour); with the 5
   largest principal directions removed; L2-normalised; max-pooled or std-pooled over the patches instead of
   averaged; and the context encoder's average-pooled features. For each: the leave-one-out kNN accuracy
   (k = 20, majority vote, cosine), `verdicts.neighbour_purity` (10 neighbours, Euclidean), and the class
   silhouette (`verdicts.cluster_score`) of its t-SNE and PCA maps (`features.tsne_2d`, `features.pca_2d`).
2. `gaussians`: 10 Gaussian classes of `--images` points, unit noise in D dims, class means `scale` apart
   along the first 10 axes: neighbour purity against the t-SNE and PCA silhouettes, to calibrate the two.
   A PCA keeps 2 directions, and 10 classes whose means lie along 10 orthogonal directions cannot all be
   apart in 2, however far apart they are.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import PCA

from ijepa_viz.data.dots import render_dots
from ijepa_viz.evaluate import _random_init
from ijepa_viz.pretrained import load_pretrained
from ijepa_viz.viz import features as fx
from ijepa_viz.viz.verdicts import cluster_score, neighbour_purity

HERE = Path(__file__).resolve().parent


def knn_accuracy(x: np.ndarray, y: np.ndarray, k: int = 20) -> float:
    """Leave-one-out accuracy of a majority vote of the k most cosine-similar other images (N, D)."""
    z = torch.nn.functional.normalize(torch.as_tensor(x, dtype=torch.float64), dim=1)
    sim = z @ z.T  # (N, N)
    sim.fill_diagonal_(-2.0)
    votes = torch.as_tensor(y)[sim.topk(k, dim=1).indices]  # (N, k)
    pred = torch.stack([torch.bincount(v, minlength=int(y.max()) + 1).argmax() for v in votes])
    return float((pred.numpy() == y).mean())


def views(feats: np.ndarray, patches: np.ndarray, context: np.ndarray) -> dict[str, np.ndarray]:
    """Label-free views of one encoder's features: pooled (N, D), its patches (N, P, D), the context encoder's."""
    centred = feats - feats.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    out = {"average-pooled (the paper's)": feats, "standardised": centred / feats.std(0).clip(1e-12)}
    for dims in (16, 32, 64, feats.shape[1]):
        out[f"PCA-whitened, {dims} dims"] = PCA(dims, whiten=True).fit_transform(feats)  # unit variance each
    out["top 5 principal directions removed"] = centred - centred @ vt[:5].T @ vt[:5]
    out["L2-normalised"] = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    out["max-pooled"] = patches.max(1)
    out["std-pooled"] = patches.std(1)
    out["context encoder, average-pooled"] = context
    return out


def scores(x: np.ndarray, y: np.ndarray) -> dict:
    x = np.asarray(x, dtype=np.float32)
    purity, chance = neighbour_purity(x, y)
    return {"knn20": round(knn_accuracy(x, y), 3), "neighbour_purity": round(purity, 3), "chance": round(chance, 3),
            "tsne_silhouette": round(cluster_score(fx.tsne_2d(x), y), 3),
            "pca_silhouette": round(cluster_score(fx.pca_2d(x), y), 3)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000, help="dots test images (and Gaussian points)")
    p.add_argument("--out", default=str(HERE / "results" / "cluster_checks.json"))
    args = p.parse_args(argv)
    start = time.perf_counter()
    model, cfg = load_pretrained("dots-cpu-demo")
    encoders = {"trained": model, "untrained": _random_init(cfg, 0)}
    images, labels = render_dots(range(args.images), cfg.model.img_size, split="test")
    y = labels.numpy()
    result = {"command": " ".join(["python", "benchmarks/cluster_checks.py", *map(shlex.quote, sys.argv[1:])]),
              "images": args.images, "views": {}, "gaussians": []}
    for name, m in encoders.items():
        patches = fx.embed(m, images, cfg, pool="none").numpy()  # (N, P, D)
        context = fx.embed(m, images, cfg, which="context").numpy()  # (N, D)
        for view, x in views(patches.mean(1), patches, context).items():
            row = scores(x, y)
            result["views"].setdefault(view, {})[name] = row
            print(f"{name:9s} {view:36s} " + "  ".join(f"{k} {v:+.3f}" for k, v in row.items()), flush=True)
    rng = np.random.default_rng(0)
    classes = np.arange(args.images) % 10
    for dims in (32, 128):
        for scale in (2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 8.0):
            x = scale * np.eye(10, dims)[classes] + rng.normal(size=(args.images, dims))
            row = {"dims": dims, "scale": scale, **scores(x, classes)}
            result["gaussians"].append(row)
            print("gaussians " + "  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    result["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['seconds']} s -> {args.out}")
    return result


if __name__ == "__main__":
    main()
