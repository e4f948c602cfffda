"""Matplotlib drawings for I-JEPA: each `plot_*` function draws on the Axes it is given and returns it.

Three layers (see STYLE.md): small *compute* helpers here turn masks, histories and configs into arrays
(`mask_fractions`, `mask_overlay`, `mask_size_samples`, `schedule_curves`); the *draw* functions put them on an
Axes; `ijepa_viz.viz.widgets` *wires* them to ipywidgets.

Drawing functions that a widget redraws many times (`plot_masks`, `plot_loss`, `plot_collapse`,
`plot_schedules`) update their artists in place when they are called again on the same Axes, so a redraw
costs one canvas draw and no new artists.

Colours: the context is a light blue tint, target block m has colour `TARGET_COLOURS[m]`, and patches that
neither the context encoder nor the predictor ever sees are greyed out.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.colors import to_rgba
from matplotlib.patches import Rectangle

from ijepa_viz.masks import MaskCollator, Masks

__all__ = [
    "TARGET_COLOURS", "CONTEXT_COLOUR", "HIDDEN_COLOUR", "PAPER_ABLATIONS", "PAPER_ABLATION_SOURCES",
    "denormalize", "to_display", "mask_fractions", "mask_overlay", "composite_masks", "mask_size_samples",
    "schedule_curves",
    "plot_image", "plot_masks", "plot_mask_histograms", "plot_loss", "plot_schedules", "plot_collapse",
    "plot_ablation_bars",
]

# tab10 without blue (the context's colour) and grey (hidden patches).
TARGET_COLOURS = ("#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
CONTEXT_COLOUR = "#4fa3ff"
HIDDEN_COLOUR = "#202020"

# Paper numbers (Assran et al., 2023, arXiv 2301.08243): top-1 linear accuracy on ImageNet-1k with 1% of the
# labels, the setting of the paper's ablations. Keys are (config field, setting) as in benchmarks' JSON rows.
PAPER_ABLATIONS: dict[str, dict[str, float]] = {
    # Table 6, ViT-B/16 pretrained 300 epochs. The paper's "rasterized" masking splits the image into four
    # quadrants, one is the context and the other three the targets: our 'quadrant' strategy.
    "mask.strategy": {"multiblock": 54.2, "block": 20.2, "random": 17.6, "quadrant": 15.5},
    # Table 7, ViT-L/16 pretrained 500 epochs: predict target-encoder representations or normalised pixels.
    "model.target": {"representation": 66.9, "pixels": 40.7},
    # Appendix (number of target blocks), ViT-B/16 300 epochs.
    "mask.num_targets": {"4": 54.2, "1": 9.0},
}
PAPER_ABLATION_SOURCES = {
    "mask.strategy": "paper Table 6 (ViT-B/16, 300 ep, 1% IN-1k linear)",
    "model.target": "paper Table 7 (ViT-L/16, 500 ep, 1% IN-1k linear)",
    "mask.num_targets": "paper appendix, number of targets (ViT-B/16, 300 ep, 1% IN-1k linear)",
}


# -- images ---------------------------------------------------------------------------------------

def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo `Normalize(mean, std)`: (..., 3, H, W) -> the same shape, pixel values in [0, 1] (clamped)."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images * s + m).clamp(0, 1)


def to_display(image, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> np.ndarray:
    """Any one image -> float32 (H, W, 3) in [0, 1] for `imshow`.

    Accepts a tensor or array, (3, H, W) or (H, W, 3) or (H, W), uint8 (0-255) or float. A float image is
    denormalised with `mean` and `std` when they are given; without them, values outside [0, 1] are rescaled
    to [0, 1] (min-max), so a normalised image still shows.
    """
    if hasattr(image, "convert"):  # PIL image
        image = np.asarray(image.convert("RGB"))
    x = torch.as_tensor(np.asarray(image) if not torch.is_tensor(image) else image).detach().cpu()
    if x.ndim == 2:
        x = x.unsqueeze(0).expand(3, -1, -1)
    if x.ndim != 3:
        raise ValueError(f"expected one image of shape (3, H, W) or (H, W, 3), got shape {tuple(x.shape)}")
    if x.shape[0] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(2, 0, 1)  # HWC -> CHW
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    else:
        x = x.float()
        if mean is not None and std is not None:
            x = denormalize(x, mean, std)
        elif x.min() < 0 or x.max() > 1:
            x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-8)
    return x.permute(1, 2, 0).contiguous().numpy()


def plot_image(ax: Axes, image, title: Optional[str] = None, mean=None, std=None) -> Axes:
    """Show one image (any layout `to_display` accepts) without ticks."""
    ax.imshow(to_display(image, mean, std), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return ax


# -- masks: compute -------------------------------------------------------------------------------

def mask_fractions(masks: Masks, index: int = 0) -> tuple[float, float]:
    """(context fraction, target fraction) of image `index`: the share of the H*W patches that the context
    encoder sees, and the share covered by the union of the target blocks. Both lie in [0, 1]."""
    N = masks.grid[0] * masks.grid[1]
    context = torch.unique(masks.context[index]).numel()
    targets = torch.unique(masks.targets[index].flatten()).numel()
    return context / N, targets / N


def mask_overlay(masks: Masks, index: int = 0, context_alpha: float = 0.18, target_alpha: float = 0.55,
                 hidden_alpha: float = 0.7, colours: Sequence[str] = TARGET_COLOURS) -> np.ndarray:
    """RGBA overlay on the patch grid, float (H, W, 4): hidden patches grey, context patches blue, target
    block m in `colours[m % len(colours)]` (later blocks paint over earlier ones where they overlap)."""
    H, W = masks.grid
    out = np.empty((H * W, 4), dtype=np.float32)
    out[:] = to_rgba(HIDDEN_COLOUR, hidden_alpha)
    out[masks.context[index].cpu().numpy()] = to_rgba(CONTEXT_COLOUR, context_alpha)
    for m, idx in enumerate(masks.targets[index].cpu().numpy()):
        out[idx] = to_rgba(colours[m % len(colours)], target_alpha)
    return out.reshape(H, W, 4)


def mask_size_samples(collator: MaskCollator, n: int = 1000, batch_size: int = 1, start_step: int = 0
                      ) -> dict[str, np.ndarray]:
    """Sizes of `n` sampled masks, as fractions of the H*W grid: 'context' (patches the context encoder
    sees, per image), 'target' (patches per target block) and 'target_union' (all targets of an image).

    The official collator draws one block size per *batch*, so the masks come from n // batch_size batches
    (steps start_step, start_step+1, ...); batch_size=1 shows the full spread of sizes.
    """
    N = collator.grid[0] * collator.grid[1]
    ctx, tgt, union = [], [], []
    for step in range(start_step, start_step + max(1, n // batch_size)):
        m = collator.sample(batch_size, step)
        ctx.append(torch.full((batch_size,), m.context.shape[1]))
        tgt.append(torch.full((batch_size * m.targets.shape[1],), m.targets.shape[2]))
        union.append(m.target_mask().any(1).sum(1))
    return {"context": torch.cat(ctx).numpy() / N, "target": torch.cat(tgt).numpy() / N,
            "target_union": torch.cat(union).numpy() / N}


# -- masks: draw ----------------------------------------------------------------------------------

def _grid_segments(H: int, W: int, ph: float, pw: float) -> list:
    rows = [[(-0.5, i * ph - 0.5), (W * pw - 0.5, i * ph - 0.5)] for i in range(1, H)]
    cols = [[(j * pw - 0.5, -0.5), (j * pw - 0.5, H * ph - 0.5)] for j in range(1, W)]
    return rows + cols


def _set_rect(r: Rectangle, box, ph: float, pw: float, colour) -> None:
    top, left, h, w = (int(v) for v in box)
    r.set_xy((left * pw - 0.5, top * ph - 0.5))
    r.set_width(w * pw)
    r.set_height(h * ph)
    r.set_edgecolor(colour)


def composite_masks(image, masks: Masks, index: int = 0, context_alpha: float = 0.18, target_alpha: float = 0.55,
                    hidden_alpha: float = 0.7, mean=None, std=None) -> np.ndarray:
    """The image with `mask_overlay` alpha-blended over it: float (H_px, W_px, 3) in [0, 1]. The image side
    must be a multiple of the patch grid's."""
    img = to_display(image, mean, std)
    Hpx, Wpx = img.shape[:2]
    H, W = masks.grid
    if Hpx % H or Wpx % W:
        raise ValueError(f"an image of {Hpx}x{Wpx} px does not split into the {H}x{W} patch grid of the masks")
    overlay = mask_overlay(masks, index, context_alpha, target_alpha, hidden_alpha)
    overlay = overlay.repeat(Hpx // H, axis=0).repeat(Wpx // W, axis=1)  # (Hpx, Wpx, 4): one cell per pixel
    alpha = overlay[..., 3:]
    return img * (1 - alpha) + overlay[..., :3] * alpha


def plot_masks(ax: Axes, image, masks: Masks, index: int = 0, *, boxes: bool = True, grid: bool = True,
               context_alpha: float = 0.18, target_alpha: float = 0.55, hidden_alpha: float = 0.7,
               mean=None, std=None, title: Optional[str] = None) -> Axes:
    """Draw image `index`'s masks over `image`: context patches tinted blue, each target block in its own
    colour (`TARGET_COLOURS`), patches used by neither greyed out; with `boxes`, the outline of every target
    block (solid) and of the context block before the targets were removed (dashed).

    `image`: one image in any layout `to_display` accepts; its side must be a multiple of the grid's.
    Artists: one image (the picture with the colours blended in, `composite_masks`), one Rectangle per target
    block and one for the context block (block strategies only; `random` has no boxes), and a LineCollection
    of the patch borders. Calling it again on the same Axes updates these artists in place (the mask
    explorer redraws this way).
    """
    img = composite_masks(image, masks, index, context_alpha, target_alpha, hidden_alpha, mean, std)
    img = (img * 255 + 0.5).astype(np.uint8)  # uint8 RGB: the cheapest image for Agg to resample
    Hpx, Wpx = img.shape[:2]
    H, W = masks.grid
    ph, pw = Hpx / H, Wpx / W
    extent = (-0.5, Wpx - 0.5, Hpx - 0.5, -0.5)
    state = getattr(ax, "_ijepa_masks", None)
    if state is None:
        ax.set_xticks([])
        ax.set_yticks([])
        state = {
            "image": ax.imshow(img, interpolation="nearest", extent=extent),
            "grid": ax.add_collection(LineCollection([], colors="white", linewidths=0.4, alpha=0.35)),
            "targets": [],
            "context": ax.add_patch(Rectangle((0, 0), 0, 0, fill=False, linestyle="--", linewidth=1.5,
                                              edgecolor="white")),
        }
        ax._ijepa_masks = state
    else:
        state["image"].set_data(img)
        state["image"].set_extent(extent)
    state["grid"].set_segments(_grid_segments(H, W, ph, pw) if grid else [])

    # one solid rectangle per target block, added or removed as the number of blocks changes
    tboxes = masks.target_boxes[index].tolist() if boxes else []
    tboxes = [b for b in tboxes if b[0] >= 0]
    rects = state["targets"]
    while len(rects) < len(tboxes):
        rects.append(ax.add_patch(Rectangle((0, 0), 0, 0, fill=False, linewidth=2.0)))
    while len(rects) > len(tboxes):
        rects.pop().remove()
    for m, (r, box) in enumerate(zip(rects, tboxes)):
        _set_rect(r, box, ph, pw, TARGET_COLOURS[m % len(TARGET_COLOURS)])

    cbox = masks.context_box[index].tolist()
    has_context_box = boxes and cbox[0] >= 0
    if has_context_box:
        _set_rect(state["context"], cbox, ph, pw, "white")
    if has_context_box and state["context"].axes is None:
        ax.add_patch(state["context"])
    elif not has_context_box and state["context"].axes is not None:
        state["context"].remove()
    ax.set_xlim(-0.5, Wpx - 0.5)
    ax.set_ylim(Hpx - 0.5, -0.5)
    if title is not None:
        ax.set_title(title)
    return ax


def plot_mask_histograms(axes: Sequence[Axes], collator: MaskCollator, n: int = 1000, batch_size: int = 1,
                         samples: Optional[dict] = None) -> Sequence[Axes]:
    """Histograms of mask sizes over `n` sampled masks (`mask_size_samples`), as fractions of the grid:
    axes[0] the context the encoder sees, axes[1] each target block, and axes[2] (if given) the union of
    an image's targets. Shaded bands mark the configured `context_scale` and `target_scale` ranges: the
    context ends up far below its block's scale because the targets are cut out of it."""
    s = samples if samples is not None else mask_size_samples(collator, n, batch_size)
    c = collator.cfg
    panels = [("context", "context seen by the encoder", "tab:blue", c.context_scale),
              ("target", "one target block", "tab:orange", c.target_scale if c.strategy != "block" else None),
              ("target_union", "union of the targets", "tab:red", None)]
    bins = np.linspace(0, 1, 51)
    for ax, (key, label, colour, band) in zip(axes, panels):
        ax.hist(s[key], bins=bins, color=colour, alpha=0.8)
        if band is not None:
            ax.axvspan(band[0], band[1], color="grey", alpha=0.2, label=f"configured scale {band[0]:g}-{band[1]:g}")
            ax.legend(loc="upper left", fontsize="small")
        ax.axvline(float(np.mean(s[key])), color="black", linestyle=":", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_title(f"{label}\nmean {np.mean(s[key]):.0%} of the patches", fontsize="medium")
        ax.set_xlabel("fraction of the patch grid")
    axes[0].set_ylabel(f"count ({len(s['context'])} images)")
    return axes


# -- training curves --------------------------------------------------------------------------------

def _line(ax: Axes, gid: str, x, y, **kwargs):
    """The line of `ax` with this gid, updated to (x, y), or a new one."""
    for line in ax.get_lines():
        if line.get_gid() == gid:
            line.set_data(x, y)
            return line
    (line,) = ax.plot(x, y, gid=gid, **kwargs)
    return line


def _column(history: Iterable[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in history if r.get(key) is not None]
    return np.array([r["step"] for r in rows], dtype=float), np.array([r[key] for r in rows], dtype=float)


def _rescale(ax: Axes) -> None:
    ax.relim()
    ax.autoscale_view()


def _smoothed(y: np.ndarray, smooth: float) -> np.ndarray:
    """Exponential moving average with bias correction (as TensorBoard's), so early points are not dragged
    towards zero: ema_i / (1 - smooth^(i+1))."""
    out, acc = np.empty_like(y), 0.0
    for i, v in enumerate(y):
        acc = smooth * acc + (1 - smooth) * v
        out[i] = acc / (1 - smooth ** (i + 1))
    return out


def plot_loss(ax: Axes, history: Sequence[Mapping], key: str = "loss", smooth: float = 0.0,
              logy: bool = False) -> Axes:
    """Training loss against the optimiser step, from the metrics rows of `Trainer` (`history`).
    `smooth` in [0, 1) adds a bias-corrected exponential moving average of the loss on top of the raw curve."""
    x, y = _column(history, key)
    _line(ax, key, x, y, color="tab:blue", alpha=0.45 if smooth else 1.0, label=key)
    if smooth and len(y):
        _line(ax, key + "_ema", x, _smoothed(y, smooth), color="tab:blue", label=f"{key} (EMA {smooth:g})")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title("training loss")
    _rescale(ax)
    return ax


def schedule_curves(cfg, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
    """The per-step schedules of `train.schedule` over a run: {'step', 'lr', 'wd', 'momentum'} arrays."""
    from ijepa_viz.train import schedule

    warmup = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    steps = np.arange(total_steps + 1)
    vals = np.array([schedule(int(s), total_steps, warmup, cfg.optim, steps_per_epoch=steps_per_epoch)
                     for s in steps])
    return {"step": steps, "lr": vals[:, 0], "wd": vals[:, 1], "momentum": vals[:, 2]}


def plot_schedules(axes: Sequence[Axes], cfg, total_steps: int, steps_per_epoch: int,
                   step: Optional[int] = None) -> Sequence[Axes]:
    """The three per-iteration schedules of a run on axes[0..2]: learning rate (warmup, then cosine), weight
    decay (cosine up) and EMA momentum (linear to ema_end). `step` draws a marker at the current step."""
    curves = schedule_curves(cfg, total_steps, steps_per_epoch)
    specs = [("lr", "learning rate", "tab:blue"), ("wd", "weight decay", "tab:green"),
             ("momentum", "EMA momentum", "tab:purple")]
    for ax, (key, title, colour) in zip(axes, specs):
        _line(ax, key, curves["step"], curves[key], color=colour)
        if step is not None:
            _line(ax, "now", [step, step], [curves[key].min(), curves[key].max()], color="black",
                  linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        _rescale(ax)
    axes[2].ticklabel_format(axis="y", useOffset=False)
    return axes


def plot_collapse(ax: Axes, history: Sequence[Mapping]) -> Axes:
    """Collapse monitors against the step, from metrics rows.

    Left axis, each divided by its first reading so that both start at 1 (the legend gives that reading):
    'target_std' (std over the target tokens of the layer-normed targets, in every row) and, when present,
    'feature_std' (std of the L2-normalised, average-pooled target-encoder features of fixed test images).
    Right axis, when present: 'rankme', the effective rank of those features (1 to their width).
    A collapsed encoder maps every image to the same vector: the stds fall to 0 and RankMe to 1.
    """
    if not any(line.get_gid() == "zero" for line in ax.get_lines()):
        ax.axhline(0.0, color="grey", linewidth=0.8, gid="zero")
    for key, colour in (("target_std", "tab:red"), ("feature_std", "tab:orange")):
        x, y = _column(history, key)
        if len(x):
            first = y[0] if y[0] > 0 else 1.0
            line = _line(ax, key, x, y / first, color=colour, marker="." if key == "feature_std" else None)
            line.set_label(f"{key} / {first:.3g}")
    x, y = _column(history, "rankme")
    if len(x):
        twin = getattr(ax, "_ijepa_twin", None)
        if twin is None:
            twin = ax._ijepa_twin = ax.twinx()
            twin.set_ylabel("RankMe (effective rank)", color="tab:green")
        _line(twin, "rankme", x, y, color="tab:green", marker=".", label="rankme")
        _rescale(twin)
        twin.set_ylim(0, max(1.0, float(np.max(y))) * 1.15)  # from 0: a small wiggle should look small
    ax.set_xlabel("step")
    ax.set_ylabel("std / first value")
    ax.set_title("collapse monitors")
    if any(line.get_label()[:1] != "_" for line in ax.get_lines()):
        ax.legend(loc="lower left", fontsize="small")  # again: a monitor may have appeared since last time
    _rescale(ax)
    ax.set_ylim(bottom=min(-0.05, ax.get_ylim()[0]))
    return ax


# -- ablations --------------------------------------------------------------------------------------

def _rows(results) -> list[dict]:
    if isinstance(results, Mapping) and "rows" in results:
        return list(results["rows"])
    if isinstance(results, Mapping):  # {setting: accuracy}
        return [{"group": None, "setting": k, "linear": v} for k, v in results.items()]
    return list(results)


def _setting_key(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def plot_ablation_bars(ax: Axes, results, group: Optional[str] = None, metric: str = "linear",
                       paper: Optional[Mapping[str, Mapping[str, float]]] = PAPER_ABLATIONS,
                       label: str = "ours", baseline: Optional[float] = None) -> Axes:
    """Bars of our measured accuracy for each setting of one ablation `group` (e.g. 'mask.strategy'), with
    the paper's number for the same setting beside it (hatched) where the paper reports one.

    `results`: the JSON of benchmarks/results/ablations.json ({"rows": [{"group", "setting", "linear", "knn",
    "seeds"}, ...]}), a list of such rows, or a plain {setting: accuracy} dict. Accuracies in [0, 1] are
    shown as percentages. Our numbers come from tiny CPU runs and the paper's from 1% ImageNet-1k: compare
    the *ordering* of the settings, not the values. `baseline` (e.g. the same probe on the untrained network)
    draws a dashed line: a setting at or below it learned nothing the probe can use.
    """
    rows = _rows(results)
    if group is not None:
        rows = [r for r in rows if r.get("group") in (group, None)]
    if not rows:
        raise ValueError(f"no results for ablation group {group!r}")
    ours = {_setting_key(r["setting"]): float(r[metric]) for r in rows if r.get(metric) is not None}
    if ours and max(ours.values()) <= 1.0:
        ours = {k: 100 * v for k, v in ours.items()}
    ref = {_setting_key(k): v for k, v in ((paper or {}).get(group, {}) or {}).items()}
    order = [k for k in ref if k in ours] + [k for k in ours if k not in ref]
    x = np.arange(len(order))
    width = 0.38 if ref else 0.6
    bars = ax.bar(x - (width / 2 if ref else 0), [ours[k] for k in order], width, color="tab:blue",
                  label=f"{label} ({metric})")
    ax.bar_label(bars, fmt="%.1f", fontsize="small")
    if ref:
        vals = [ref.get(k, np.nan) for k in order]
        pbars = ax.bar(x + width / 2, vals, width, color="lightgrey", edgecolor="grey", hatch="//",
                       label="paper (1% IN-1k)")
        ax.bar_label(pbars, labels=["" if np.isnan(v) else f"{v:.1f}" for v in vals], fontsize="small")
    if baseline is not None:
        baseline = 100 * baseline if baseline <= 1.0 else baseline
        ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label=f"untrained ({baseline:.1f})")
    ax.set_xticks(x, order, fontsize="small")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(group or "ablation")
    if ref:
        ax.set_xlabel(PAPER_ABLATION_SOURCES.get(group, "paper"), fontsize="x-small")
    ax.set_ylim(0, max([*ours.values(), *ref.values(), baseline or 0.0, 1.0]) * 1.45)  # room for the legend
    ax.legend(fontsize="x-small", loc="upper right")
    return ax
