"""A/B-time variants of the training step in one process, in turn, so that a shared machine's load cancels.

    OMP_NUM_THREADS=1 python benchmarks/step_ab.py default,previous --rounds 8 --steps 2
    python benchmarks/step_ab.py default,threads1 --rounds 6 --steps 2 --json benchmarks/results/step_ab_threads.json

Every variant is a Trainer at the issue's configuration (benchmarks/step_profile.py: ViT-Tiny/4 at 32 px, 12
blocks, a 96x6 predictor, batch 128, min_keep=4) with one thing changed. All are built and warmed up first (the
warm-up time, compilation included, is reported), then each round runs `--steps` steps of every variant in turn,
in an order rotated from round to round.
Every variant runs the same steps, hence the same masks. Prints the median step time of each, its speed ratio to
the first variant, and the median over steps of the paired ratio (step i of the first variant over step i of this
one: the same masks, run moments apart); the 1-minute load average is sampled after every round.

Variants (the first listed is the reference of the ratios):
  default        the trainer as it is (bf16 autocast on a CPU with native bf16, matmul attention, fused AdamW)
  previous       the default before 2026-12-01: both changes below undone
  bf16-softmax   timm's attention forward, whose softmax runs in bf16 under autocast (before model.Attention)
  no-contiguous  the embedding left as (B, D, N) in memory (before VisionTransformer.embed's .contiguous())
  inference      the target forward under torch.inference_mode instead of no_grad (its output cloned)
  tgt-sdpa       fused SDPA attention in the target encoder only (it runs without gradients)
  sdpa           fused SDPA attention everywhere
  math           explicit-matmul attention everywhere (what train.attention=auto picks on a CPU)
  foreach-adamw  AdamW(foreach=True) instead of fused=True
  loop-adamw     AdamW(foreach=False, fused=False), one parameter at a time
  ema-loop       the EMA update one parameter at a time instead of one foreach lerp
  threads1       torch.set_num_threads(1) for this variant's steps (the others keep the process's setting)
  compile        train.compile=true (dynamic context and target lengths: one graph)
  compile-static torch.compile without the lengths marked dynamic, as train.compile did before 2026-12-01
(Compiled variants share torch.compile's per-function cache within a process: time each in its own run, with
TORCHINDUCTOR_CACHE_DIR set to an empty folder for a cold compile.)
  fp32           fp32 eager with SDPA (bench's fp32-eager)
  patch2         patch size 2 instead of 4 (issue 11's option): a 16x16 grid, 256 patches instead of 64
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from timm.layers import Attention as TimmAttention
from torch._dynamo.utils import counters

from ijepa_viz.allocator import tune_cpu_allocator
from ijepa_viz.config import get_preset, override
from ijepa_viz.model import gather_tokens, set_attention
from ijepa_viz.train import Trainer, param_groups

ISSUE_CONFIG = ["model.depth=12", "model.pred_depth=6"]  # on top of cpu-tiny-paper: batch 128, min_keep=4


def build(sets=(), patch=None):
    cfg = override(get_preset("cpu-tiny-paper"), ISSUE_CONFIG + ["train.steps=100000"] + list(sets))
    B = cfg.data.batch_size
    images = torch.randn(B, 3, cfg.model.img_size, cfg.model.img_size, generator=torch.Generator().manual_seed(1))
    tr = Trainer(cfg, loader=[(images, torch.zeros(B, dtype=torch.long))], progress=False)
    tr.threads = None
    if patch:
        patch(tr)
    return tr, images


def _transposed_embed(self, images, keep=None):  # model.VisionTransformer.embed before 2026-12-01
    x = self.patch_embed(images) + self.pos_embed  # (B, N, D), (B, D, N) in memory
    return x if keep is None else gather_tokens(x, keep)


def _no_contiguous(tr):
    for enc in (tr.model.encoder, tr.model.target_encoder):
        enc.embed = types.MethodType(_transposed_embed, enc)


def _bf16_softmax(tr):  # timm's Attention.forward, as the blocks used before 2026-12-01: a bf16 softmax
    for m in tr.model.modules():
        if isinstance(m, TimmAttention):
            m.forward = types.MethodType(TimmAttention.forward, m)


def _previous(tr):
    _no_contiguous(tr)
    _bf16_softmax(tr)


def _inference(tr):
    forward_target = tr.model.forward_target

    def ft(images, idx):
        with torch.inference_mode():
            out = forward_target(images, idx)
        return out.clone()  # inference tensors cannot be saved for the loss's backward

    tr.model.forward_target = ft


def _adamw(**kw):
    def patch(tr):
        c = tr.cfg.optim
        tr.optimizer = torch.optim.AdamW(param_groups(tr.model), lr=c.lr, betas=c.betas, **kw)
    return patch


def _ema_loop(tr):
    model = tr.model

    @torch.no_grad()
    def update_target(momentum):
        for t, s in zip(model.target_encoder.parameters(), model.encoder.parameters()):
            t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)

    model.update_target = update_target


def _threads1(tr):
    tr.threads = 1


def _compile_static(tr):
    tr.net = torch.compile(tr.model)


VARIANTS = {
    "default": lambda: build(),
    "previous": lambda: build(patch=_previous),
    "bf16-softmax": lambda: build(patch=_bf16_softmax),
    "no-contiguous": lambda: build(patch=_no_contiguous),
    "inference": lambda: build(patch=_inference),
    "tgt-sdpa": lambda: build(patch=lambda tr: set_attention(tr.model.target_encoder, "sdpa")),
    "sdpa": lambda: build(["train.attention=sdpa"]),
    "math": lambda: build(["train.attention=math"]),
    "foreach-adamw": lambda: build(patch=_adamw(foreach=True)),
    "loop-adamw": lambda: build(patch=_adamw(foreach=False, fused=False)),
    "ema-loop": lambda: build(patch=_ema_loop),
    "threads1": lambda: build(patch=_threads1),
    "compile": lambda: build(["train.compile=true"]),
    "compile-static": lambda: build(patch=_compile_static),
    "fp32": lambda: build(["train.precision=fp32", "train.attention=sdpa"]),
    "patch2": lambda: build(["model.patch_size=2"]),
}


def run(names, rounds, steps, warmup):
    default_threads = torch.get_num_threads()
    built, warm = {}, {}
    for n in names:
        t = time.perf_counter()
        tr, images = VARIANTS[n]()
        torch.set_num_threads(tr.threads or default_threads)
        for _ in range(warmup):
            tr.train_step(images)
        warm[n] = time.perf_counter() - t
        built[n] = (tr, images)
        print(f"{n}: built and {warmup} warm-up steps in {warm[n]:.1f} s", flush=True)
    times, load = {n: [] for n in names}, [os.getloadavg()[0]]
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotated, so that no variant always runs first
        for n in order:
            tr, images = built[n]
            torch.set_num_threads(tr.threads or default_threads)
            for _ in range(steps):
                t = time.perf_counter()
                tr.train_step(images)
                times[n].append(time.perf_counter() - t)
        load.append(os.getloadavg()[0])
    torch.set_num_threads(default_threads)
    med = {n: statistics.median(v) for n, v in times.items()}
    # Step i of every variant ran the same masks, near the same time: the median of the per-step ratios is the
    # steadier figure when the lengths (hence the step times) change from step to step.
    paired = {n: statistics.median(a / b for a, b in zip(times[names[0]], times[n])) for n in names}
    return {"threads": default_threads, "rounds": rounds, "steps_per_round": steps, "load_avg_1min": load,
            "warmup_s": warm, "median_step_s": med, "ratio_vs_first": {n: med[names[0]] / med[n] for n in names},
            "paired_ratio_vs_first": paired, "step_s_all": times,
            "compiled_graphs": int(counters["stats"]["unique_graphs"])}  # by all compile variants, together


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", help=f"comma-separated, the first is the reference: {', '.join(VARIANTS)}")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=2, help="steps of each variant per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    tuned = tune_cpu_allocator()  # as `ijepa-viz train` runs (IJEPA_VIZ_MALLOC=system: glibc's defaults)
    res = run(names, args.rounds, args.steps, args.warmup)
    res["allocator_tuned"] = tuned
    B = 128
    print(f"allocator tuned: {tuned}; threads {res['threads']}; "
          f"load average per round {[round(x, 2) for x in res['load_avg_1min']]}; "
          f"graphs compiled: {res['compiled_graphs']}")
    for n in names:
        m = res["median_step_s"][n]
        print(f"{n:15s} median {m * 1e3:7.0f} ms  {B / m:6.1f} imgs/s  x{res['ratio_vs_first'][n]:.3f} vs {names[0]}"
              f" (paired x{res['paired_ratio_vs_first'][n]:.3f})  warm-up {res['warmup_s'][n]:.0f} s")
    if args.json:
        res["command"] = "python benchmarks/step_ab.py " + " ".join(argv if argv is not None else sys.argv[1:])
        res["omp_num_threads_env"] = os.environ.get("OMP_NUM_THREADS")
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
