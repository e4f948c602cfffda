"""How long the mask explorer takes to redraw after one slider change (the goal: at most 100 ms).

    python benchmarks/widget_redraw.py            # 50 changes of each kind, JSON to benchmarks/results/
    python benchmarks/widget_redraw.py --changes 20 --out /tmp/redraw.json

A redraw is everything the kernel does for one change: build the `MaskCollator` for the new settings, sample
the masks, update the figure's artists in place, render the PNG for the `ipywidgets.Image` and format the
fractions line. It does not include the trip to the browser (a few kB over the kernel's websocket).
The changes cycle through the controls a reader moves most: seed, number of targets, target scale, context
scale and patch size, on the bundled 112 px sample (a 14x14 grid at patch 8, a 28x28 grid at patch 4).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402

from ijepa_viz.viz.widgets import mask_explorer  # noqa: E402

HERE = Path(__file__).resolve().parent


def changes(n: int):
    """n (control, value) pairs that each change the figure."""
    cycle = [("seed", lambda i: i + 1), ("num_targets", lambda i: 1 + i % 6),
             ("target_scale", lambda i: (0.1 + 0.01 * (i % 10), 0.2 + 0.01 * (i % 10))),
             ("context_scale", lambda i: (0.7 + 0.01 * (i % 10), 1.0)), ("patch_size", lambda i: (4, 8)[i % 2])]
    for i in range(n):
        name, value = cycle[i % len(cycle)]
        yield name, value(i // len(cycle))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--changes", type=int, default=50, help="slider changes to time")
    p.add_argument("--out", default=str(HERE / "results" / "widget_redraw.json"))
    args = p.parse_args(argv)

    explorer = mask_explorer()
    for _ in range(5):  # warm up caches (fonts, numpy, torch)
        explorer.redraw()
    explorer.redraw_times.clear()
    wall = []
    for name, value in changes(args.changes):
        t = time.perf_counter()
        explorer.controls[name].value = value
        wall.append(time.perf_counter() - t)
    ms = [1000 * s for s in explorer.redraw_times]
    result = {
        "changes": len(ms),
        "mean_ms": statistics.mean(ms),
        "median_ms": statistics.median(ms),
        "p90_ms": sorted(ms)[int(0.9 * (len(ms) - 1))],
        "max_ms": max(ms),
        "wall_mean_ms": 1000 * statistics.mean(wall),  # the same, seen from the slider (adds the traitlets)
        "goal_ms": 100,
        "image_px": explorer.image_widget.width,
        "png_bytes": len(explorer.image_widget.value),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"mask explorer redraw over {result['changes']} slider changes: mean {result['mean_ms']:.1f} ms, "
          f"median {result['median_ms']:.1f} ms, p90 {result['p90_ms']:.1f} ms, max {result['max_ms']:.1f} ms "
          f"(goal <= {result['goal_ms']} ms)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
