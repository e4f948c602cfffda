"""The paper's ablations at small scale: short runs of equal budget on real CIFAR-10.

    python benchmarks/ablations.py --epochs 1 --set optim.warmup_epochs=0.1   # the README's table (~35 CPU min)
    python benchmarks/ablations.py --epochs 2 --seeds 0 1

Each row changes one thing from the preset (paper Tables 6-7 and Sec. 7):
  mask.strategy = multiblock | random | block | quadrant;  model.target = representation | pixels;
  train.ema = true | false;  mask.num_targets = 4 | 1.
Every run trains for the same number of steps from the same seed and is scored with the same linear probe and
kNN on the average-pooled target encoder (the context encoder for the no-EMA run, which has no other).
Writes benchmarks/results/ablations.json and ablations.png (a bar chart, the paper's numbers beside).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ijepa_viz.config import get_preset, override  # noqa: E402
from ijepa_viz.evaluate import features_for, knn_classifier, linear_probe, rankme  # noqa: E402
from ijepa_viz.train import Trainer  # noqa: E402

HERE = Path(__file__).resolve().parent

# (group, setting, overrides). The first row of each group is the paper's choice.
RUNS = [
    ("mask.strategy", "multiblock", []),
    ("mask.strategy", "block", ["mask.strategy=block"]),
    ("mask.strategy", "random", ["mask.strategy=random"]),
    ("mask.strategy", "quadrant", ["mask.strategy=quadrant"]),
    ("model.target", "representation", []),
    ("model.target", "pixels", ["model.target=pixels"]),
    ("train.ema", "on", []),
    ("train.ema", "off", ["train.ema=false"]),
    ("mask.num_targets", "4", []),
    ("mask.num_targets", "1", ["mask.num_targets=1"]),
]

# Paper numbers for context: its ablation tables (ImageNet-1k pretraining, linear probe on 1% of the labels,
# ViT-B/16 or ViT-L/16 depending on the table). Far larger runs than these; the ordering is what compares.
PAPER = {("mask.strategy", "multiblock"): 54.2, ("mask.strategy", "block"): 20.2,
         ("mask.strategy", "random"): 17.6, ("mask.strategy", "quadrant"): 15.5,
         ("model.target", "representation"): 66.9, ("model.target", "pixels"): 40.7,
         ("mask.num_targets", "4"): 54.2, ("mask.num_targets", "1"): 9.0}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-tiny")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--data-root", default=os.environ.get("IJEPA_VIZ_CIFAR10"),
                   help="CIFAR-10 as an ImageFolder tree (train/ and test/); default: $IJEPA_VIZ_CIFAR10")
    p.add_argument("--limit-train", type=int, default=10000, help="training images for the probes")
    p.add_argument("--out", default="runs/ablations")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    if not args.data_root or not (Path(args.data_root) / "train").is_dir():
        p.error(f"--data-root {args.data_root!r}: give CIFAR-10 as an ImageFolder tree (a folder with train/ and "
                "test/), or set IJEPA_VIZ_CIFAR10 to one")

    base = override(get_preset(args.preset),
                    ["data.name=imagefolder", f"data.root={args.data_root}", f"train.epochs={args.epochs}",
                     "train.steps=none", "train.checkpoint_every=100000"] + args.overrides)
    cache: dict[tuple, dict] = {}  # identical configurations (the paper's default) run once per seed
    rows = []
    for group, setting, sets in RUNS:
        accs = []
        for seed in args.seeds:
            key = (tuple(sets), seed)
            if key not in cache:
                cfg = override(base, sets + [f"train.seed={seed}",
                                             f"train.out_dir={args.out}/{'_'.join(sets) or 'paper'}_s{seed}"])
                t = time.perf_counter()
                result = Trainer(cfg, progress=False).fit()
                train = features_for(result.model, cfg, "train", limit=args.limit_train, progress=False)
                test = features_for(result.model, cfg, "test", progress=False)
                cache[key] = {"linear": linear_probe(*train, *test, seed=seed)["accuracy"],
                              "knn": knn_classifier(*train, *test, num_classes=10),
                              "rankme": rankme(test[0]), "seconds": time.perf_counter() - t,
                              "final_loss": result.history[-1]["loss"]}
                print(group, setting, seed, json.dumps(cache[key]))
            accs.append(cache[key])
        n = len(accs)
        rows.append({"group": group, "setting": setting, "seeds": n,
                     **{k: sum(a[k] for a in accs) / n for k in ("linear", "knn", "rankme", "final_loss")},
                     "paper": PAPER.get((group, setting))})
    report = {"preset": args.preset, "epochs": args.epochs, "seeds": args.seeds, "overrides": args.overrides,
              "rows": rows}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "ablations.json").write_text(json.dumps(report, indent=2))
    _plot(rows, HERE / "results" / "ablations.png")
    for r in rows:
        paper = f"{r['paper']:.1f}" if r["paper"] is not None else "-"
        print(f"{r['group']:17s} {r['setting']:15s} linear {100 * r['linear']:5.1f}%  kNN {100 * r['knn']:5.1f}%  "
              f"RankMe {r['rankme']:6.1f}  paper {paper}")
    return report


def _plot(rows, path: Path) -> None:
    groups = list(dict.fromkeys(r["group"] for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.5))
    for ax, g in zip(axes, groups):
        rs = [r for r in rows if r["group"] == g]
        x = range(len(rs))
        ax.bar([i - 0.2 for i in x], [100 * r["linear"] for r in rs], width=0.4, label="ours, CIFAR-10 linear")
        ax.bar([i + 0.2 for i in x], [r["paper"] or 0 for r in rs], width=0.4, color="lightgray",
               label="paper, IN-1k 1% linear")
        ax.set_xticks(list(x), [r["setting"] for r in rs])
        ax.set_title(g)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
