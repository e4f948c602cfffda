"""What a `dots` model's pooled features vary with: the rendering factors, the per-pixel noise, and the rest.

    python benchmarks/dots_features.py                      # the shipped dots-cpu-demo and its untrained twin
    python benchmarks/dots_features.py --checkpoint runs/cpu-demo/checkpoint.pt

Every `dots` image is a pure function of random draws that `ijepa_viz.data.dots` makes per image (background
colour, figure size, place and starting point) and per dot (jitter, radius, colour), plus per-pixel noise. This
script renders `--images` test images, embeds them (average-pooled target encoder, standardised per dimension)
and reports, for the trained and the untrained encoder:

* `r2[group]`: the share of the feature variance that a linear map *from* a group of factors explains (fitted
  on the first half of the images, scored on the second): the class (one-hot), the background colour, the
  figure's size and place, its starting point, the mean dot colour, and all of them together;
* `noise_share`: the share of the feature variance that changes when only the per-pixel noise is drawn
  again (half the variance of the difference between the two renderings' features, over the total);
* `top5_pc_share`: the share of the variance in the first 5 principal directions;
* `pooled_std`: the median, min and max over the dimensions of each pooled dimension's std across the images
  (the cpu-demo recipe's variance term asks for at least 1);
* `patch_image_share`, `patch_position_share`: of the variance of the patch features of 200 images, the share
  of the per-image means and of the per-position means (`features.image_share`, `features.position_share`).

A t-SNE gathers the classes only where the class is a large share of what the features vary with. Writes
benchmarks/results/dots_features.json.
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

import ijepa_viz.data.dots as dots
from ijepa_viz.checkpoint import load_model
from ijepa_viz.evaluate import _random_init
from ijepa_viz.pretrained import is_shipped, load_shipped
from ijepa_viz.viz import features as fx

HERE = Path(__file__).resolve().parent


def heldout_r2(x: np.ndarray, f: np.ndarray) -> float:
    """R^2 of a least-squares map (with intercept) from factors x (N, K) to features f (N, D), fitted on the
    first half of the rows and scored on the second, summed over the D dims."""
    x = np.c_[x, np.ones(len(x))]
    half = len(x) // 2
    w = np.linalg.lstsq(x[:half], f[:half], rcond=None)[0]
    resid = f[half:] - x[half:] @ w
    return float(1 - (resid ** 2).sum() / ((f[half:] - f[:half].mean(0)) ** 2).sum())


def factors(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The rendering factors of test images 0..n-1, from the same random draws as `dots.render_dots`."""
    idx = np.arange(n)
    keys = dots._image_keys(seed, "test", idx)
    p = dots._uniform(keys, 0, dots._PER_IMAGE).numpy()  # (N, 8)
    q = dots._uniform(keys, dots._PER_IMAGE, dots._PER_DOT * dots.DOTS_PER_FIGURE).numpy()
    q = q.reshape(n, dots.DOTS_PER_FIGURE, dots._PER_DOT)  # (N, K, 6)
    angle = 2 * np.pi * p[:, 6]
    low, high = dots.BACKGROUND
    half = dots.FIGURE_HALF_SIZE[0] + (dots.FIGURE_HALF_SIZE[1] - dots.FIGURE_HALF_SIZE[0]) * p[:, 3]
    room = np.clip(1 - 2 * half - dots.JITTER, 0, None)  # as in render_dots
    centre = 0.5 + (p[:, 4:6] - 0.5) * room[:, None]
    return {"class": np.eye(len(dots.DOTS_CLASSES))[idx % len(dots.DOTS_CLASSES)],
            "background colour": low + (high - low) * p[:, 0:3], "figure size and place": np.c_[half, centre],
            "starting point": np.c_[np.cos(angle), np.sin(angle)], "mean dot colour": q[..., 3:6].mean(1)}


def describe(model, cfg, images: torch.Tensor, renoised: torch.Tensor, groups: dict) -> dict:
    f = fx.embed(model, images, cfg).double().numpy()  # (N, D)
    g = fx.embed(model, renoised, cfg).double().numpy()
    mean, std = f.mean(0), f.std(0) + 1e-12
    f, g = (f - mean) / std, (g - mean) / std
    row = {"r2": {name: round(heldout_r2(x, f), 3) for name, x in groups.items()}}
    row["r2"]["all of them"] = round(heldout_r2(np.concatenate(list(groups.values()), 1), f), 3)
    row["noise_share"] = round(float(((f - g).var(0).sum() / 2) / f.var(0).sum()), 3)
    ev = np.linalg.svd(f - f.mean(0), compute_uv=False) ** 2
    row["top5_pc_share"] = round(float(ev[:5].sum() / ev.sum()), 3)
    std = torch.from_numpy(std)  # each pooled dimension's std across the images, before standardising
    row["pooled_std"] = {"median": round(float(std.median()), 3), "min": round(float(std.min()), 3),
                         "max": round(float(std.max()), 3)}
    patches = fx.embed(model, images[:200], cfg, pool="none")  # (200, P, D)
    row["patch_image_share"] = round(fx.image_share(patches), 3)
    row["patch_position_share"] = round(fx.position_share(patches), 3)
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="dots-cpu-demo", help="a shipped name or a checkpoint path")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--out", default=str(HERE / "results" / "dots_features.json"))
    args = p.parse_args(argv)
    start = time.perf_counter()
    model, cfg = (load_shipped if is_shipped(args.checkpoint) else load_model)(args.checkpoint)
    if cfg.data.name != "dots":
        sys.exit(f"{args.checkpoint} was trained on {cfg.data.name!r}; this script describes 'dots' models")
    size = cfg.model.img_size
    images, _ = dots.render_dots(np.arange(args.images), size, 0, "test")
    saved = dots._NOISE_COUNTER
    try:
        dots._NOISE_COUNTER = saved + 4 * size * size  # the same images, with the per-pixel noise drawn again
        renoised, _ = dots.render_dots(np.arange(args.images), size, 0, "test")
    finally:
        dots._NOISE_COUNTER = saved
    groups = factors(args.images)
    result = {"command": shlex.join(["python", "benchmarks/dots_features.py",
                                     *(argv if argv is not None else sys.argv[1:])]),
              "checkpoint": args.checkpoint, "images": args.images,
              "trained": describe(model, cfg, images, renoised, groups),
              "untrained": describe(_random_init(cfg, cfg.train.seed), cfg, images, renoised, groups)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
