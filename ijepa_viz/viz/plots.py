"""Matplotlib drawings for I-JEPA: each `plot_*` function draws on the Axes it is given and returns it.

Three layers: small *compute* helpers here turn masks, histories, features, configs and saved results into
arrays or sentences (`mask_fractions`, `mask_overlay`, `mask_size_samples`, `schedule_curves`,
`singular_value_shares`, `probe_readings`, `ablation_runs`, `ablation_findings`); the *draw* functions put them
on an Axes; `ijepa_viz.viz.widgets` *wires* them to ipywidgets.

Drawing functions that a widget redraws many times (`plot_masks`, `plot_loss`, `plot_collapse`,
`plot_schedules`) update their artists in place when they are called again on the same Axes, so a redraw
costs one canvas draw and no new artists.

Colours: the context is a light blue tint, target block m has colour `TARGET_COLOURS[m]`, and patches that
neither the context encoder nor the predictor ever sees are greyed out.

It stays one file because it is a catalogue of independent drawings that the notebooks and `widgets` reach
through the one `plots` namespace; each section (images and masks, training curves, RankMe, ablations) is
short, keeps its own helpers and reads top to bottom, so a split would add an import without making any
drawing easier to follow.
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
    "schedule_curves", "singular_value_shares", "probe_readings", "ablation_runs", "ablation_findings",
    "plot_image", "plot_masks", "plot_mask_histograms", "plot_loss", "plot_schedules", "plot_collapse",
    "plot_spectra", "plot_rankme_runs", "plot_ablation_bars", "plot_ablation_metric",
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


def _ema(y: np.ndarray, smooth: float) -> np.ndarray:
    """Exponential moving average with bias correction, ema_i / (1 - smooth^(i+1)), so the first points are
    not dragged towards zero."""
    out, acc = np.empty(len(y), dtype=float), 0.0
    for i, v in enumerate(y):
        acc = smooth * acc + (1 - smooth) * v
        out[i] = acc / (1 - smooth ** (i + 1))
    return out


def _capped_smooth(n: int, smooth: float, max_window_fraction: float = 0.05) -> float:
    """`smooth` lowered so that the EMA's time constant 1 / (1 - smooth) is at most max_window_fraction * n
    points; 0 (no smoothing) for fewer than 3 points."""
    if n < 3:
        return 0.0
    return min(float(smooth), max(0.0, 1.0 - 1.0 / (max_window_fraction * n)))


def _smoothed(y: np.ndarray, smooth: float, max_window_fraction: float = 0.05) -> np.ndarray:
    """A zero-lag smoothing of y: the bias-corrected EMA run forwards, then backwards over the result.

    A one-way EMA lags: on a falling loss it sits *above* the raw curve everywhere, by about the fall over its
    time constant 1 / (1 - smooth) points. Running it back over its own output cancels that lag, so the smoothed
    curve goes through the middle of the raw one. Both ends are padded with the curve mirrored through its end
    point (as scipy's filtfilt does), so a straight line stays straight up to the ends. The time constant is
    capped at `max_window_fraction` of the points (a twentieth): any symmetric average sits above a sharp,
    convex drop such as a loss's first steps, and a short window keeps that bend; a curve of 20 points or fewer
    is returned as it is.
    """
    y = np.asarray(y, dtype=float)
    n = len(y)
    smooth = _capped_smooth(n, smooth, max_window_fraction)
    if smooth <= 0:
        return y.copy()
    pad = min(n - 1, int(np.ceil(3 / (1 - smooth))))
    ext = np.concatenate([2 * y[0] - y[pad:0:-1], y, 2 * y[-1] - y[-2:-pad - 2:-1]])
    out = _ema(_ema(ext, smooth)[::-1], smooth)[::-1]
    return out[pad:pad + n]


def plot_loss(ax: Axes, history: Sequence[Mapping], key: str = "loss", smooth: float = 0.0,
              logy: bool = False) -> Axes:
    """Training loss against the optimiser step, from the metrics rows of `Trainer` (`history`).

    `smooth` in [0, 1) adds a smoothed curve on top of the raw one: an exponential moving average with that
    factor, run forwards and then backwards so that it does not lag behind a falling loss (`_smoothed`), with
    its time constant capped at a twentieth of the points. Log every step (train.log_every=1) for a curve worth
    smoothing: a handful of points is drawn as it is."""
    x, y = _column(history, key)
    _line(ax, key, x, y, color="tab:blue", alpha=0.45 if smooth else 1.0, label=key)
    used = _capped_smooth(len(y), smooth) if smooth else 0.0
    if used > 0:
        _line(ax, key + "_ema", x, _smoothed(y, smooth), color="tab:blue",
              label=f"{key}, smoothed (EMA {used:.2g} both ways)")
    if logy:
        ax.set_yscale("log")
    if used > 0:
        ax.legend(loc="upper right", fontsize="small")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title("training loss")
    _rescale(ax)
    return ax


def schedule_curves(cfg, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
    """The per-step schedules of `schedules.schedule` over a run: {'step', 'lr', 'wd', 'momentum'} arrays."""
    from ijepa_viz.schedules import schedule

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


# -- what RankMe measures ---------------------------------------------------------------------------

def singular_value_shares(features) -> np.ndarray:
    """The singular values s_k of a batch of features (N, D), as shares p_k = s_k / sum(s), largest first.

    RankMe (`ijepa_viz.model.rankme`) is exp(-sum_k p_k log p_k), the exponential of the entropy of these
    shares: 1 when one direction holds everything (every image maps to about the same vector, collapse), and
    min(N, D) when all directions share equally."""
    x = torch.as_tensor(features).float().reshape(-1, torch.as_tensor(features).shape[-1])
    s = torch.linalg.svdvals(x).double().numpy()
    return s / max(s.sum(), 1e-30)


def plot_spectra(ax: Axes, features: Mapping[str, object], max_k: Optional[int] = None) -> Axes:
    """One curve per named batch of features: the share p_k of the k-th singular value (log scale) against k,
    with its RankMe in the legend. A healthy encoder spreads the shares over many directions (a slowly falling
    curve); a collapsed one puts nearly everything in the first (a curve that drops by orders of magnitude
    after k = 1)."""
    from ijepa_viz.model import rankme

    for i, (name, feats) in enumerate(features.items()):
        p = singular_value_shares(feats)
        k = np.arange(1, len(p) + 1)
        if max_k is not None:
            k, p = k[:max_k], p[:max_k]
        dim = torch.as_tensor(feats).shape[-1]
        ax.plot(k, np.maximum(p, 1e-12), marker="." if len(k) <= 40 else None, color=f"C{i}",
                label=f"{name}: RankMe {rankme(feats):.1f} of {dim}")
    ax.set_yscale("log")
    ax.set_xlabel("k (singular values, largest first)")
    ax.set_ylabel("share p_k = s_k / sum(s)")
    ax.set_title("singular values of a batch of pooled features")
    ax.legend(fontsize="small", loc="upper right")
    return ax


def probe_readings(history: Sequence[Mapping], every: int, key: str = "probe_rankme") -> tuple[np.ndarray, np.ndarray]:
    """The collapse checks of a run from its metrics rows: (steps, values) of `key` at step 0 and every
    `every` steps (train.collapse_every). The Trainer repeats its latest check in every row; the rows before
    the first multiple of `every` carry step 0's reading (the untrained network's)."""
    rows = [r for r in history if r.get(key) is not None]
    if not rows or every < 1:
        return np.array([]), np.array([])
    pts = [(0, rows[0][key])] if rows[0]["step"] < every else []
    pts += [(r["step"], r[key]) for r in rows if r["step"] % every == 0]
    steps, values = zip(*pts)
    return np.array(steps, dtype=float), np.array(values, dtype=float)


def plot_rankme_runs(ax: Axes, runs: Mapping[str, Sequence[Mapping]], every: int,
                     collapse_line: Optional[float] = None) -> Axes:
    """The probe RankMe of several runs against the step (`probe_readings`), one line each, e.g. EMA on and
    off. `collapse_line` draws the RankMe below which a run counts as collapsed."""
    for i, (name, history) in enumerate(runs.items()):
        x, y = probe_readings(history, every)
        ax.plot(x, y, marker=".", color=f"C{i}", label=f"{name} (last {y[-1]:.2f})" if len(y) else name)
    if collapse_line is not None:
        ax.axhline(collapse_line, color="grey", linestyle=":", linewidth=1,
                   label=f"collapsed below {collapse_line:g}")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("step")
    ax.set_ylabel("RankMe of a fixed batch")
    ax.set_title("effective rank of the target features")
    ax.legend(fontsize="small")
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


def _per_seed(row: Mapping, metric: str) -> list[float]:
    """The per-seed values of `metric` in a row ('<metric>_per_seed'), else the row's one value."""
    values = row.get(f"{metric}_per_seed")
    return [float(v) for v in values] if values else [float(row[metric])]


def _seed_errorbars(ax: Axes, x, per_seed: Sequence[Sequence[float]], scale: float = 1.0) -> bool:
    """Min-max bars over seeds and a dot per seed, at positions x; False (nothing drawn) for single seeds."""
    if all(len(v) < 2 for v in per_seed):
        return False
    lo = np.array([scale * min(v) for v in per_seed])
    hi = np.array([scale * max(v) for v in per_seed])
    mean = np.array([scale * float(np.mean(v)) for v in per_seed])
    n = max(len(v) for v in per_seed)
    ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], fmt="none", ecolor="black", elinewidth=1, capsize=3,
                label=f"range over {n} seeds")
    for xi, v in zip(x, per_seed):
        ax.plot([xi] * len(v), [scale * u for u in v], linestyle="none", marker=".", color="black", markersize=3)
    return True


def _label_tops(ax: Axes, x, values, tops, fmt: str) -> None:
    """Write each value just above its top (the bar, or the highest seed when error bars are drawn)."""
    for xi, v, t in zip(x, values, tops):
        ax.annotate(fmt.format(v), (xi, t), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                    fontsize="small")


def plot_ablation_bars(ax: Axes, results, group: Optional[str] = None, metric: str = "linear",
                       paper: Optional[Mapping[str, Mapping[str, float]]] = PAPER_ABLATIONS,
                       label: str = "ours", baseline: Optional[float] = None, seed_range: bool = True) -> Axes:
    """Bars of our measured accuracy for each setting of one ablation `group` (e.g. 'mask.strategy'), with
    the paper's number for the same setting beside it (hatched) where the paper reports one.

    `results`: the JSON of benchmarks/results/ablations.json ({"rows": [{"group", "setting", "linear", "knn",
    "seeds", "linear_per_seed", ...}, ...]}), a list of such rows, or a plain {setting: accuracy} dict.
    Accuracies in [0, 1] are shown as percentages. A bar is the mean over seeds; with `seed_range` and rows
    that carry '<metric>_per_seed', an error bar spans the lowest to the highest seed and a dot marks each
    seed. Our numbers come from tiny CPU runs and the paper's from 1% ImageNet-1k: compare the *ordering* of
    the settings, not the values. `baseline` (the same probe on the untrained network) draws a dashed line: a
    setting at or below it learned nothing the probe can use.
    """
    rows = _rows(results)
    if group is not None:
        rows = [r for r in rows if r.get("group") in (group, None)]
    rows = [r for r in rows if r.get(metric) is not None]
    if not rows:
        raise ValueError(f"no results for ablation group {group!r}")
    scale = 100.0 if max(float(r[metric]) for r in rows) <= 1.0 else 1.0
    ours = {_setting_key(r["setting"]): scale * float(r[metric]) for r in rows}
    seeds = {_setting_key(r["setting"]): _per_seed(r, metric) for r in rows}
    ref = {_setting_key(k): v for k, v in ((paper or {}).get(group, {}) or {}).items()}
    order = [k for k in ref if k in ours] + [k for k in ours if k not in ref]
    x = np.arange(len(order))
    width = 0.38 if ref else 0.6
    xo = x - (width / 2 if ref else 0)
    ax.bar(xo, [ours[k] for k in order], width, color="tab:blue", label=f"{label} ({metric})")
    drawn = seed_range and _seed_errorbars(ax, xo, [seeds[k] for k in order], scale)
    tops = [max(ours[k], scale * max(seeds[k])) if drawn else ours[k] for k in order]
    _label_tops(ax, xo, [ours[k] for k in order], tops, "{:.1f}")
    top = max(tops)
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
    ax.set_ylim(0, max([top, *ref.values(), baseline or 0.0, 1.0]) * 1.45)  # room for the legend
    ax.legend(fontsize="x-small", loc="upper right")
    return ax


def ablation_runs(results) -> list[tuple[str, dict]]:
    """The distinct runs of an ablation table as (label, row), each once.

    Every group's first setting is the paper's choice, the same base run: rows with the same per-seed numbers
    as an earlier row are that run again and are left out. The base run is labelled 'base (<its settings>)',
    the others '<field>=<setting>' (e.g. 'strategy=block')."""
    def key(r):
        return tuple(tuple(_per_seed(r, m)) for m in ("linear", "knn", "rankme") if r.get(m) is not None)

    seen: dict[tuple, int] = {}
    out: list[tuple[str, dict]] = []
    base_names: list[str] = []
    for r in _rows(results):
        k = key(r)
        field = str(r.get("group") or "").split(".")[-1] or "setting"
        if k in seen:
            if seen[k] == 0:
                base_names.append(_setting_key(r["setting"]))
            continue
        seen[k] = len(out)
        if not out:
            base_names.append(_setting_key(r["setting"]))
        out.append((f"{field}={_setting_key(r['setting'])}", dict(r)))
    if out:
        out[0] = (f"base ({', '.join(base_names)})", out[0][1])
    return out


def plot_ablation_metric(ax: Axes, results, metric: str = "rankme", baseline: Optional[float] = None,
                         threshold: Optional[float] = None, ylabel: Optional[str] = None) -> Axes:
    """One bar per distinct run (`ablation_runs`) for `metric`, e.g. 'rankme' (the effective rank of the test
    features), with min-max error bars over seeds; `baseline` (the untrained network's value) draws a dashed
    line and `threshold` (e.g. the RankMe below which features count as collapsed) a dotted red one."""
    runs = [(name, r) for name, r in ablation_runs(results) if r.get(metric) is not None]
    if not runs:
        raise ValueError(f"no run has a {metric!r} value")
    x = np.arange(len(runs))
    vals = [float(r[metric]) for _, r in runs]
    ax.bar(x, vals, 0.6, color=["tab:red" if threshold is not None and v < threshold else "tab:blue" for v in vals],
           label=f"{metric} (mean over seeds)")
    per_seed = [_per_seed(r, metric) for _, r in runs]
    _seed_errorbars(ax, x, per_seed)
    tops = [max(v, max(p)) for v, p in zip(vals, per_seed)]
    _label_tops(ax, x, vals, tops, "{:.2f}")
    top = max(tops)
    if baseline is not None:
        ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label=f"untrained ({baseline:.2f})")
    if threshold is not None:
        ax.axhline(threshold, color="tab:red", linestyle=":", linewidth=1, label=f"collapsed below {threshold:g}")
    ax.set_xticks(x, [name for name, _ in runs], fontsize="small", rotation=20, ha="right")
    ax.set_ylabel(ylabel or metric)
    ax.set_ylim(0, max(top, baseline or 0.0, threshold or 0.0) * 1.35)
    ax.legend(fontsize="x-small", loc="upper right")
    return ax


# Likely reasons for a small-scale result that disagrees with the paper, by ablation group. `ablation_findings`
# adds one only where our ordering differs from the paper's; {scale} is the caller's description of the runs.
ABLATION_REASONS = {
    "mask.strategy": (
        "Likely reason: scale. With {scale}, a quadrant and four small target blocks differ by a few patches, "
        "and the encoders are still close to where they started (see the untrained line): differences of a point "
        "or two decide the order. The paper's gap comes from 14 x 14 grids of 224 px "
        "ImageNet images after 300 epochs, where multi-block targets cover object parts."),
    "model.target": (
        "Likely reason: training length. Representation targets come from the EMA target encoder, which starts "
        "random and moves slowly, so after {scale} the network still predicts mostly random features, while pixel "
        "targets are informative from the first step. The paper's advantage of representations appears after "
        "500 epochs of a ViT-L/16."),
    "mask.num_targets": (
        "Likely reason: with {scale} the runs are too short and too small for the number of targets to matter "
        "beyond noise; the paper measures 300 epochs of a ViT-B/16."),
}


def ablation_findings(results, baseline: Optional[float] = None, n_test: Optional[int] = None,
                      metric: str = "linear", paper: Optional[Mapping[str, Mapping[str, float]]] = PAPER_ABLATIONS,
                      scale: str = "runs this small", dim: Optional[int] = None,
                      reasons: Mapping[str, str] = ABLATION_REASONS) -> list[str]:
    """Sentences computed from an ablation table: what beats the untrained network, and for each group
    whether our ordering agrees with the paper's, with the likely reason where it does not.

    Two settings are called apart when their means differ by more than the noise: two standard errors of the
    difference of two accuracies on `n_test` test images (`verdicts.probe_noise`; 0 when n_test is None) plus
    the larger spread between seeds of the two. `baseline`: the untrained network's accuracy. `dim`: the
    feature width, for the collapse sentence of groups the paper does not ablate (by their RankMe).
    """
    from ijepa_viz.viz.verdicts import collapse_verdict, probe_noise

    rows = [r for r in _rows(results) if r.get(metric) is not None]
    pct = 100.0 if max(float(r[metric]) for r in rows) <= 1.0 else 1.0

    def noise(a: Sequence[float], b: Sequence[float]) -> float:
        spread = pct * max(max(a) - min(a), max(b) - min(b))
        pa, pb = float(np.mean(a)) * pct / 100, float(np.mean(b)) * pct / 100
        return probe_noise(pa, pb, n_test, spread) if n_test else spread

    out: list[str] = []
    name = {"linear": "linear probe", "knn": "kNN"}.get(metric, metric)
    if baseline is not None:
        base = float(baseline) * (100.0 if baseline <= 1.0 else 1.0)
        above, level, below = [], [], []
        for label, r in ablation_runs(rows):
            seeds = _per_seed(r, metric)
            d = pct * float(np.mean(seeds)) - base
            n = noise(seeds, [base / pct])
            (above if d > n else below if d < -n else level).append(f"{label} {d:+.1f}")
        total = len(above) + len(level) + len(below)
        text = (f"Against the untrained network ({base:.1f}%, {name}): {len(above)} of {total} runs beat it by more "
                f"than the noise")
        text += f" ({'; '.join(above)} points)" if above else ""
        if level:
            text += f", {len(level)} {'is' if len(level) == 1 else 'are'} level with it ({'; '.join(level)})"
        if below:
            text += f", {len(below)} {'is' if len(below) == 1 else 'are'} below it ({'; '.join(below)})"
        out.append(text + ".")

    groups = list(dict.fromkeys(r.get("group") for r in rows))
    for g in groups:
        gr = [r for r in rows if r.get("group") == g]
        ours = {_setting_key(r["setting"]): pct * float(r[metric]) for r in gr}
        seeds = {_setting_key(r["setting"]): _per_seed(r, metric) for r in gr}
        ref = {_setting_key(k): v for k, v in ((paper or {}).get(g, {}) or {}).items() if _setting_key(k) in ours}
        best = max(ours, key=ours.get)
        if len(ref) >= 2:
            pbest = max(ref, key=ref.get)
            others = ", ".join(f"{k}: {v:.1f}%" for k, v in ref.items() if k != pbest)
            if best == pbest:
                second = max((k for k in ours if k != best), key=ours.get)
                d, n = ours[best] - ours[second], noise(seeds[best], seeds[second])
                firm = "more than the noise" if d > n else "less than the noise, so the order is not firm"
                out.append(f"{g}: as in the paper ({pbest}: {ref[pbest]:.1f}% against {others}), {pbest} comes first "
                           f"here: {ours[best]:.1f}%, {d:.1f} points above {second}, {firm} (±{n:.1f}).")
            else:
                d, n = ours[best] - ours[pbest], noise(seeds[best], seeds[pbest])
                firm = ("more than the noise" if d > n else
                        f"within the noise (±{n:.1f}), so more seeds could reverse it")
                text = (f"{g}: DISAGREES with the paper. The paper ranks {pbest} first ({pbest}: {ref[pbest]:.1f}% against "
                        f"{others}); here {best} scores highest, {ours[best]:.1f}% against {ours[pbest]:.1f}% for "
                        f"{pbest}: {d:.1f} points, {firm}.")
                if g in reasons:
                    text += " " + reasons[g].format(scale=scale)
                out.append(text)
        elif any(r.get("rankme") is not None for r in gr):
            parts = []
            for r in gr:
                verdict = collapse_verdict(float(r["rankme"]), dim) if dim else f"RankMe {float(r['rankme']):.2f}"
                parts.append(f"{g}={_setting_key(r['setting'])}: {verdict.split('. ')[0]}")
            text = f"{g} (not in the paper's tables): " + "; ".join(parts) + "."
            if len(gr) == 2:
                a, b = (_setting_key(r["setting"]) for r in gr)
                d, n = ours[a] - ours[b], noise(seeds[a], seeds[b])
                if abs(d) <= n:
                    text += (f" The {name} does not tell them apart ({ours[a]:.1f}% against {ours[b]:.1f}%, within "
                             f"±{n:.1f}): it standardises every feature dimension, so it still reads the small "
                             f"variations left around the one dominant direction. RankMe shows the collapse; "
                             f"the accuracy does not.")
                else:
                    text += f" {name}: {ours[a]:.1f}% against {ours[b]:.1f}%."
            out.append(text)
    return out
