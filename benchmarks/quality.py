"""Learning-quality benchmark: train a preset on real CIFAR-10 and probe it after every epoch.

    IJEPA_VIZ_CIFAR10=path/to/cifar10 python benchmarks/quality.py   # cpu-tiny, 10 epochs
    python benchmarks/quality.py --epochs 2 --tag try --set optim.lr=2e-3

It trains with a checkpoint at the end of each epoch, then, for every epoch checkpoint, extracts the
average-pooled target-encoder features and reports the linear-probe and kNN test accuracy and the collapse
metrics on `--limit-train` training images (spread evenly over the classes; the test set is always complete).
The last epoch is also evaluated with both baselines (raw pixels and a randomly initialised encoder of the same
architecture), run the same way, and with the probes on the concatenated last 4 blocks ("final_last4").
Results go to benchmarks/results/quality_<tag>.json; `--last4-only` adds the last-4 probe to an existing file
from the checkpoints in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ijepa_viz.config import get_preset, override
from ijepa_viz.evaluate import (collapse_metrics, evaluate, extract_features, format_table, features_for,
                                knn_classifier, linear_probe)
from ijepa_viz.train import Trainer, load_model

HERE = Path(__file__).resolve().parent


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-tiny")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--data-root", default=os.environ.get("IJEPA_VIZ_CIFAR10"),
                   help="CIFAR-10 as an ImageFolder tree (train/ and test/); default: $IJEPA_VIZ_CIFAR10")
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--tag", default=None, help="results file suffix (default: the preset name)")
    p.add_argument("--limit-train", type=int, default=10000, help="training images for the per-epoch probes")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--skip-train", action="store_true", help="only evaluate the checkpoints already in --out")
    p.add_argument("--last4-only", action="store_true",
                   help="only add the last-4-blocks probe of the final checkpoint to an existing results file")
    args = p.parse_args(argv)
    if not args.data_root or not (Path(args.data_root) / "train").is_dir():
        p.error(f"--data-root {args.data_root!r}: give CIFAR-10 as an ImageFolder tree (a folder with train/ and "
                "test/), or set IJEPA_VIZ_CIFAR10 to one")
    tag = args.tag or args.preset
    out = Path(args.out) / tag
    cfg = override(get_preset(args.preset),
                   ["data.name=imagefolder", f"data.root={args.data_root}", f"train.epochs={args.epochs}",
                    "train.steps=none", f"train.out_dir={out}", "train.keep_epoch_checkpoints=true",
                    "train.checkpoint_every=100000"] + args.overrides)

    dest = HERE / "results" / f"quality_{tag}.json"
    final_ckpt = out / f"checkpoint_epoch{args.epochs:03d}.pt"
    if args.last4_only:
        report = json.loads(dest.read_text())
        report["final_last4"] = last4_probe(final_ckpt, cfg, args.limit_train)
        dest.write_text(json.dumps(report, indent=2))
        print(json.dumps(report["final_last4"]), f"\nadded to {dest}")
        return report

    t0 = time.perf_counter()
    train_info = {}
    if not args.skip_train:
        result = Trainer(cfg, resume=True).fit()
        rates = [h["imgs_per_s"] for h in result.history[1:]]
        train_info = {"steps": result.step, "train_seconds": result.wall_time,
                      "imgs_per_s_median": sorted(rates)[len(rates) // 2] if rates else None}
        print(f"trained {result.step} steps in {result.wall_time:.0f} s")

    epochs = []
    for e in range(1, args.epochs + 1):
        ckpt = out / f"checkpoint_epoch{e:03d}.pt"
        if not ckpt.exists():
            continue
        model, _ = load_model(ckpt)
        train = features_for(model, cfg, "train", limit=args.limit_train, progress=False)
        test = features_for(model, cfg, "test", progress=False)
        patches, _ = extract_features(model.target_network, [(x, y) for x, y in _first(cfg, 256)], pool="none",
                                      progress=False)
        row = {"epoch": e, "n_train": len(train[1]),
               "linear": linear_probe(*train, *test)["accuracy"],
               "knn": knn_classifier(*train, *test, num_classes=10),
               **collapse_metrics(test[0], patches)}
        epochs.append(row)
        print(json.dumps(row))
    final = evaluate(final_ckpt, cfg=cfg, limit_train=args.limit_train, progress=False)
    print(format_table(final))
    report = {"preset": args.preset, "overrides": args.overrides, "config": cfg.to_dict(), **train_info,
              "epochs": epochs, "final": final, "final_last4": last4_probe(final_ckpt, cfg, args.limit_train),
              "total_seconds": time.perf_counter() - t0}
    print("last 4 blocks:", json.dumps(report["final_last4"]))
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(report, indent=2))
    print(f"wrote {dest}")
    return report


def last4_probe(ckpt: Path, cfg, limit_train: int) -> dict:
    """The probes on the concatenated outputs of the last 4 blocks (each through the final norm), beside the
    paper's last-block probe: a common variant (DINO's linear probe of ViT-S uses it)."""
    model, _ = load_model(ckpt)
    train = features_for(model, cfg, "train", n_last=4, limit=limit_train, progress=False)
    test = features_for(model, cfg, "test", n_last=4, progress=False)
    return {"checkpoint": ckpt.name, "n_train": len(train[1]), "linear": linear_probe(*train, *test)["accuracy"],
            "knn": knn_classifier(*train, *test, num_classes=10)}


def _first(cfg, n):
    """The first n test images as one eval batch."""
    import torch
    from ijepa_viz.data import dataset_stats, load_uint8
    images, labels = load_uint8(cfg.data, "test", cfg.model.img_size, limit=n)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in dataset_stats(cfg.data.name))
    yield (images.float() / 255 - mean) / std, labels


if __name__ == "__main__":
    main()
