"""Package a training checkpoint as shipped weights: ijepa_viz/weights/NAME.safetensors + NAME.json (its card).

The weights are rounded to float16 first and the evaluation runs on what ships: the target encoder's linear
probe and kNN beside the untrained encoder and raw pixels (`ijepa_viz.evaluate.evaluate`), on the data the
checkpoint was trained on unless --data/--data-root say otherwise.

    python benchmarks/ship_weights.py --checkpoint runs/ship-dots/checkpoint.pt --name dots-cpu-demo \
        --description "..." --command "ijepa-viz train ..." [--limit-train 10000] [--limit-test 2000]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from ijepa_viz.config import override
from ijepa_viz.evaluate import evaluate, format_table
from ijepa_viz.pretrained import WEIGHTS_DIR, round_trip, save_shipped
from ijepa_viz.train import load_model
from ijepa_viz.viz.verdicts import probe_verdict


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--description", required=True)
    ap.add_argument("--command", required=True, help="the exact `ijepa-viz train` command(s) that made it")
    ap.add_argument("--commit", default=None, help="the commit it was trained at (default: HEAD)")
    ap.add_argument("--train-seconds", type=float, default=None,
                    help="wall time of the training (default: from the run's metrics.jsonl)")
    ap.add_argument("--data", default=None)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--folder", default=str(WEIGHTS_DIR))
    ap.add_argument("--store-set", action="append", default=[], metavar="KEY=VALUE",
                    help="change the config that ships (e.g. data.root=data/cifar10 instead of a local path)")
    args = ap.parse_args()

    ckpt = Path(args.checkpoint)
    model, cfg = load_model(ckpt)
    round_trip(model)  # evaluate exactly what ships: float16 weights
    sets = ([f"data.name={args.data}"] if args.data else []) + ([f"data.root={args.data_root}"] if args.data_root else [])
    eval_cfg = override(cfg, sets)
    start = time.perf_counter()
    result = evaluate(model=model, cfg=eval_cfg, limit_train=args.limit_train, limit_test=args.limit_test,
                      progress=False)
    eval_s = time.perf_counter() - start
    print(format_table(result))
    rows = _metrics(ckpt.parent)
    steps = int(torch.load(ckpt, map_location="cpu", weights_only=True)["step"])
    steps_per_epoch = None
    for r in rows:
        if r.get("epoch", 0) >= 1:
            break
        steps_per_epoch = r["step"]
    train_s = args.train_seconds
    if train_s is None and rows:  # sum of the logged intervals: steps / imgs_per_s per row
        prev, train_s = 0, 0.0
        for r in rows:
            train_s += (r["step"] - prev) * cfg.data.batch_size / max(r.get("imgs_per_s", 1e-9), 1e-9)
            prev = r["step"]
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip()
    card = {
        "description": args.description,
        "command": args.command,
        "commit": commit,
        "steps": steps,
        "epochs": round(steps * cfg.data.batch_size / _train_size(cfg), 2),
        "train_seconds": None if train_s is None else round(train_s, 1),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "stored_as": "float16 (loaded as float32)",
        "eval": {
            "data": result["data"], "n_train": result["n_train"], "n_test": result["n_test"],
            "rows": [{k: r[k] for k in ("name", "linear", "knn", "rankme") if k in r} for r in result["rows"]],
            "summary": probe_verdict(result),
            "seconds": round(eval_s, 1),
        },
    }
    path = save_shipped(model, override(cfg, args.store_set), args.name, card, folder=Path(args.folder))
    print(card["eval"]["summary"])
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) and {path.with_suffix('.json')}")


def _train_size(cfg) -> int:
    from ijepa_viz.data import UInt8Cache

    if cfg.data.name == "shapes":
        return cfg.data.shapes_train_size
    return len(UInt8Cache.build(cfg.data, "train", cfg.model.img_size))


if __name__ == "__main__":
    main()
