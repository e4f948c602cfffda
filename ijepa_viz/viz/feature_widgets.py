"""ipywidgets apps of the feature notebooks: the prediction explorer (04), the embedding explorer (05) and the
similarity search (07), plus `notebook_model`, the model those notebooks load.

The *wire* layer of STYLE.md: each app only connects controls to `ijepa_viz.viz.features` (compute) and
`ijepa_viz.viz.feature_plots` (draw), and is an ipywidgets box. Figures are plain Agg `Figure`s rendered to a PNG
in an `ipywidgets.Image`, as in `ijepa_viz.viz.widgets`, so JupyterLab shows them without any extension.

Every app has `controls` (name -> widget), `image_widget` (the PNG), `summary` (an HTML line of numbers),
`redraw()` and `redraw_times` (seconds per redraw); changing a control redraws.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import ipywidgets as widgets
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ijepa_viz.config import Config
from ijepa_viz.masks import MaskCollator
from ijepa_viz.model import IJEPA
from ijepa_viz.viz import feature_plots as fp
from ijepa_viz.viz import features as fx
from ijepa_viz.viz import plots
from ijepa_viz.viz.widgets import NOTEBOOK_CHECKPOINT, RUNS_DIR, figure_png, image_from_bytes, notebook_config

__all__ = [
    "PredictionExplorer", "prediction_explorer", "EmbeddingExplorer", "embedding_explorer",
    "SimilaritySearch", "similarity_search_app", "notebook_model", "untrained_model",
]


def _figure(width_in: float, height_in: float, dpi: int = 100) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _error_html(msg: str) -> str:
    msg = msg.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return f'<div style="color:#b00020;border:1px solid #b00020;padding:4px 8px">{msg}</div>'


class _App(widgets.VBox):
    """Shared wiring: a PNG, a summary line, an error line, and a redraw on every control change."""

    def _setup(self, controls: dict, panel: list, size_px: tuple[int, int]) -> None:
        self.controls = controls
        self.redraw_times: list[float] = []
        self.image_widget = widgets.Image(format="png", width=size_px[0])
        self.summary = widgets.HTML()
        self.error = widgets.HTML()
        super().__init__([*panel, self.image_widget, self.summary, self.error])
        for w in controls.values():
            if isinstance(w, widgets.ValueWidget) and not isinstance(w, widgets.FileUpload):
                w.observe(lambda change: self.redraw(), names="value")

    def redraw(self) -> None:
        t0 = time.perf_counter()
        try:
            self._draw()
            self.error.value = ""
        except (ValueError, RuntimeError) as e:  # a bad upload or an impossible setting: say so, keep going
            self.error.value = _error_html(str(e))
        self.redraw_times.append(time.perf_counter() - t0)

    def _draw(self) -> None:  # pragma: no cover - each app defines it
        raise NotImplementedError


# -- notebook 04: the prediction explorer --------------------------------------------------------------

class PredictionExplorer(_App):
    """What the predictor predicts on one image, for the trained and the untrained model. See
    `prediction_explorer`. Also keeps `maps` (the last `features.PredictionMaps`) and `masks`."""

    def __init__(self, trained: IJEPA, untrained: Optional[IJEPA], images: torch.Tensor, cfg: Config,
                 size_px: int = 1150):
        self.models = {"trained": trained} if untrained is None else {"trained": trained, "untrained": untrained}
        self.images, self.cfg = images, cfg
        self.maps: Optional[fx.PredictionMaps] = None
        M = cfg.mask.num_targets
        c = {
            "index": widgets.IntSlider(0, min=0, max=len(images) - 1, description="image",
                                       continuous_update=False),
            "seed": widgets.IntSlider(0, min=0, max=999, description="mask seed", continuous_update=False),
            "resample": widgets.Button(description="new masks", icon="refresh", tooltip="mask seed + 1"),
            "block": widgets.Dropdown(options=[("all blocks", -1)] + [(f"block {m + 1}", m) for m in range(M)],
                                      value=-1, description="target"),
            "model": widgets.ToggleButtons(options=list(self.models), value="trained", description="checkpoint"),
        }
        c["resample"].on_click(lambda _: setattr(c["seed"], "value", (c["seed"].value + 1) % 1000))
        panel = [widgets.HBox([c["index"], c["seed"], c["resample"]]), widgets.HBox([c["block"], c["model"]])]
        self._setup(c, panel, (size_px, 0))
        self.redraw()

    def _maps(self, model: IJEPA, masks) -> fx.PredictionMaps:
        block = self.controls["block"].value
        image = self.images[self.controls["index"].value]
        return fx.prediction_maps(model, image, masks, None if block < 0 else block, cfg=self.cfg)

    def _position_mean(self, model: IJEPA):
        """Each position's mean target feature over `images` (removed before the PCA colours, so they show
        content, not position); 0 for a model that predicts pixels."""
        if model.pixel_head is not None:
            return 0
        return fx.embed(model, self.images, self.cfg, pool="none", normalize=True).mean(0)

    def _draw(self) -> None:
        c = self.controls
        collator = MaskCollator(self.cfg.mask, self.cfg.grid_size, seed=c["seed"].value)
        self.masks = collator.sample(1, step=0)
        all_maps = {name: self._maps(m, self.masks) for name, m in self.models.items()}
        maps = self.maps = all_maps[c["model"].value]
        image = self.images[c["index"].value]
        pos = self._position_mean(self.models[c["model"].value])  # (P, D), or 0
        at = pos[maps.patch] if torch.is_tensor(pos) else 0
        # colours fitted on the true target features of the whole image, so prediction and truth compare
        rgb = fx.pca_rgb(torch.cat([maps.target - at, maps.pred - at]), fit_on=maps.all_targets - pos)
        K, grid = len(maps.patch), self.masks.grid
        fig = _figure(11.5, 2.6)
        axes = fig.subplots(1, 5)
        plots.plot_masks(axes[0], image, self.masks, title="masks")
        axes[0].title.set_fontsize(9)
        fp.plot_similarity_map(axes[1], image, maps.cos)
        fp.plot_error_map(axes[2], image, maps.err)
        fp.plot_pca_rgb(axes[3], fx.to_grid(rgb[:K], maps.patch, grid), title="true targets, PCA→RGB")
        fp.plot_pca_rgb(axes[4], fx.to_grid(rgb[K:], maps.patch, grid), title="predicted, same colours")
        fig.subplots_adjust(left=0.01, right=0.99, wspace=0.3, top=0.88, bottom=0.03)
        self.image_widget.value = figure_png(fig)
        self.summary.value = " &nbsp;·&nbsp; ".join(
            f"<b>{name}</b>: mean cosine {m.mean_cos:.3f}, mean squared error {m.mean_err:.3f}"
            for name, m in all_maps.items()) + f" &nbsp;·&nbsp; {K} target patches"


def prediction_explorer(trained_model: IJEPA, untrained_model: Optional[IJEPA], images: torch.Tensor,
                        cfg: Config, size_px: int = 1150) -> PredictionExplorer:
    """Compare the predictor's output with the target encoder's on one image.

    Controls: `index` (which of `images`), `seed` and `resample` (new masks), `block` (one target block or
    all), `model` ('trained' / 'untrained': the same image and masks through the other checkpoint). The figure
    shows the masks, the cosine-similarity and error maps, and PCA->RGB of the true and the predicted target
    features in shared colours (after `features.remove_position` with the mean over `images`); the summary
    line gives both checkpoints' mean cosine and error.

    Args:
        images: uint8 (N, 3, H, W) at `cfg.model.img_size`, normalised with `cfg.data`'s statistics.
        untrained_model: e.g. `untrained_model(cfg)`; None hides the comparison.
    """
    return PredictionExplorer(trained_model, untrained_model, images, cfg, size_px)


# -- notebook 05: the embedding explorer ---------------------------------------------------------------

class EmbeddingExplorer(_App):
    """PCA and t-SNE of pooled target-encoder features, coloured by class. See `embedding_explorer`.
    Keeps `xy` ({'pca': (n, 2), 'tsne': (n, 2)}) of the last redraw."""

    def __init__(self, models: Mapping[str, IJEPA], images: torch.Tensor, labels, cfg: Config,
                 class_names: Optional[Sequence[str]] = None, points: int = 500, perplexity: float = 30,
                 size_px: int = 1000):
        self.models, self.images, self.cfg = dict(models), images, cfg
        self.labels = np.asarray(labels)
        self.class_names = class_names
        self.xy: dict = {}
        n = len(images)
        step = max(1, min(50, n // 10))
        c = {
            "model": widgets.Dropdown(options=list(self.models), description="checkpoint"),
            "points": widgets.IntSlider(min(points, n), min=min(10, n), max=n, step=step, description="points",
                                        continuous_update=False),
            "perplexity": widgets.IntSlider(int(perplexity), min=2, max=100, description="perplexity",
                                            continuous_update=False),
        }
        self._setup(c, [widgets.HBox([c["model"], c["points"], c["perplexity"]])], (size_px, 0))
        self.redraw()

    def _draw(self) -> None:
        c = self.controls
        n = c["points"].value
        t0 = time.perf_counter()
        feats = fx.embed(self.models[c["model"].value], self.images[:n], self.cfg)  # (n, D), cached
        t1 = time.perf_counter()
        self.xy = {"pca": fx.pca_2d(feats), "tsne": fx.tsne_2d(feats, perplexity=c["perplexity"].value)}
        t2 = time.perf_counter()
        fig = _figure(10, 4.2)
        axes = fig.subplots(1, 2)
        fp.plot_embedding_2d(axes[0], self.xy["pca"], self.labels[:n], self.class_names, legend=False,
                             title="PCA (2 components)")
        fp.plot_embedding_2d(axes[1], self.xy["tsne"], self.labels[:n], self.class_names,
                             title=f"t-SNE (perplexity {c['perplexity'].value})")
        fig.subplots_adjust(left=0.02, right=0.84, wspace=0.08, top=0.9, bottom=0.03)
        self.image_widget.value = figure_png(fig)
        self.summary.value = (f"{n} test images through the <b>{c['model'].value}</b> target encoder "
                              f"(average-pooled): features {t1 - t0:.1f} s, PCA + t-SNE {t2 - t1:.1f} s "
                              f"(both cached: moving back is instant)")


def embedding_explorer(models: Mapping[str, IJEPA] | IJEPA, images: torch.Tensor, labels, cfg: Config,
                       class_names: Optional[Sequence[str]] = None, points: int = 500, perplexity: float = 30,
                       size_px: int = 1000) -> EmbeddingExplorer:
    """PCA and t-SNE of average-pooled target-encoder features (what the paper evaluates), coloured by class.

    Controls: `model` (which checkpoint of `models`, e.g. {'trained': ..., 'untrained': ...}), `points` (the
    first n of `images`), `perplexity` (t-SNE). Features and layouts are cached, so revisiting a setting is
    instant. `images`: uint8 (N, 3, H, W); `labels`: (N,) class ids.
    """
    if isinstance(models, IJEPA):
        models = {"trained": models}
    return EmbeddingExplorer(models, images, labels, cfg, class_names, points, perplexity, size_px)


# -- notebook 07: similarity search --------------------------------------------------------------------

class SimilaritySearch(_App):
    """Top-k gallery neighbours of a query image by cosine similarity of pooled target-encoder features.
    See `similarity_search_app`. Keeps `gallery_feats` (N, D), `query` (the query image) and `result`
    ((indices, scores) of the last search)."""

    def __init__(self, model: IJEPA, gallery: torch.Tensor, cfg: Config, labels=None,
                 class_names: Optional[Sequence[str]] = None, k: int = 8, size_px: int = 1100):
        self.model, self.gallery, self.cfg = model, gallery, cfg
        self.labels = None if labels is None else np.asarray(labels)
        self.class_names = class_names
        self.gallery_feats = fx.embed(model, gallery, cfg)  # (N, D), cached
        self.uploaded: Optional[torch.Tensor] = None
        self.query: Optional[torch.Tensor] = None
        self.result = None
        c = {
            "source": widgets.ToggleButtons(options=["gallery"], value="gallery", description="query"),
            "index": widgets.IntSlider(0, min=0, max=len(gallery) - 1, description="index",
                                       continuous_update=False),
            "upload": widgets.FileUpload(accept="image/*", multiple=False, description="upload"),
            "k": widgets.IntSlider(min(k, len(gallery) - 1), min=1, max=min(16, len(gallery) - 1),
                                   description="top k", continuous_update=False),
        }
        c["upload"].observe(self._on_upload, names="value")
        panel = [widgets.HBox([c["source"], c["index"], c["upload"]]), c["k"]]
        self._setup(c, panel, (size_px, 0))
        self.redraw()

    def _on_upload(self, change) -> None:
        files = change["new"]
        if not files:
            return
        try:
            self.uploaded = image_from_bytes(files[0]["content"], size=self.cfg.model.img_size)
        except Exception as e:  # PIL raises several types for a file that is not an image
            self.error.value = _error_html(f"could not read {files[0].get('name', 'the upload')!r} as an "
                                           f"image ({type(e).__name__}: {e}); upload a PNG or JPEG")
            return
        src = self.controls["source"]
        if "upload" not in src.options:
            src.options = ["gallery", "upload"]
        if src.value == "upload":
            self.redraw()
        else:
            src.value = "upload"  # redraws

    def _draw(self) -> None:
        c = self.controls
        from_gallery = c["source"].value == "gallery"
        if from_gallery:
            i = c["index"].value
            self.query, qfeat, exclude = self.gallery[i], self.gallery_feats[i], i
        else:
            self.query, exclude = self.uploaded, None
            qfeat = fx.embed(self.model, self.uploaded[None], self.cfg)[0]
        k = c["k"].value
        self.result = fx.similarity_search(self.gallery_feats, qfeat, k=k, exclude=exclude)
        qlabel = None if self.labels is None or not from_gallery else int(self.labels[c["index"].value])
        fig = _figure(1.15 * (k + 1), 1.7)
        fp.plot_retrieval(fig, self.query, self.gallery, *self.result, labels=self.labels,
                          class_names=self.class_names, query_label=qlabel)
        fig.subplots_adjust(left=0.01, right=0.99, wspace=0.1, top=0.72, bottom=0.02)
        self.image_widget.value = figure_png(fig)
        same = ""
        if qlabel is not None:
            hits = int((self.labels[self.result[0]] == qlabel).sum())
            same = f" &nbsp;·&nbsp; {hits}/{k} neighbours share the query's class"
        self.summary.value = (f"query: {'gallery image #' + str(c['index'].value) if from_gallery else 'your upload'}"
                              f" &nbsp;·&nbsp; gallery of {len(self.gallery)} images &nbsp;·&nbsp; cosine of "
                              f"the best match {float(self.result[1][0]):.3f}{same}")


def similarity_search_app(model: IJEPA, gallery: torch.Tensor, cfg: Config, labels=None,
                          class_names: Optional[Sequence[str]] = None, k: int = 8, size_px: int = 1100
                          ) -> SimilaritySearch:
    """Search a gallery for the images whose pooled target-encoder features are closest (cosine) to a query.

    Controls: `source` ('gallery', or 'upload' once a file is uploaded), `index` (a gallery image as the
    query; it is left out of its own results), `upload` (an image file, centre-cropped and resized to the
    model's input size), `k` (neighbours shown). `gallery`: uint8 (N, 3, H, W) at `cfg.model.img_size`.
    """
    return SimilaritySearch(model, gallery, cfg, labels, class_names, k, size_px)


# -- the notebooks' model ------------------------------------------------------------------------------

FALLBACK_STEPS = 100  # a third of notebook 03's run: the stand-in should cost minutes, not notebook 03's time

def untrained_model(cfg: Config, seed: Optional[int] = None) -> IJEPA:
    """A randomly initialised `IJEPA` of `cfg.model` (eval mode): the weights training started from when
    `seed` is the run's `train.seed` (the default)."""
    from ijepa_viz.model import build_model

    torch.manual_seed(cfg.train.seed if seed is None else seed)
    return build_model(cfg.model, ema=cfg.train.ema).eval()


def notebook_model(quick: bool = False, verbose: bool = True) -> tuple[IJEPA, Config]:
    """The model the feature notebooks explain: (model in eval mode, its Config).

    Notebook 03's checkpoint (`widgets.NOTEBOOK_CHECKPOINT`) when it exists. Otherwise a run of notebook 03's
    configuration (`widgets.notebook_config(quick)`, shortened to `FALLBACK_STEPS` steps in normal mode) is
    trained here without its dashboard, in its own folder (`<runs>/notebook-fallback`, `-quick` in quick
    mode), and reused by the next notebook that asks.
    """
    from ijepa_viz.train import Trainer, load_model

    if NOTEBOOK_CHECKPOINT.exists():
        model, cfg = load_model(NOTEBOOK_CHECKPOINT)
        if verbose:
            print(f"Loaded notebook 03's model from {NOTEBOOK_CHECKPOINT} ({cfg.data.name}, "
                  f"ViT {cfg.model.embed_dim} wide, {cfg.model.depth} blocks)")
        return model, cfg
    out = Path(RUNS_DIR) / ("notebook-fallback-quick" if quick else "notebook-fallback")
    cfg = notebook_config(quick, out_dir=out, extra=() if quick else [f"train.steps={FALLBACK_STEPS}"])
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        model, saved = load_model(ckpt)
        if saved.to_dict() == cfg.to_dict():
            if verbose:
                print(f"No checkpoint from notebook 03 at {NOTEBOOK_CHECKPOINT}; reusing the fallback model "
                      f"trained earlier in {ckpt}")
            return model, saved
    if verbose:
        print(f"No checkpoint from notebook 03 at {NOTEBOOK_CHECKPOINT}.\nTraining a fallback I-JEPA with "
              f"notebook 03's settings but only {cfg.train.steps} steps ({cfg.data.name}, batch "
              f"{cfg.data.batch_size}) in {out}; run notebook 03 for the full run and its live plots ...",
              flush=True)
    result = Trainer(cfg, progress=False).fit()
    if verbose:
        print(f"done in {result.wall_time:.0f} s, final loss {result.history[-1]['loss']:.4f}")
    return result.model.eval(), cfg
