"""Recipe sweep: many I-JEPA trainings of equal length run side by side, each probed the same way.

    python benchmarks/sweep.py --grid recipe --cifar-gpu --workers 8 --budget 505   # one GPU, ~8.5 minutes
    python benchmarks/sweep.py --grid ablations --epochs 1 --workers 1     # on the CPU: slow, one at a time
    python benchmarks/sweep.py --job lr2e-3 optim.lr=2e-3 --job mse model.loss=mse

Each job is the preset plus its overrides, trained for --epochs epochs on the training split of --data-root
(an ImageFolder tree; default $IJEPA_VIZ_CIFAR10) and then scored on the average-pooled target encoder
(the paper's protocol): a linear probe fitted on --limit-train training images spread evenly over the classes
and scored on the whole test set, kNN (k=20), RankMe, and the linear probe of the context encoder too.

The training split is decoded once, by this process, and handed to --workers worker processes; a small model
leaves a GPU mostly idle, so several runs at once finish sooner than one after another: on one H200, eight
10-epoch cpu-tiny runs side by side took 195-230 s each, at 2,200-2,560 imgs/s per run. Each finished job is
appended to --results (JSON lines) at once, so a sweep cut short keeps every job that ended. --budget bounds the
whole sweep in seconds: no job starts once the time left is less than the slowest finished job took, and a
running job stops at the deadline with complete=false in its row.

--cifar-gpu adds a job that trains the cifar-gpu preset for as many epochs as its share of the budget allows,
measured from its own first steps, with the warmup scaled alike (meant for a GPU).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # ablations.py beside this file
EVAL_RESERVE_S = 45.0  # seconds kept after the training deadline for each job's probes

# (name, overrides), most informative first. Every departure is one override on cpu-tiny (the paper's recipe).
RECIPE = [
    ("base", []),
    ("seed1", ["train.seed=1"]),  # the same recipe from another seed: the noise floor of every comparison
    ("lr2e-3", ["optim.lr=2e-3"]),
    ("num_targets=2", ["mask.num_targets=2"]),  # on 8x8 the 4 targets leave the batch ~13 context patches
    ("num_targets=3", ["mask.num_targets=3"]),
    ("lr5e-4", ["optim.lr=5e-4"]),
    ("ema.99-.999", ["optim.ema_start=0.99", "optim.ema_end=0.999"]),
    ("ema.999-1", ["optim.ema_start=0.999"]),
    ("mse", ["model.loss=mse"]),
    ("crop.5", ["data.crop_scale=[0.5,1.0]"]),
    ("crop.8", ["data.crop_scale=[0.8,1.0]"]),
    ("hflip", ["data.hflip=true"]),
    ("batch64", ["data.batch_size=64"]),
    ("batch256-lr2e-3", ["data.batch_size=256", "optim.lr=2e-3"]),
    ("pred-depth2", ["model.pred_depth=2"]),
    ("pred-depth6", ["model.pred_depth=6"]),
    ("pred-width192", ["model.pred_embed_dim=192"]),
    ("wd.05", ["optim.weight_decay=0.05", "optim.final_weight_decay=0.05"]),
    ("warmup.25", ["optim.warmup_epochs=0.25"]),
    ("targets.1-.15", ["mask.target_scale=[0.1,0.15]"]),
    ("context.6-1", ["mask.context_scale=[0.6,1.0]"]),
    ("targets.2-.3x2", ["mask.target_scale=[0.2,0.3]", "mask.num_targets=2"]),
    ("lr3e-3", ["optim.lr=3e-3"]),
    ("ema.99-1", ["optim.ema_start=0.99"]),
    ("drop-path.1", ["model.drop_path_rate=0.1"]),
]

# Guessed combinations of the single changes above.
COMBOS = [
    ("num_targets=2+targets.1-.15", ["mask.num_targets=2", "mask.target_scale=[0.1,0.15]"]),
    ("num_targets=2+lr2e-3", ["mask.num_targets=2", "optim.lr=2e-3"]),
    ("lr2e-3+ema.99-.999", ["optim.lr=2e-3", "optim.ema_start=0.99", "optim.ema_end=0.999"]),
    ("lr2e-3+batch64", ["optim.lr=2e-3", "data.batch_size=64"]),
    ("crop.5+hflip", ["data.crop_scale=[0.5,1.0]", "data.hflip=true"]),
    ("crop.5+hflip+lr2e-3+ema.99-.999", ["data.crop_scale=[0.5,1.0]", "data.hflip=true", "optim.lr=2e-3",
                                         "optim.ema_start=0.99", "optim.ema_end=0.999"]),
]


# Issue 11's ideas from the small-scale JEPA literature, each one named option on cpu-tiny (all off in the presets
# that follow the paper), most promising first; seed1 is the noise floor.
SMALL_SCALE = [
    ("base", []),
    ("vicreg", ["model.var_weight=1.0", "model.cov_weight=0.04"]),  # C-JEPA's variance + covariance terms
    ("sigreg", ["model.sigreg_weight=0.02"]),  # LeJEPA: pull the pooled features towards an isotropic Gaussian
    ("hflip", ["data.hflip=true"]),
    ("ema-warmup", ["optim.ema_warmup_epochs=0.5", "optim.ema_warmup_start=0.9"]),  # a faster EMA early on
    ("vicreg+hflip+ema-warmup", ["model.var_weight=1.0", "model.cov_weight=0.04", "data.hflip=true",
                                 "optim.ema_warmup_epochs=0.5", "optim.ema_warmup_start=0.9"]),
    ("seed1", ["train.seed=1"]),
    ("drop-path.1", ["model.drop_path_rate=0.1"]),
    ("pred-width192", ["model.pred_embed_dim=192"]),
    ("pred-depth6", ["model.pred_depth=6"]),
    ("target-layers4", ["model.target_layers=4"]),  # data2vec's targets: the mean of the top 4 of the 6 blocks
]


def _ablation_jobs() -> list[tuple[str, list[str]]]:
    """The rows of benchmarks/ablations.py (which runs them one after another) as named jobs, the paper's
    setting once."""
    from ablations import RUNS
    jobs = {"base": []}
    for group, setting, sets in RUNS:
        if sets:
            jobs[f"{group.split('.')[-1]}={setting}"] = list(sets)
    return list(jobs.items())


GRIDS = {"recipe": RECIPE, "combos": COMBOS, "small-scale": SMALL_SCALE, "ablations": _ablation_jobs()}


class Deadline:
    """Training callback: stop the run (with a checkpoint) once time.time() passes `at`."""

    def __init__(self, at: float) -> None:
        self.at = at

    def on_step(self, trainer, metrics) -> None:
        if time.time() > self.at:
            trainer.stop()


def load_split(data_root: str, split: str, num_workers: int):
    """Decode one split of an ImageFolder tree: (uint8 images (N, 3, S, S), int64 labels (N,), class names)."""
    from ijepa_viz.config import DataConfig
    from ijepa_viz.data import UInt8Cache

    cache = UInt8Cache.build(DataConfig(name="imagefolder", root=data_root, num_workers=num_workers), split, 32)
    return cache.images, cache.labels, cache.classes


def _probe_set(images, labels, limit):
    from ijepa_viz.data.cache import _subset
    idx = _subset(len(images), limit)
    return images[idx], labels[idx]


def run_job(job: dict, common: dict) -> dict:
    """Train one job and probe it. Runs in a worker process; returns its results row."""
    import torch

    from ijepa_viz.config import get_preset, override
    from ijepa_viz.data import InMemoryLoader, UInt8Cache, dataset_stats
    from ijepa_viz.evaluate import extract_features, knn_classifier, linear_probe, rankme
    from ijepa_viz.train import Trainer, resolve_device

    torch.set_num_threads(common["threads"])
    t0 = time.time()
    if common["deadline"] - t0 < common["min_start_s"]:
        return {"name": job["name"], "overrides": job["overrides"], "skipped": "too little budget left"}
    data = torch.load(common["data_file"], weights_only=True)
    stats = dataset_stats("imagefolder")
    out_dir = Path(common["out"]) / job["name"]
    base = [f"data.root={common['data_root']}", "data.name=imagefolder", "train.steps=none",
            f"train.out_dir={out_dir}", "train.checkpoint_every=100000", "train.log_every=20",
            f"train.device={common['device']}"]
    if not job.get("fit_budget"):  # a fitted job keeps its preset's epochs as the cap and the warmup's scale
        base.append(f"train.epochs={common['epochs']}")
    cfg = override(get_preset(job.get("preset", common["preset"])), base + job["overrides"])
    device = resolve_device(cfg.train.device)
    train_cache = UInt8Cache(*data["train"])

    def loader(c):
        return InMemoryLoader(train_cache, c.data.batch_size, c.model.img_size, *stats, train=True,
                              crop_scale=c.data.crop_scale, hflip=c.data.hflip, seed=c.train.seed,
                              device=device if device.type == "cuda" else None)

    train_deadline = common["deadline"] - EVAL_RESERVE_S
    if job.get("fit_budget"):  # as many epochs as the time left allows, measured on this job's first steps
        probe = Trainer(override(cfg, ["train.steps=60", f"train.out_dir={out_dir}_timing"]), loader=loader(cfg),
                        progress=False)
        res = probe.fit()
        rate = sorted(h["imgs_per_s"] for h in res.history[1:])[len(res.history[1:]) // 2]
        n_train = len(train_cache)
        fit = int(0.85 * (train_deadline - time.time()) * rate / n_train)
        epochs = max(1, min(cfg.train.epochs, fit))
        warmup = cfg.optim.warmup_epochs * epochs / cfg.train.epochs
        cfg = override(cfg, [f"train.epochs={epochs}", f"optim.warmup_epochs={warmup:.3g}"])
        print(f"[{job['name']}] {rate:.0f} imgs/s while timing: {epochs} epochs, warmup {warmup:.3g}", flush=True)

    trainer = Trainer(cfg, loader=loader(cfg), progress=False, callbacks=[Deadline(train_deadline)])
    result = trainer.fit()
    rates = sorted(h["imgs_per_s"] for h in result.history[1:]) or [float("nan")]
    row = {"name": job["name"], "overrides": job["overrides"], "preset": job.get("preset", common["preset"]),
           "epochs": cfg.train.epochs, "steps": result.step, "total_steps": trainer.total_steps,
           "complete": result.step >= trainer.total_steps, "train_seconds": result.wall_time,
           "imgs_per_s_median": rates[len(rates) // 2], "final_loss": result.history[-1]["loss"],
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}

    model = result.model
    mean, std = stats
    tr = _probe_set(*data["train"][:2], common["limit_train"])
    te = data["test"][:2]

    def feats(encoder, images, labels, n_last=1):
        batches = InMemoryLoader(UInt8Cache(images, labels, data["train"][2]), 512, cfg.model.img_size, mean, std,
                                 train=False)
        return extract_features(encoder, batches, device=device, progress=False, n_last=n_last)

    target = model.target_network if model.target_network is not None else model.encoder
    ftr, fte = feats(target, *tr), feats(target, *te)
    ctr, cte = feats(model.encoder, *tr), feats(model.encoder, *te)
    n4 = min(4, cfg.model.depth)  # the outputs of the last 4 blocks side by side (DINO's linear-probe variant)
    f4tr, f4te = feats(target, *tr, n_last=n4), feats(target, *te, n_last=n4)
    row.update(linear_last4=linear_probe(*f4tr, *f4te)["accuracy"])
    row.update(linear=linear_probe(*ftr, *fte)["accuracy"],
               knn=knn_classifier(*ftr, *fte, num_classes=len(data["train"][2])),
               rankme=rankme(fte[0]), context_linear=linear_probe(*ctr, *cte)["accuracy"],
               n_probe_train=len(ftr[1]), seconds=time.time() - t0)
    return row


def _worker_init(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", action="append", choices=sorted(GRIDS), default=[],
                   help="named job lists to run, in order (repeatable)")
    p.add_argument("--job", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                   help="one extra job: a name and its overrides")
    p.add_argument("--only", nargs="+", default=None, help="run only the named jobs of the grids")
    p.add_argument("--cifar-gpu", action="store_true", help="also train the cifar-gpu preset (fit to the budget)")
    p.add_argument("--preset", default="cpu-tiny")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--data-root", default=os.environ.get("IJEPA_VIZ_CIFAR10"),
                   help="CIFAR-10 as an ImageFolder tree (train/ and test/); default: $IJEPA_VIZ_CIFAR10")
    p.add_argument("--limit-train", type=int, default=10000, help="training images for the probes")
    p.add_argument("--workers", type=int, default=1, help="jobs at once")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per job (default: the cores shared out among the workers)")
    p.add_argument("--budget", type=float, default=float("inf"), help="seconds for the whole sweep")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--results", default=str(HERE / "results" / "sweep.jsonl"))
    p.add_argument("--set", dest="overrides", action="append", default=[], help="applied to every job")
    args = p.parse_args(argv)
    if not args.data_root or not (Path(args.data_root) / "train").is_dir():
        p.error(f"--data-root {args.data_root!r}: give CIFAR-10 as an ImageFolder tree (a folder with train/ and "
                "test/), or set IJEPA_VIZ_CIFAR10 to one")

    import torch

    start = time.time()
    deadline = start + args.budget
    jobs = []
    if args.cifar_gpu:
        jobs.append({"name": "cifar-gpu", "preset": "cifar-gpu", "overrides": [], "fit_budget": True})
    seen = set()
    for grid in args.grid:
        for name, sets in GRIDS[grid]:
            if name not in seen and (args.only is None or name in args.only):
                seen.add(name)
                jobs.append({"name": name, "overrides": list(sets)})
    for name, *sets in args.job:
        jobs.append({"name": name, "overrides": sets})
    if not jobs:
        p.error("nothing to run: give --grid, --job or --cifar-gpu")
    for j in jobs:
        j["overrides"] = list(args.overrides) + j["overrides"]
        if j.get("preset") == "cifar-gpu":  # its own epochs (fitted), not --epochs
            j["overrides"] = [o for o in j["overrides"] if not o.startswith("train.epochs=")]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_file = out / "data.pt"
    t = time.time()
    cores = os.cpu_count() or 1
    data = {s: load_split(args.data_root, s, num_workers=cores) for s in ("train", "test")}
    torch.save(data, data_file)
    print(f"decoded {len(data['train'][0])} + {len(data['test'][0])} images in {time.time() - t:.1f} s", flush=True)

    threads = args.threads or max(1, cores // max(1, args.workers))
    common = {"data_file": str(data_file), "data_root": args.data_root, "epochs": args.epochs, "out": str(out),
              "preset": args.preset, "limit_train": args.limit_train, "device": args.device, "threads": threads,
              "deadline": deadline, "min_start_s": 0.0}
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    rows, durations = [], []
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx, initializer=_worker_init,
                                initargs=(threads,)) as pool:
        pending, queue = {}, list(jobs)
        while queue or pending:
            while queue and len(pending) < args.workers:
                job = queue.pop(0)
                # no job starts unless the slowest finished one would still fit
                common["min_start_s"] = max(durations, default=0.0) if math.isfinite(deadline) else 0.0
                if time.time() + common["min_start_s"] > deadline:
                    print(f"[{job['name']}] skipped: too little budget left", flush=True)
                    continue
                pending[pool.submit(run_job, job, dict(common))] = job
            if not pending:
                break
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                job = pending.pop(fut)
                try:
                    row = fut.result()
                except Exception as e:  # noqa: BLE001 - one failed job must not lose the others
                    row = {"name": job["name"], "overrides": job["overrides"], "error": f"{type(e).__name__}: {e}"}
                if "seconds" in row and job.get("preset") != "cifar-gpu":
                    durations.append(row["seconds"])
                row["sweep_started"] = start
                rows.append(row)
                with open(results_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(_line(row), flush=True)
    print(f"\n{len(rows)} jobs in {time.time() - start:.0f} s; best first:")
    for row in sorted(rows, key=lambda r: -r.get("linear", -1)):
        print(_line(row))
    return rows


def _line(row: dict) -> str:
    if "linear" not in row:
        return f"{row['name']:34s} {row.get('error') or row.get('skipped')}"
    flag = "" if row["complete"] else f"  (stopped at step {row['steps']} of {row['total_steps']})"
    return (f"{row['name']:34s} linear {100 * row['linear']:5.1f}%  kNN {100 * row['knn']:5.1f}%  "
            f"context {100 * row['context_linear']:5.1f}%  last-4 {100 * row.get('linear_last4', math.nan):5.1f}%  "
            f"RankMe {row['rankme']:6.1f}  loss {row['final_loss']:.4f}  "
            f"{row['epochs']} ep, {row['imgs_per_s_median']:.0f} imgs/s, {row['seconds']:.0f} s{flag}")


if __name__ == "__main__":
    main()
