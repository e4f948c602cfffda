"""How long `ijepa-viz eval` takes, phase by phase, and the torch linear probe against scikit-learn's.

    python benchmarks/eval_speed.py --checkpoint /tmp/x/checkpoint.pt          # every case
    python benchmarks/eval_speed.py --checkpoint /tmp/x/checkpoint.pt --cases demo --sklearn none

Cases (the issue's goals on 2 CPU cores in brackets):
  cifar10      real CIFAR-10 (`--cifar-root`, ImageFolder layout), 50,000 train / 10,000 test, `evaluate`'s
               defaults [<= 60 s];
  imagenet200  a stand-in for a 200-class ImageNet subset: 20,000 train / 10,000 test real CIFAR-10 images in
               200 classes, each CIFAR class split into 20 groups by k-means on 4x4 colour thumbnails (fitted
               on that class's training images; test images join the nearest group of their own class). The
               folders hold symlinks to the CIFAR-10 files, under `--scratch` [<= 120 s];
  demo         the built-in dots (what `make demo` trains on), 10,000 train / 2,000 test at 32 px, with the
               checkpoint's model [<= 30 s];
  demo-cpu-demo  the same images with a random-init `cpu-demo` model (what `make demo` now trains).

Each case runs `evaluate` end to end (decoded images are forgotten first, so decoding is timed), with its
per-phase timings. Then, with `--sklearn` (default: all rows), the features `evaluate` used for each row are
probed again by `linear_probe(backend='sklearn')` (scikit-learn's lbfgs, max_iter=300: the old path), in a
child process with a time limit (`--sklearn-timeout`), to give both accuracies and the time ratio, measured
in the same run (BLAS on `--sklearn-threads`, default 1: on a busy machine two threads made it far
slower); encoder rows (<= 1,024 dims) also with max_iter=10000, since the cap of 300 stops
scikit-learn short of the minimum on weak features (large C). Torch and BLAS use `--threads` threads
(default: all cores). The load average before and after each case is recorded: on a shared machine it says
how much of the CPU the run had. Results: benchmarks/results/eval_speed.json (one entry per case;
re-running a case replaces its entry).
"""
from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
E = importlib.import_module("ijepa_viz.evaluate")  # the module (ijepa_viz.evaluate is also a function name)
CASES = ("cifar10", "imagenet200", "demo", "demo-cpu-demo")
GOALS = {"cifar10": 60, "imagenet200": 120, "demo": 30, "demo-cpu-demo": 30}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def grouped_cifar(cifar_root: Path, out: Path, groups: int = 20, train_per_class: int = 2000) -> Path:
    """The 200-class stand-in (see the module docstring): out/{train,test}/<class>_gNN/<file> symlinks."""
    from PIL import Image

    if (out / "DONE").exists():
        return out
    rng = torch.Generator().manual_seed(0)
    classes = sorted(p.name for p in (cifar_root / "train").iterdir() if p.is_dir())

    def thumbs(files: list[Path]) -> torch.Tensor:  # (n, 48): 4x4 mean colours, in [0, 1]
        arr = np.stack([np.asarray(Image.open(f).convert("RGB").resize((4, 4), Image.BOX)) for f in files])
        return torch.from_numpy(arr).float().flatten(1) / 255

    for c in classes:
        train = sorted((cifar_root / "train" / c).iterdir())
        train = [train[i] for i in np.linspace(0, len(train) - 1, train_per_class).round().astype(int)]
        test = sorted((cifar_root / "test" / c).iterdir())
        x, xt = thumbs(train), thumbs(test)
        centres = x[torch.randperm(len(x), generator=rng)[:groups]].clone()
        for _ in range(25):  # k-means
            assign = torch.cdist(x, centres).argmin(dim=1)
            for g in range(groups):
                if (assign == g).any():
                    centres[g] = x[assign == g].mean(dim=0)
        centres = centres[torch.cdist(x, centres).argmin(dim=1).unique()]  # groups that kept training images
        for split, files, feats in (("train", train, x), ("test", test, xt)):
            assign = torch.cdist(feats, centres).argmin(dim=1)
            for f, g in zip(files, assign.tolist()):
                d = out / split / f"{c}_g{g:02d}"
                d.mkdir(parents=True, exist_ok=True)
                link = d / f.name
                if not link.exists():
                    link.symlink_to(f.resolve())
    (out / "DONE").write_text("ok\n")
    return out


def _sklearn_child(queue, train, test, seed, max_iter, threads) -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)  # scikit-learn's BLAS
    start = time.perf_counter()
    res = E.linear_probe(*train, *test, seed=seed, backend="sklearn", max_iter=max_iter)
    queue.put({"accuracy": res["accuracy"], "C": res["C"], "val_accuracy": res["val_accuracy"],
               "seconds": time.perf_counter() - start})


def sklearn_probe(train: tuple, test: tuple, seed: int, timeout: float, max_iter: int = 300,
                  threads: int = 1) -> dict:
    """`linear_probe(backend='sklearn', max_iter=max_iter)` in a forked child (the features are shared, not
    copied) with BLAS on `threads` threads, killed after `timeout` seconds."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    start = time.perf_counter()
    proc = ctx.Process(target=_sklearn_child, args=(queue, train, test, seed, max_iter, threads))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join()
        return {"timed_out_after_s": round(time.perf_counter() - start, 1)}
    return queue.get() if not queue.empty() else {"error": f"exit code {proc.exitcode}"}


def run_case(case: str, args) -> dict:
    from ijepa_viz.config import get_preset, override
    from ijepa_viz.data import UInt8Cache
    from ijepa_viz.model import IJEPA
    from ijepa_viz.pretrained import is_shipped, load_shipped
    from ijepa_viz.train import load_model

    model, cfg = load_shipped(args.checkpoint) if is_shipped(args.checkpoint) else load_model(args.checkpoint)
    checkpoint = args.checkpoint
    if case == "cifar10":
        cfg = override(cfg, ["data.name=imagefolder", f"data.root={args.cifar_root}"])
        what = "real CIFAR-10, 50,000 train / 10,000 test, 10 classes, 32 px"
    elif case == "imagenet200":
        root = grouped_cifar(Path(args.cifar_root), Path(args.scratch) / "cifar10_grouped200")
        cfg = override(cfg, ["data.name=imagefolder", f"data.root={root}"])
        what = ("200 classes (CIFAR-10 classes x 20 k-means groups of 4x4 colour thumbnails), 20,000 train / "
                "10,000 test real CIFAR-10 images, 32 px")
    elif case == "demo":
        cfg = override(cfg, ["data.name=dots", "data.shapes_train_size=10000", "data.shapes_test_size=2000"])
        what = "built-in dots, 10,000 train / 2,000 test, 10 classes, 32 px, the checkpoint's model"
    else:
        cfg = override(get_preset("cpu-demo"), ["data.name=dots", "data.shapes_train_size=10000",
                                                "data.shapes_test_size=2000"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            model = IJEPA(cfg.model)
        checkpoint = None
        what = "built-in dots, 10,000 train / 2,000 test, 32 px, a random-init cpu-demo model (4 blocks, 128 wide)"
    m = cfg.model
    print(f"[{case}] {what}; model {m.depth} blocks x {m.embed_dim} wide, patch {m.patch_size}", flush=True)

    captured = {}
    real_run_probes = E._run_probes

    def spy(probes, train, test, seed, num_classes, name, *rest, **kw):  # keeps each row's features
        captured[name] = (train, test, seed)
        return real_run_probes(probes, train, test, seed, num_classes, name, *rest, **kw)

    UInt8Cache.clear_memo()  # time the decoding too
    E._run_probes = spy
    load_before = _load()
    try:
        result = E.evaluate(checkpoint, cfg=cfg, model=model, progress=False)
    finally:
        E._run_probes = real_run_probes
    print(E.format_table(result))
    print(E.format_timings(result), flush=True)

    rows = []
    for row in result["rows"]:
        name = row["name"]
        entry = {"name": name, "linear": row.get("linear"), "linear_C": row.get("linear_C"), "knn": row.get("knn"),
                 "torch_linear_s": result["timings"].get(f"linear: {name}"),
                 "dims": int(captured[name][0][0].shape[1])}
        if args.sklearn == "all" or (args.sklearn == "encoders" and name != "raw pixels"):
            train, test, seed = captured[name]
            if train[0].dtype == torch.uint8:  # the old path's raw pixels: float in [0, 1]
                train, test = (train[0].float() / 255, train[1]), (test[0].float() / 255, test[1])
            print(f"  scikit-learn probe of {name} ...", flush=True)
            sk = sklearn_probe(train, test, seed, args.sklearn_timeout, threads=args.sklearn_threads)
            entry["sklearn"] = sk
            if "seconds" in sk:
                entry["sklearn_over_torch_time"] = round(sk["seconds"] / entry["torch_linear_s"], 1)
                entry["accuracy_difference_points"] = round(100 * (row["linear"] - sk["accuracy"]), 2)
            print(f"  {name}: torch {100 * row['linear']:.2f}% in {entry['torch_linear_s']:.1f} s, "
                  f"scikit-learn {sk}", flush=True)
            if entry["dims"] <= 1024 and args.converged:  # scikit-learn to convergence too (its cap can bind)
                converged = sklearn_probe(train, test, seed, args.sklearn_timeout, 10000, args.sklearn_threads)
                entry["sklearn_max_iter_10000"] = converged
                if "accuracy" in converged:
                    entry["accuracy_difference_points_vs_converged"] = round(
                        100 * (row["linear"] - converged["accuracy"]), 2)
                print(f"  {name}: scikit-learn with max_iter=10000 {converged}", flush=True)
        rows.append(entry)
    return {"case": case, "what": what, "goal_s": GOALS[case], "total_s": round(result["seconds"], 2),
            "timings_s": {k: round(v, 3) for k, v in result["timings"].items()}, "rows": rows,
            "n_train": result["n_train"], "n_test": result["n_test"],
            "model": {"depth": m.depth, "embed_dim": m.embed_dim, "patch_size": m.patch_size, "img_size": m.img_size},
            "checkpoint": str(args.checkpoint) if checkpoint else "random init", "load_avg_before": load_before,
            "sklearn_threads": args.sklearn_threads,
            "load_avg_after": _load()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a training checkpoint, or a shipped model's name (its model is evaluated)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    p.add_argument("--cifar-root", default=str(HERE.parent.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--scratch", default="/tmp/ijepa_eval_speed", help="where the 200-class folders are made")
    p.add_argument("--sklearn", default="all", choices=("all", "encoders", "none"),
                   help="rows whose features are also probed by scikit-learn (the old path)")
    p.add_argument("--sklearn-timeout", type=float, default=1800.0, help="seconds per scikit-learn probe")
    p.add_argument("--sklearn-threads", type=int, default=1,
                   help="BLAS threads for scikit-learn (1: its fastest setting on a busy 2-core machine)")
    p.add_argument("--no-converged", dest="converged", action="store_false",
                   help="skip the max_iter=10000 scikit-learn runs of the encoder rows")
    p.add_argument("--threads", type=int, default=None, help="torch and BLAS threads (default: all cores)")
    p.add_argument("--out", default=str(HERE / "results" / "eval_speed.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        p.error(f"unknown cases {bad}; choose from {', '.join(CASES)}")

    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {}
    report.update({"machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                               "torch": torch.__version__, "python": platform.python_version()},
                   "command": " ".join([Path(sys.executable).name, *sys.argv])})
    results = {r["case"]: r for r in report.get("cases", [])}
    for case in cases:
        res = run_case(case, args)
        res["torch_threads"] = torch.get_num_threads()
        results[case] = res
        report["cases"] = ([results[c] for c in CASES if c in results]  # then entries renamed by hand, kept
                           + [r for name, r in results.items() if name not in CASES])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"[{case}] total {res['total_s']:.1f} s (goal {res['goal_s']} s); wrote {out}", flush=True)
    return report


if __name__ == "__main__":
    main()
