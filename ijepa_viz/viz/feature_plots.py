"""Draw layer of the feature notebooks: each `plot_*` function draws on the Axes it is given and returns it.

The arrays come from `ijepa_viz.viz.features` (the compute layer); `ijepa_viz.viz.feature_widgets` wires these
drawings to ipywidgets. Functions that need several Axes take a sequence of them (or a Figure, on which they
make their own grid) and return the array of Axes they drew on.

Images are accepted in any layout `plots.to_display` takes: uint8 (3, H, W) as `load_uint8` returns them, or
normalised floats with `mean` and `std`. Functions that take "a Figure" also take a `Figure.subfigures` panel,
so two models' drawings can sit side by side in one figure.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure, FigureBase

from ijepa_viz.viz.plots import to_display

__all__ = [
    "plot_similarity_map", "plot_error_map", "plot_pca_rgb", "plot_embedding_2d", "plot_retrieval",
    "plot_neighbours", "plot_probe_bars", "CLASS_COLOURS",
]

CLASS_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf")  # tab10


def _bare(ax: Axes, title: Optional[str]) -> Axes:
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize=9)
    return ax


def _axes(axes_or_fig, n_rows: int, n_cols: int) -> np.ndarray:
    """A (n_rows, n_cols) array of Axes: made on a Figure (or a SubFigure), or the given Axes reshaped."""
    if isinstance(axes_or_fig, FigureBase):
        return np.asarray(axes_or_fig.subplots(n_rows, n_cols, squeeze=False))
    axes = np.asarray(axes_or_fig, dtype=object).reshape(-1)
    if axes.size < n_rows * n_cols:
        raise ValueError(f"need {n_rows * n_cols} Axes ({n_rows} x {n_cols}), got {axes.size}")
    return axes[: n_rows * n_cols].reshape(n_rows, n_cols)


def _grid_overlay(ax: Axes, image, values: np.ndarray, cmap: str, vmin, vmax, alpha: float, colorbar: bool,
                  mean, std) -> Axes:
    img = to_display(image, mean, std)
    H, W = img.shape[:2]
    extent = (-0.5, W - 0.5, H - 0.5, -0.5)  # the patch grid stretched over the pixels
    ax.imshow(img, interpolation="nearest", extent=extent)
    values = np.ma.masked_invalid(np.asarray(values, dtype=np.float32))  # NaN (not a target) is transparent
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, alpha=alpha, interpolation="nearest", extent=extent)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
    return ax


def plot_similarity_map(ax: Axes, image, cos_map: np.ndarray, *, alpha: float = 0.75, cmap: str = "RdYlGn",
                        vmin: float = -1.0, vmax: float = 1.0, colorbar: bool = True, title: Optional[str] = None,
                        mean=None, std=None) -> Axes:
    """The image with each target patch coloured by the cosine similarity between the predictor's output and
    the target encoder's feature there (`PredictionMaps.cos`, (H, W) on the patch grid; NaN patches stay clear).

    Artists: 2 images (the picture, then the map) and, with `colorbar`, a colour bar on its own Axes.
    """
    _grid_overlay(ax, image, cos_map, cmap, vmin, vmax, alpha, colorbar, mean, std)
    return _bare(ax, "cosine(predicted, target)" if title is None else title)


def plot_error_map(ax: Axes, image, err_map: np.ndarray, *, alpha: float = 0.75, cmap: str = "magma",
                   vmin: float = 0.0, vmax: Optional[float] = None, colorbar: bool = True,
                   title: Optional[str] = None, mean=None, std=None) -> Axes:
    """The image with each target patch coloured by the prediction's squared error, averaged over features
    (`PredictionMaps.err`: the paper's L2 loss at that patch). `vmax` defaults to the map's largest value.

    Artists: as `plot_similarity_map`.
    """
    finite = np.asarray(err_map)[np.isfinite(err_map)]
    if vmax is None:
        vmax = float(finite.max()) if finite.size else 1.0
    _grid_overlay(ax, image, err_map, cmap, vmin, max(vmax, vmin + 1e-6), alpha, colorbar, mean, std)
    return _bare(ax, "squared error" if title is None else title)


def plot_pca_rgb(ax: Axes, rgb_grid: np.ndarray, *, image=None, alpha: float = 1.0,
                 background: str | tuple = (0.12, 0.12, 0.12), title: Optional[str] = None, mean=None,
                 std=None) -> Axes:
    """Patch features as colours (`features.pca_rgb`): (H, W, 3) on the patch grid, or (P, 3) for a square grid.

    NaN patches (e.g. no prediction there) show `background`, or `image` beneath when one is given;
    `alpha` < 1 blends the colours over `image`. Artists: 1 image, or 2 with `image`.
    """
    rgb = np.asarray(rgb_grid, dtype=np.float32)
    if rgb.ndim == 2:
        g = int(round(rgb.shape[0] ** 0.5))
        if g * g != rgb.shape[0]:
            raise ValueError(f"(P, 3) colours need a square number of patches, got P={rgb.shape[0]}")
        rgb = rgb.reshape(g, g, 3)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected colours of shape (H, W, 3) or (P, 3), got {rgb.shape}")
    finite = np.isfinite(rgb).all(-1)
    rgba = np.concatenate([np.nan_to_num(rgb), (finite * alpha)[..., None]], axis=-1).clip(0, 1)
    if image is not None:
        img = to_display(image, mean, std)
        H, W = img.shape[:2]
        extent = (-0.5, W - 0.5, H - 0.5, -0.5)
        ax.imshow(img, interpolation="nearest", extent=extent)
    else:
        H, W = rgb.shape[:2]
        extent = (-0.5, W - 0.5, H - 0.5, -0.5)
        ax.set_facecolor(background)
    ax.imshow(rgba, interpolation="nearest", extent=extent)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    return _bare(ax, title)


def plot_embedding_2d(ax: Axes, xy: np.ndarray, labels: Optional[Sequence[int]] = None,
                      class_names: Optional[Sequence[str]] = None, *, s: float = 8.0, alpha: float = 0.8,
                      legend: bool = True, title: Optional[str] = None) -> Axes:
    """A 2-D embedding (`pca_2d`, `tsne_2d`): one scatter per class, coloured by class, with a legend.

    Artists: one PathCollection per class present (a single one without `labels`).
    """
    xy = np.asarray(xy)
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=s, alpha=alpha, color=CLASS_COLOURS[0], linewidths=0)
    else:
        labels = np.asarray(labels)
        if len(labels) != len(xy):
            raise ValueError(f"{len(xy)} points but {len(labels)} labels")
        for c in np.unique(labels):
            name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
            sel = labels == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=s, alpha=alpha, linewidths=0, label=name,
                       color=CLASS_COLOURS[int(c) % len(CLASS_COLOURS)])
        if legend:
            ax.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title)
    return ax


def plot_retrieval(axes_or_fig, query, gallery, indices: Sequence[int], scores: Sequence[float], *,
                   labels: Optional[Sequence[int]] = None, class_names: Optional[Sequence[str]] = None,
                   query_label: Optional[int] = None, query_title: str = "query", mean=None, std=None
                   ) -> np.ndarray:
    """The query image, then its nearest gallery images (`features.similarity_search`) with their cosine scores.

    Args:
        axes_or_fig: k + 1 Axes, or a Figure (a row of k + 1 is made on it).
        query: one image; gallery: (N, 3, H, W) images; indices, scores: the ranking, best first.
        labels, class_names: name each neighbour's class; with `query_label` too, a neighbour's title is
            green when its class matches the query's and red when it does not.

    Returns: the (k + 1,) array of Axes; Axes i > 0 shows one image titled with its score (and class), its
    gallery index as the x label.
    """
    k = len(indices)
    axes = _axes(axes_or_fig, 1, k + 1).reshape(-1)
    _bare(axes[0], query_title)
    axes[0].imshow(to_display(query, mean, std), interpolation="nearest")
    for spine in axes[0].spines.values():
        spine.set_edgecolor("#1f77b4")
        spine.set_linewidth(3)
    for ax, i, sc in zip(axes[1:], indices, scores):
        ax.imshow(to_display(gallery[int(i)], mean, std), interpolation="nearest")
        name, colour = "", "black"
        if labels is not None:
            c = int(labels[int(i)])
            name = "\n" + (class_names[c] if class_names is not None and c < len(class_names) else str(c))
            if query_label is not None:
                colour = "#2ca02c" if c == int(query_label) else "#d62728"
        _bare(ax, f"cos {float(sc):.3f}{name}")
        ax.set_xlabel(f"#{int(i)}", fontsize=7)
        ax.title.set_color(colour)
    return axes


def plot_neighbours(axes_or_fig, neighbours, true_pixels: Optional[np.ndarray] = None,
                    rows: Optional[Sequence[int]] = None, *, row_labels: Optional[Sequence[str]] = None
                    ) -> np.ndarray:
    """For some predicted patches, the real bank patches nearest to the prediction (`features.nearest_patches`).

    Each row is one predicted patch: its true pixels first (when `true_pixels` (K, p, p, 3) is given), then the
    k nearest bank patches with their cosine scores: what the predictor "thinks is there".

    Args:
        axes_or_fig: a Figure (or SubFigure), or len(rows) x (k [+ 1]) Axes.
        neighbours: a `features.Neighbours` (index, score, pixels (K, k, p, p, 3)).
        rows: which of the K queries to show (default: all).

    Returns: the (len(rows), k [+ 1]) array of Axes.
    """
    rows = list(range(neighbours.index.shape[0])) if rows is None else list(rows)
    k = neighbours.index.shape[1]
    lead = 1 if true_pixels is not None else 0
    axes = _axes(axes_or_fig, len(rows), k + lead)
    for r, q in enumerate(rows):
        if lead:
            axes[r, 0].imshow(true_pixels[q], interpolation="nearest")
            _bare(axes[r, 0], "true" if r == 0 else None)
            for spine in axes[r, 0].spines.values():
                spine.set_edgecolor("#2ca02c")
                spine.set_linewidth(2.5)
            if row_labels is not None:
                axes[r, 0].set_ylabel(row_labels[r], fontsize=8)
        for j in range(k):
            ax = axes[r, lead + j]
            ax.imshow(neighbours.pixels[q, j], interpolation="nearest")
            _bare(ax, f"{neighbours.score[q, j]:.3f}")
            ax.title.set_fontsize(7)
    return axes


def _probe_rows(eval_result) -> list[Mapping]:
    rows = eval_result["rows"] if isinstance(eval_result, Mapping) else eval_result
    if not rows:
        raise ValueError("the evaluation result has no rows; pass what `ijepa_viz.evaluate.evaluate` returns")
    return list(rows)


def plot_probe_bars(ax: Axes, eval_result, probes: Sequence[str] = ("linear", "knn"), *,
                    title: Optional[str] = None, chance: Optional[float] = None) -> Axes:
    """Grouped bars of probe accuracy (%), one group per probe, one bar per encoder row of an `evaluate`
    result (I-JEPA's target encoder beside the random-init and raw-pixel baselines), each labelled.

    `chance` (a fraction, e.g. 0.1 for 10 classes) draws a dashed line. Artists: one BarContainer per row.
    """
    rows = _probe_rows(eval_result)
    probes = [p for p in probes if any(r.get(p) is not None for r in rows)]
    if not probes:
        raise ValueError("the evaluation result has none of the probes " + ", ".join(probes))
    x = np.arange(len(probes))
    width = 0.8 / len(rows)
    names = {"linear": "linear probe", "knn": "kNN (k=20)"}
    handles = []
    for i, r in enumerate(rows):
        vals = [100 * r[p] if r.get(p) is not None else np.nan for p in probes]
        colour = "#1f77b4" if i == 0 else ("#7f7f7f", "#c7c7c7", "#bcbd22", "#17becf")[(i - 1) % 4]
        bars = ax.bar(x + (i - (len(rows) - 1) / 2) * width, vals, width, label=r.get("name", f"row {i}"),
                      color=colour)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
        handles.append(bars)
    if chance is not None:
        handles.append(ax.axhline(100 * chance, color="k", linestyle="--", linewidth=0.8, label="chance"))
    ax.set_xticks(x, [names.get(p, p) for p in probes])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    if title is not None:
        ax.set_title(title)
    return ax
