"""How the design of the built-in 'dots' data and the cpu-demo recipe were chosen: one short run, three probes.

Trains `--preset` (default cpu-demo) on dots images for `--steps` steps, then fits the linear probe and kNN on
the average-pooled target encoder, the untrained encoder of the same seed, and raw pixels (the three rows of
`make demo`, on fewer probe images: `--probe-train` 4,000 of the 10,000 training images, 2,000 test images).
Module constants of `ijepa_viz.data.dots` can be changed for the run (`--dots NAME=VALUE`), so a design is
tried without editing the renderer; config keys with `--set`, as in the CLI.

    python benchmarks/dots_design.py --steps 500 --dots "DOT_RADIUS=(0.05,0.07)" --set model.pred_depth=1

Besides the probes, each encoder's row says what its features hold: `class_share`, the share of their variance
that lies between the class means, and `background_r2`, how well a linear map reads each image's background
colour from them, and `neighbour_purity`, the share of each test image's 10 nearest neighbours that share its
class. A t-SNE shows class clusters only where the class, not the background, sets the features, and only as
far as those neighbourhoods are pure.

Appends one JSON line per run to benchmarks/results/dots_design.jsonl (the command is in it).
"""
from __future__ import annotations

import argparse
import ast
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import ijepa_viz.data.dots as dots
from ijepa_viz.config import get_preset, override
from ijepa_viz.data import InMemoryLoader, UInt8Cache
from ijepa_viz.evaluate import _random_init, extract_features, knn_classifier, linear_probe, raw_pixel_features
from ijepa_viz.model import rankme
from ijepa_viz.train import Trainer
from ijepa_viz.viz.features import tsne_2d
from ijepa_viz.viz.verdicts import cluster_score

HERE = Path(__file__).resolve().parent


def _standardise(fit: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = fit.mean(0), fit.std(0).clamp_min(1e-6)
    return [(x - mean) / std for x in (fit, *others)]


def class_variance_share(x: torch.Tensor, y: torch.Tensor) -> float:
    """Between-class variance / total variance of standardised features (N, D), averaged over the D dims:
    1 when the class alone sets every feature, 0 when the class means coincide."""
    (z,) = _standardise(x.double())
    means = torch.stack([z[y == c].mean(0) for c in y.unique()])  # (C, D)
    counts = torch.stack([(y == c).sum() for c in y.unique()]).double()  # (C,)
    return float((counts[:, None] * means ** 2).sum(0).mean() / len(z))


def linear_r2(fit_x, fit_t, test_x, test_t, ridge: float = 1.0) -> float:
    """R^2 on the test set of a ridge regression from standardised features (N, D) to targets (N, T), averaged
    over T (scikit-learn's Ridge and r2_score)."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), Ridge(alpha=ridge)).fit(fit_x.double().numpy(), fit_t.double().numpy())
    return float(r2_score(test_t.double().numpy(), model.predict(test_x.double().numpy())))


def neighbour_purity(x: torch.Tensor, y: torch.Tensor, k: int = 10) -> float:
    """The share of each image's k nearest neighbours (cosine similarity of the features (N, D), the kNN probe's
    geometry) that have its class, averaged over the N images: 1 / classes by chance. A t-SNE keeps these
    neighbourhoods, so its classes can only gather where this share is high."""
    z = torch.nn.functional.normalize(x.double(), dim=1)
    sim = z @ z.T  # (N, N)
    sim.fill_diagonal_(-2.0)  # never your own neighbour
    nearest = sim.topk(k, dim=1).indices  # (N, k)
    return float((y[nearest] == y[:, None]).double().mean())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=500, help="training steps (0: baselines only)")
    p.add_argument("--preset", default="cpu-demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--dots", action="append", default=[], metavar="NAME=VALUE",
                   help="a module constant of ijepa_viz.data.dots for this run, e.g. DOTS_PER_FIGURE=20")
    p.add_argument("--seed", type=int, default=0, help="training seed (the images are always seed 0)")
    p.add_argument("--train-images", type=int, default=10000)
    p.add_argument("--probe-train", type=int, default=4000, help="the first N training images fit the probes")
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--out", default=str(HERE / "results" / "dots_design.jsonl"))
    p.add_argument("--tsne-points", type=int, default=1000,
                   help="test images in the t-SNE whose class silhouette is recorded (0: none)")
    p.add_argument("--figure", default=None, help="also save the t-SNE panels of every encoder to this PNG")
    args = p.parse_args(argv)

    for item in args.dots:
        name, value = item.split("=", 1)
        if not hasattr(dots, name):
            p.error(f"--dots {item}: ijepa_viz.data.dots has no constant {name!r}")
        setattr(dots, name, ast.literal_eval(value))
    start = time.perf_counter()
    size = args.img_size
    train_u8, train_y = dots.render_dots(np.arange(args.train_images), size, 0, "train")
    test_u8, test_y = dots.render_dots(np.arange(args.test_images), size, 0, "test")
    pixels = train_u8.float() / 255
    mean, std = pixels.mean((0, 2, 3)).tolist(), pixels.std((0, 2, 3)).tolist()
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = override(get_preset(args.preset), [
            "data.name=dots", f"model.img_size={size}", f"train.out_dir={run_dir}", "train.log_every=25",
            "train.checkpoint_every=1000000", "train.checkpoint_minutes=0", f"train.seed={args.seed}",
            f"train.steps={max(args.steps, 1)}"] + args.set)
        row = {"command": "python benchmarks/dots_design.py " + shlex.join(sys.argv[1:] if argv is None else argv),
               "steps": args.steps, "dots": args.dots, "set": args.set, "seed": args.seed}
        encoders = {"untrained": _random_init(cfg, args.seed).target_network}
        if args.steps:
            loader = InMemoryLoader(UInt8Cache(train_u8, train_y, list(dots.DOTS_CLASSES)), cfg.data.batch_size,
                                    size, mean, std, train=True, crop_scale=cfg.data.crop_scale,
                                    hflip=cfg.data.hflip, seed=args.seed)
            tick = time.perf_counter()
            result = Trainer(cfg, loader=loader, progress=False).fit()
            row["train_s"] = round(time.perf_counter() - tick, 1)
            row["loss_every_sixth"] = [round(h["loss"], 4) for h in result.history[::max(1, len(result.history) // 6)]]
            encoders = {"ijepa": result.model.eval().target_network, **encoders}

    def normalised(u8: torch.Tensor) -> torch.Tensor:
        return (u8.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    def features(encoder, u8, y):
        batches = [(normalised(u8[i:i + 500]), y[i:i + 500]) for i in range(0, len(u8), 500)]
        return extract_features(encoder, batches, progress=False)[0]

    fit_u8, fit_y = train_u8[:args.probe_train], train_y[:args.probe_train]
    # The background colour of each image: most pixels are background, and the noise is symmetric.
    fit_bg, test_bg = (u8.float().flatten(2).median(2).values / 255 for u8 in (fit_u8, test_u8))  # (N, 3)
    maps = {}
    for name, encoder in encoders.items():
        f_fit, f_test = features(encoder, fit_u8, fit_y), features(encoder, test_u8, test_y)
        probe = linear_probe(f_fit, fit_y, f_test, test_y)
        row[f"{name}_linear"] = round(100 * probe["accuracy"], 1)
        row[f"{name}_C"] = probe["C"]
        row[f"{name}_knn"] = round(100 * knn_classifier(f_fit, fit_y, f_test, test_y), 1)
        row[f"{name}_rankme"] = round(float(rankme(f_test)), 1)
        # What the features hold: the share of their (standardised) variance that lies between the class means,
        # and how well a linear map reads the background colour from them (R^2 on the test images).
        row[f"{name}_class_share"] = round(class_variance_share(f_test, test_y), 3)
        row[f"{name}_background_r2"] = round(linear_r2(f_fit, fit_bg, f_test, test_bg), 3)
        if args.tsne_points:  # do the classes form clusters in the picture a learner sees?
            maps[name] = tsne_2d(f_test[:args.tsne_points])
            row[f"{name}_tsne_silhouette"] = round(cluster_score(maps[name], test_y[:args.tsne_points]), 3)
            row[f"{name}_neighbour_purity"] = round(neighbour_purity(f_test[:args.tsne_points],
                                                                     test_y[:args.tsne_points]), 3)
    row["pixels_linear"] = round(100 * linear_probe(raw_pixel_features(fit_u8), fit_y, raw_pixel_features(test_u8),
                                                    test_y)["accuracy"], 1)
    row["total_s"] = round(time.perf_counter() - start, 1)
    if args.figure and maps:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from ijepa_viz.viz.feature_plots import plot_embedding_2d
        fig, axes = plt.subplots(1, len(maps), figsize=(5.5 * len(maps), 5), squeeze=False)
        for ax, (name, xy) in zip(axes[0], maps.items()):
            plot_embedding_2d(ax, xy, test_y[:args.tsne_points], list(dots.DOTS_CLASSES), legend=ax is axes[0, -1],
                              title=f"{name}: t-SNE, silhouette {row[f'{name}_tsne_silhouette']:.2f}")
        fig.tight_layout()
        fig.savefig(args.figure, dpi=80)
    print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
