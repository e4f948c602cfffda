"""`ijepa-viz bench`: how fast is a training step, and how close to the machine's matmul peak?

For a preset plus `--set` overrides it measures, in one run:

* this machine's fp32 and bf16 matmul peaks (GFLOP/s of a large square matmul);
* for each mode (fp32 eager, and the optimised default), the steady-state imgs/s of the *whole* training step
  (mask sampling, target forward, context forward, predictor, loss, backward, AdamW, EMA), after warmup;
* the FLOPs per image of that step, counted by `torch.utils.flop_counter.FlopCounterMode`, hence the achieved
  GFLOP/s and the MFU against the peak of the dtype in use;
* the data pipeline's imgs/s on its own, and the peak memory (of the whole process, every mode built at once).

Ratios are always between numbers measured in the same run, and the modes are timed in turn (a few steps of each,
round after round), so that a machine shared with other jobs slows them alike: on such a machine the ratios hold
and the absolute figures do not. The 1-minute load average before and after the timings is printed with them.
"""
from __future__ import annotations

import os
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


def _trainer(cfg: Config, mode: str, steps: int, seed: int):
    """A Trainer for `cfg` in `mode`, and a fixed batch of random images on its device."""
    from ijepa_viz.train import Trainer

    precision, attention, compile_ = MODES[mode]
    cfg = override(cfg, {"train.precision": precision, "train.attention": attention, "train.compile": compile_,
                         "train.seed": seed, "train.steps": steps})
    B = cfg.data.batch_size
    images = torch.randn(B, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size,
                         generator=torch.Generator().manual_seed(seed))
    trainer = Trainer(cfg, loader=[(images, torch.zeros(B, dtype=torch.long))], progress=False)
    return trainer, images.to(trainer.device)


def _timed_step(trainer, images) -> float:
    _sync(trainer.device)
    t = time.perf_counter()
    trainer.train_step(images)
    _sync(trainer.device)
    return time.perf_counter() - t


def bench_steps(cfg: Config, modes=("fp32-eager", "optimised"), steps: int = 20, warmup: int = 5, rounds: int = 5,
                seed: int = 0) -> list[dict]:
    """Time the full training step of `cfg` in each mode on a fixed batch of random images.

    The modes are timed in turn: each of `rounds` rounds runs about steps/rounds steps of every mode, so that load
    from other processes on a shared machine hits every mode alike and cancels in their ratios. Every mode runs the
    same steps, hence the same masks. `warmup_s` is the time of the untimed first steps (compilation included).
    """
    rounds = max(1, min(rounds, steps))
    built = {}
    for mode in modes:
        trainer, images = _trainer(cfg, mode, steps + warmup + 1, seed)
        # FLOPs of one step: forward + backward (the optimiser and EMA are memory-bound and not counted), counted
        # in eager mode: the same math as a compiled step, without compiling under the counter.
        net, trainer.net = trainer.net, trainer.model
        counter = FlopCounterMode(display=False)
        with counter:
            trainer.train_step(images)
        trainer.net = net
        t = time.perf_counter()
        for _ in range(warmup):
            _timed_step(trainer, images)
        built[mode] = (trainer, images, counter.get_total_flops() / images.shape[0], time.perf_counter() - t)
    times = {mode: [] for mode in modes}
    for r in range(rounds):
        n = steps // rounds + (r < steps % rounds)
        for mode, (trainer, images, _, _) in built.items():
            times[mode] += [_timed_step(trainer, images) for _ in range(n)]
    rows = []
    for mode, (trainer, images, flops_per_img, warmup_s) in built.items():
        B, step_s = images.shape[0], statistics.median(times[mode])
        rows.append({
            "mode": mode, "dtype": "bf16" if trainer.amp_dtype == torch.bfloat16 else "fp32",
            "attention": trainer.attention, "compile": MODES[mode][2], "device": str(trainer.device),
            "batch_size": B, "step_ms": step_s * 1e3, "imgs_per_s": B / step_s, "flops_per_img": flops_per_img,
            "gflops_per_s": flops_per_img * B / step_s / 1e9, "warmup_s": warmup_s,
            "step_ms_all": [t * 1e3 for t in times[mode]],
        })
    return rows


def bench_step(cfg: Config, mode: str, steps: int = 20, warmup: int = 5, seed: int = 0) -> dict:
    """Time the full training step of `cfg` in one `mode` (see `bench_steps`)."""
    return bench_steps(cfg, (mode,), steps, warmup, rounds=1, seed=seed)[0]


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
              data_batches: int = 20, peak_seconds: float = 1.0, rounds: int = 5) -> dict:
    """Everything `ijepa-viz bench` reports, as a dict (see the module docstring)."""
    from ijepa_viz.train import resolve_device

    device = resolve_device(cfg.train.device)
    peaks = {"fp32": matmul_peak(torch.float32, seconds=peak_seconds, device=device),
             "bf16": matmul_peak(torch.bfloat16, seconds=peak_seconds, device=device)}
    load = [os.getloadavg()[0]]  # other processes' load: ratios cancel it, absolute figures do not
    rows = bench_steps(cfg, modes, steps, warmup, rounds)
    load.append(os.getloadavg()[0])
    by_mode = {r["mode"]: r for r in rows}
    for r in rows:
        r["mfu"] = r["gflops_per_s"] / peaks[r["dtype"]]
        for base in ("fp32-eager", "optimised"):
            key = "speedup_vs_" + base.replace("-", "_")
            r[key] = r["imgs_per_s"] / by_mode[base]["imgs_per_s"] if base in by_mode else None
    return {
        "config": cfg.to_dict(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)},
        "matmul_peak_gflops": peaks,
        "load_avg_1min": load,  # before and after the step timings
        "steps": rows,
        "data_imgs_per_s": bench_data(cfg, data_batches) if data_batches else None,
        "peak_memory_mb": _peak_memory_mb(device),
    }


def format_bench(result: dict) -> str:
    p = result["matmul_peak_gflops"]
    load = result.get("load_avg_1min")
    lines = [f"matmul peak: fp32 {p['fp32']:.0f} GFLOP/s, bf16 {p['bf16']:.0f} GFLOP/s "
             f"(bf16/fp32 = {p['bf16'] / p['fp32']:.2f}x); {result['machine']['threads']} threads"
             + (f"; load average {load[0]:.2f} -> {load[1]:.2f} on {os.cpu_count()} cores" if load else ""),
             f"{'mode':12s} {'dtype':5s} {'attn':4s} {'imgs/s':>8s} {'ms/step':>8s} {'GFLOP/img':>9s} {'GFLOP/s':>8s} "
             f"{'MFU':>6s} {'vs fp32':>8s} {'vs opt.':>8s} {'warm-up':>8s}"]

    def ratio(x):
        return f"{x:.2f}x" if x else "-"

    for r in result["steps"]:
        lines.append(f"{r['mode']:12s} {r['dtype']:5s} {r['attention']:4s} {r['imgs_per_s']:8.1f} {r['step_ms']:8.1f} "
                     f"{r['flops_per_img'] / 1e9:9.3f} {r['gflops_per_s']:8.1f} {r['mfu'] * 100:5.1f}% "
                     f"{ratio(r.get('speedup_vs_fp32_eager')):>8s} {ratio(r.get('speedup_vs_optimised')):>8s} "
                     f"{r.get('warmup_s', 0):7.1f}s")
    lines.append("(MFU: against the matmul peak of the dtype in use; ratios: imgs/s against fp32-eager and the "
                 "optimised default, timed in turn in this run; warm-up: the untimed first steps, compilation included)")
    if result.get("data_imgs_per_s"):
        lines.append(f"data pipeline alone: {result['data_imgs_per_s']:.0f} imgs/s")
    lines.append(f"peak memory: {result['peak_memory_mb']:.0f} MiB")
    return "\n".join(lines)
