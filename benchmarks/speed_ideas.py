"""Measure each speed idea on its own, in one run, against fp32 eager: which ones are worth being defaults?

    python benchmarks/speed_ideas.py                       # the issue's config: ViT-Tiny/4, 32 px, batch 128
    python benchmarks/speed_ideas.py --set model.depth=6 --rounds 3

Variants (each a full training step: masks, target/context forward, predictor, loss, backward, AdamW, EMA):
  fp32 eager (sdpa, for-loop AdamW) | + bf16 autocast | + math attention | + fused AdamW | + torch.compile
The variants are timed round-robin (`--rounds` passes) so that load from other processes hits all of them alike;
the median step time of each is reported, with the ratio to fp32 eager. Writes benchmarks/results/speed_ideas.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ijepa_viz.bench import matmul_peak
from ijepa_viz.config import get_preset, override
from ijepa_viz.train import Trainer, param_groups

HERE = Path(__file__).resolve().parent
ISSUE_CONFIG = ["model.embed_dim=192", "model.depth=12", "model.num_heads=3", "model.pred_embed_dim=96",
                "model.pred_depth=6", "model.img_size=32", "model.patch_size=4", "data.batch_size=128",
                "mask.min_keep=4"]

VARIANTS = [  # name, precision, attention, fused AdamW, compile
    ("fp32 eager", "fp32", "sdpa", False, False),
    ("bf16 + sdpa", "bf16", "sdpa", False, False),
    ("bf16 + math attn", "bf16", "math", False, False),
    ("bf16 + math + fused AdamW", "bf16", "math", True, False),
    ("bf16 + sdpa + fused AdamW", "bf16", "sdpa", True, False),
    ("fp32 + math + fused AdamW", "fp32", "math", True, False),
    ("bf16 + math + fused + compile", "bf16", "math", True, True),
]


def make(cfg, precision, attention, fused, compile_):
    c = override(cfg, {"train.precision": precision, "train.attention": attention, "train.compile": compile_,
                       "train.steps": 10 ** 6})
    B = c.data.batch_size
    images = torch.randn(B, 3, c.model.img_size, c.model.img_size)
    tr = Trainer(c, loader=[(images, torch.zeros(B, dtype=torch.long))], progress=False)
    if not fused:
        tr.optimizer = torch.optim.AdamW(param_groups(tr.model), lr=c.optim.lr, betas=c.optim.betas,
                                         foreach=False, fused=False)
    return tr, images


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    p.add_argument("--skip-compile", action="store_true")
    args = p.parse_args(argv)
    cfg = override(get_preset("cpu-tiny"), ISSUE_CONFIG + ["data.name=shapes"] + args.overrides)
    variants = [v for v in VARIANTS if not (args.skip_compile and v[4])]
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    built = {}
    for v in variants:
        tr, images = make(cfg, *v[1:])
        for _ in range(3 if v[4] else 2):  # warm-up (compile happens here)
            tr.train_step(images)
        built[v[0]] = (tr, images)
    times = {v[0]: [] for v in variants}
    for _ in range(args.rounds):
        for name, (tr, images) in built.items():
            for _ in range(args.steps):
                t = time.perf_counter()
                tr.train_step(images)
                times[name].append(time.perf_counter() - t)
    # FLOPs of the step (fp32 eager model; the same math in every variant)
    from torch.utils.flop_counter import FlopCounterMode
    tr, images = built[variants[0][0]]
    counter = FlopCounterMode(display=False)
    with counter:
        tr.train_step(images)
    flops = counter.get_total_flops()
    B = cfg.data.batch_size
    base = statistics.median(times[variants[0][0]])
    rows = []
    for name, prec, attn, fused, comp in variants:
        t = statistics.median(times[name])
        rows.append({"variant": name, "precision": prec, "attention": attn, "fused_adamw": fused, "compile": comp,
                     "step_ms": t * 1e3, "imgs_per_s": B / t, "vs_fp32_eager": base / t,
                     "gflops_per_s": flops / t / 1e9, "mfu": flops / t / 1e9 / peaks[prec]})
        r = rows[-1]
        print(f"{name:32s} {r['imgs_per_s']:7.1f} imgs/s  {r['vs_fp32_eager']:5.2f}x  "
              f"{r['gflops_per_s']:6.1f} GFLOP/s  MFU {100 * r['mfu']:5.1f}%")
    out = {"config_overrides": ISSUE_CONFIG + args.overrides, "peaks_gflops": peaks, "flops_per_img": flops / B,
           "rounds": args.rounds, "rows": rows}
    print(f"matmul peaks: fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s; "
          f"{flops / B / 1e9:.3f} GFLOP per image")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "speed_ideas.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
