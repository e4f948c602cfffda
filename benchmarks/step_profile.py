"""Profile one training step with torch.profiler: where does the time go, and how many ops does a step run?

    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --json benchmarks/results/step_profile.json
    python benchmarks/step_profile.py --variant previous --steps 3    # any variant of benchmarks/step_ab.py

The step is the trainer's own (`Trainer.train_step`'s stages, called one by one here so that each gets a
`record_function` label): masks, target forward, context forward, predictor, loss, backward, AdamW, EMA.
Prints the time per stage, the number of ops per step and the top ops by self CPU time; `--json` writes them.
The model and trainer are benchmarks/step_ab.py's variants at the issue's configuration: ViT-Tiny/4 at 32 px,
12 blocks, a 96-wide 6-block predictor, batch 128, the paper's masks with min_keep=4 (preset cpu-tiny-paper with
model.depth=12 and model.pred_depth=6). The stages are called eagerly, so the compile variants do not apply here.
Stage times include the profiler's own overhead; on one thread the op shares are the steadiest figures.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from step_ab import VARIANTS  # this folder (python benchmarks/step_profile.py puts it on sys.path)

from ijepa_viz.allocator import tune_cpu_allocator
from ijepa_viz.schedules import schedule
from ijepa_viz.train import Trainer
STAGES = ["masks", "target forward", "context forward", "predictor", "loss", "backward", "optimizer", "ema"]


def labelled_step(tr: Trainer, images: torch.Tensor) -> None:
    """`Trainer.train_step`, stage by stage, each under a profiler label (same calls, same order)."""
    model = tr.model
    lr, wd, momentum = schedule(tr.step, tr.total_steps, tr.warmup_steps, tr.cfg.optim,
                                steps_per_epoch=tr.steps_per_epoch)
    for group in tr.optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_wd"):
            group["weight_decay"] = wd
    with record_function("masks"):
        masks = tr._batch_masks(images.shape[0])
    with torch.autocast(tr.device.type, dtype=tr.amp_dtype or torch.float32, enabled=tr.amp_dtype is not None):
        with record_function("target forward"):
            target = model.forward_target(images, masks.targets)
        with record_function("context forward"):
            z = model.forward_context(images, masks.context)
        with record_function("predictor"):
            pred = model.predict(z, masks.context, masks.targets)
        with record_function("loss"):
            loss = model.loss(pred, target)
    loss.item()
    with record_function("backward"):
        tr.optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with record_function("optimizer"):
        tr.optimizer.step()
    with record_function("ema"):
        model.update_target(momentum)
    tr.step += 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="default", help=f"one of benchmarks/step_ab.py's: {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after 3 warm-up steps)")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.variant.startswith("compile"):
        p.error("the stages are called eagerly: profile a compiled step with torch.profiler around train_step")
    tune_cpu_allocator()  # as `ijepa-viz train` runs (IJEPA_VIZ_MALLOC=system: glibc's defaults)
    tr, images = VARIANTS[args.variant]()
    cfg, B = tr.cfg, images.shape[0]
    if tr.threads:
        torch.set_num_threads(tr.threads)
    for _ in range(3):
        labelled_step(tr, images)
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            labelled_step(tr, images)
    wall = (time.perf_counter() - t) / args.steps
    events = prof.key_averages()
    stages = {e.key: e.cpu_time_total / args.steps / 1e3 for e in events if e.key in STAGES}
    ops = [e for e in events if e.key not in STAGES and not e.key.startswith("ProfilerStep")]
    n_ops = sum(e.count for e in ops if e.key.startswith("aten::")) / args.steps
    total_self = sum(e.self_cpu_time_total for e in ops) / args.steps / 1e3
    top = sorted(ops, key=lambda e: -e.self_cpu_time_total)[:args.top]
    rows = [{"op": e.key, "self_ms": e.self_cpu_time_total / args.steps / 1e3,
             "share": e.self_cpu_time_total / args.steps / 1e3 / total_self, "calls": e.count / args.steps}
            for e in top]
    print(f"threads {torch.get_num_threads()}, dtype {tr.amp_dtype}, attention {tr.attention}; "
          f"step {wall * 1e3:.0f} ms under the profiler ({B / wall:.1f} imgs/s)")
    print(f"aten ops per step: {n_ops:.0f}; self CPU time summed over ops: {total_self:.0f} ms")
    for s in STAGES:
        print(f"  {s:16s} {stages.get(s, math.nan):8.1f} ms")
    print(f"{'op':40s} {'self ms':>8s} {'share':>6s} {'calls':>6s}")
    for r in rows:
        print(f"{r['op'][:40]:40s} {r['self_ms']:8.1f} {r['share'] * 100:5.1f}% {r['calls']:6.0f}")
    if args.json:
        out = {"variant": args.variant, "config": cfg.to_dict(), "threads": torch.get_num_threads(),
               "load_avg_1min": os.getloadavg()[0], "step_ms_profiled": wall * 1e3,
               "aten_ops_per_step": n_ops, "stages_ms": stages, "top_ops": rows}
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
