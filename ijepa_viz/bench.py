"""`ijepa-viz bench`: how fast is a training step, and how close to the machine's matmul peak?

For a preset plus `--set` overrides it measures, in one run:

* this machine's fp32 and bf16 matmul peaks (GFLOP/s of a large square matmul);
* for each mode (fp32 eager, and the optimised default), the steady-state imgs/s of the *whole* training step
  (mask sampling, target forward, context forward, predictor, loss, backward, AdamW, EMA), after warmup;
* the FLOPs per image of that step, counted by `torch.utils.flop_counter.FlopCounterMode`, hence the achieved
  GFLOP/s and the MFU against the peak of the dtype in use;
* the data pipeline's imgs/s on its own, and the peak memory.

Ratios are always between numbers measured in the same run.
"""
from __future__ import annotations

import platform
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ijepa_viz.config import Config, override

MODES = {
    # name: (precision, attention, compile). "optimised" is what `train` uses by default.
    "fp32-eager": ("fp32", "sdpa", False),
    "optimised": ("auto", "auto", False),
    "bf16-sdpa": ("bf16", "sdpa", False),
    "bf16-math": ("bf16", "math", False),
    "compiled": ("auto", "auto", True),
}


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 1.0, device="cpu") -> float:
    """Best GFLOP/s of an n x n x n matmul in `dtype` over about `seconds` of repeats."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm up
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (whole process)


def bench_step(cfg: Config, mode: str, steps: int = 20, warmup: int = 5, seed: int = 0) -> dict:
    """Time the full training step of `cfg` in `mode` on a fixed batch of random images."""
    from ijepa_viz.train import Trainer

    precision, attention, compile_ = MODES[mode]
    cfg = override(cfg, {"train.precision": precision, "train.attention": attention, "train.compile": compile_,
                         "train.seed": seed, "train.steps": steps + warmup + 1})
    B = cfg.data.batch_size
    images = torch.randn(B, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
    trainer = Trainer(cfg, loader=[(images, torch.zeros(B, dtype=torch.long))], progress=False)
    device = trainer.device
    images = images.to(device)

    # FLOPs of one step: forward + backward (the optimiser and EMA are memory-bound and not counted).
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.train_step(images)
    flops_per_img = counter.get_total_flops() / B

    times = []
    for i in range(warmup + steps):
        _sync(device)
        t = time.perf_counter()
        trainer.train_step(images)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    dtype = "bf16" if trainer.amp_dtype == torch.bfloat16 else "fp32"
    return {
        "mode": mode, "dtype": dtype, "attention": trainer.attention, "compile": compile_, "device": str(device),
        "batch_size": B,
        "step_ms": step_s * 1e3, "imgs_per_s": B / step_s, "flops_per_img": flops_per_img,
        "gflops_per_s": flops_per_img * B / step_s / 1e9,
        "step_ms_all": [t * 1e3 for t in times],
    }


def bench_data(cfg: Config, batches: int = 20) -> float:
    """imgs/s of the training data pipeline alone (decoding and augmentation), after a warm-up batch."""
    from ijepa_viz.data import build_loader

    loader = build_loader(cfg.data, "train", cfg.model.img_size, train=True, seed=0)
    loader.set_epoch(0)
    it = iter(loader)
    next(it)
    n, t = 0, time.perf_counter()
    for i, (images, _) in enumerate(it):
        n += images.shape[0]
        if i + 1 >= batches:
            break
    return n / max(time.perf_counter() - t, 1e-9)


def run_bench(cfg: Config, modes=("fp32-eager", "optimised"), steps: int = 20, warmup: int = 5,
              data_batches: int = 20, peak_seconds: float = 1.0) -> dict:
    """Everything `ijepa-viz bench` reports, as a dict (see the module docstring)."""
    from ijepa_viz.train import resolve_device

    device = resolve_device(cfg.train.device)
    peaks = {"fp32": matmul_peak(torch.float32, seconds=peak_seconds, device=device),
             "bf16": matmul_peak(torch.bfloat16, seconds=peak_seconds, device=device)}
    rows = [bench_step(cfg, m, steps, warmup) for m in modes]
    for r in rows:
        r["mfu"] = r["gflops_per_s"] / peaks[r["dtype"]]
        r["speedup_vs_fp32_eager"] = r["imgs_per_s"] / rows[0]["imgs_per_s"] if modes[0] == "fp32-eager" else None
    return {
        "config": cfg.to_dict(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)},
        "matmul_peak_gflops": peaks,
        "steps": rows,
        "data_imgs_per_s": bench_data(cfg, data_batches) if data_batches else None,
        "peak_memory_mb": _peak_memory_mb(device),
    }


def format_bench(result: dict) -> str:
    p = result["matmul_peak_gflops"]
    lines = [f"matmul peak: fp32 {p['fp32']:.0f} GFLOP/s, bf16 {p['bf16']:.0f} GFLOP/s "
             f"(bf16/fp32 = {p['bf16'] / p['fp32']:.2f}x); {result['machine']['threads']} threads",
             f"{'mode':12s} {'dtype':5s} {'attn':4s} {'imgs/s':>8s} {'ms/step':>8s} {'GFLOP/img':>9s} {'GFLOP/s':>8s} "
             f"{'MFU':>6s} {'vs fp32':>8s}"]
    for r in result["steps"]:
        ratio = f"{r['speedup_vs_fp32_eager']:.2f}x" if r.get("speedup_vs_fp32_eager") else "-"
        lines.append(f"{r['mode']:12s} {r['dtype']:5s} {r['attention']:4s} {r['imgs_per_s']:8.1f} {r['step_ms']:8.1f} "
                     f"{r['flops_per_img'] / 1e9:9.3f} {r['gflops_per_s']:8.1f} {r['mfu'] * 100:5.1f}% {ratio:>8s}")
    if result.get("data_imgs_per_s"):
        lines.append(f"data pipeline alone: {result['data_imgs_per_s']:.0f} imgs/s")
    lines.append(f"peak memory: {result['peak_memory_mb']:.0f} MiB")
    return "\n".join(lines)
