"""ipywidgets apps of the feature notebooks: the prediction explorer (04), the embedding explorer (05) and the
similarity search (07), plus `feature_model`, the model those notebooks load, and `untrained_model`, the
same network before training.

The *wire* layer: each app only connects controls to `ijepa_viz.viz.features` (compute) and
`ijepa_viz.viz.feature_plots` (draw), and is an ipywidgets box. Figures are plain Agg `Figure`s rendered to a PNG
in an `ipywidgets.Image`, as in `ijepa_viz.viz.widgets`, so JupyterLab shows them without any extension.
Every app draws one row per model it is given (the trained encoder above the untrained one), so what
training changed is always in view.

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
from ijepa_viz.viz.widgets import (NOTEBOOK_CHECKPOINT, REPO_ROOT, RUNS_DIR, figure_png, image_from_bytes,
                                   notebook_config)

__all__ = [
    "PredictionExplorer", "prediction_explorer", "EmbeddingExplorer", "embedding_explorer",
    "SimilaritySearch", "similarity_search_app", "feature_model", "feature_sources", "notebook_model",
    "untrained_model", "SHIPPED_MODELS",
]


def _figure(width_in: float, height_in: float, dpi: int = 100) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _models(trained, untrained=None) -> dict:
    """{'trained': ..., 'untrained': ...} from a model and an optional second one, or a mapping as given."""
    if isinstance(trained, Mapping):
        if not trained:
            raise ValueError("give at least one model")
        return dict(trained)
    return {"trained": trained} if untrained is None else {"trained": trained, "untrained": untrained}


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
    """What the predictor predicts on one image, one row per model (trained above untrained). See
    `prediction_explorer`. Keeps `all_maps` ({model name: `features.PredictionMaps`} of the last redraw),
    `maps` (the first model's) and `masks`."""

    def __init__(self, trained: IJEPA | Mapping[str, IJEPA], untrained: Optional[IJEPA], images: torch.Tensor,
                 cfg: Config, size_px: int = 1150):
        self.models = _models(trained, untrained)
        self.images, self.cfg = images, cfg
        self.maps: Optional[fx.PredictionMaps] = None
        self.all_maps: dict = {}
        M = cfg.mask.num_targets
        c = {
            "index": widgets.IntSlider(0, min=0, max=len(images) - 1, description="image",
                                       continuous_update=False),
            "seed": widgets.IntSlider(0, min=0, max=999, description="mask seed", continuous_update=False),
            "resample": widgets.Button(description="new masks", icon="refresh", tooltip="mask seed + 1"),
            "block": widgets.Dropdown(options=[("all blocks", -1)] + [(f"block {m + 1}", m) for m in range(M)],
                                      value=-1, description="target"),
        }
        c["resample"].on_click(lambda _: setattr(c["seed"], "value", (c["seed"].value + 1) % 1000))
        panel = [widgets.HBox([c["index"], c["seed"], c["resample"]]), c["block"]]
        self._setup(c, panel, (size_px, 0))
        self.redraw()

    def _position_mean(self, model: IJEPA):
        """Each position's mean target feature over `images` (removed before the PCA colours, so they show
        content, not position); None for a model that predicts pixels."""
        return None if model.pixel_head is not None else fx.position_mean(model, self.images, self.cfg)

    def _draw(self) -> None:
        c = self.controls
        collator = MaskCollator(self.cfg.mask, self.cfg.grid_size, seed=c["seed"].value)
        self.masks = collator.sample(1, step=0)
        block = c["block"].value
        image = self.images[c["index"].value]
        self.all_maps = {name: fx.prediction_maps(m, image, self.masks, None if block < 0 else block, cfg=self.cfg)
                         for name, m in self.models.items()}
        self.maps = next(iter(self.all_maps.values()))
        vmax = max(float(np.nanmax(m.err)) for m in self.all_maps.values())  # one error scale for all rows
        fig = _figure(11.5, 2.5 * len(self.models))
        axes = fig.subplots(len(self.models), 5, squeeze=False)
        for row, (name, maps) in zip(axes, self.all_maps.items()):
            colours = fx.prediction_colours(maps, self._position_mean(self.models[name]))
            plots.plot_masks(row[0], image, self.masks, title=f"{name}: masks")
            row[0].title.set_fontsize(9)
            fp.plot_similarity_map(row[1], image, maps.cos, title=f"cosine (mean {maps.mean_cos:.2f})")
            fp.plot_error_map(row[2], image, maps.err, vmax=vmax,
                              title=f"squared error / feature (mean {maps.mean_err:.2f})")
            fp.plot_pca_rgb(row[3], colours["true"], title="true targets, PCA→RGB")
            fp.plot_pca_rgb(row[4], colours["pred"], title="predicted, same colours")
        fig.subplots_adjust(left=0.01, right=0.99, wspace=0.3, hspace=0.3, top=0.9, bottom=0.03)
        self.image_widget.value = figure_png(fig)
        self.summary.value = " &nbsp;·&nbsp; ".join(
            f"<b>{name}</b>: mean cosine {m.mean_cos:.3f}, mean squared error per feature {m.mean_err:.3f}"
            for name, m in self.all_maps.items()) + f" &nbsp;·&nbsp; {len(self.maps.patch)} target patches"


def prediction_explorer(trained_model: IJEPA | Mapping[str, IJEPA], untrained_model: Optional[IJEPA],
                        images: torch.Tensor, cfg: Config, size_px: int = 1150) -> PredictionExplorer:
    """Compare the predictor's output with the target encoder's on one image, trained and untrained model in
    two rows (same image, same masks).

    Controls: `index` (which of `images`), `seed` and `resample` (new masks), `block` (one target block or
    all). Each row shows the masks, the cosine-similarity map, the squared-error map (error per feature, on
    one colour scale for all rows) and PCA->RGB of the true and the predicted target features in shared
    colours (after `features.remove_position` with the mean over `images`); the summary line gives each
    model's mean cosine and squared error.

    Args:
        trained_model: a model, or a mapping {row name: model} (then `untrained_model` is ignored).
        untrained_model: e.g. `untrained_model(cfg)`; None shows the trained model alone.
        images: uint8 (N, 3, H, W) at `cfg.model.img_size`, normalised with `cfg.data`'s statistics.
    """
    return PredictionExplorer(trained_model, untrained_model, images, cfg, size_px)


# -- notebook 05: the embedding explorer ---------------------------------------------------------------

class EmbeddingExplorer(_App):
    """PCA and t-SNE of pooled target-encoder features, coloured by class, one row per model. See
    `embedding_explorer`. Keeps `xy` ({model name: {'pca': (n, 2), 'tsne': (n, 2)}}) of the last redraw."""

    def __init__(self, models: Mapping[str, IJEPA], images: torch.Tensor, labels, cfg: Config,
                 class_names: Optional[Sequence[str]] = None, points: int = 500, perplexity: float = 30,
                 size_px: int = 1000):
        self.models, self.images, self.cfg = _models(models), images, cfg
        self.labels = np.asarray(labels)
        self.class_names = class_names
        self.xy: dict = {}
        n = len(images)
        step = max(1, min(50, n // 10))
        c = {
            "points": widgets.IntSlider(min(points, n), min=min(10, n), max=n, step=step, description="points",
                                        continuous_update=False),
            "perplexity": widgets.IntSlider(int(perplexity), min=2, max=100, description="perplexity",
                                            continuous_update=False),
        }
        self._setup(c, [widgets.HBox([c["points"], c["perplexity"]])], (size_px, 0))
        self.redraw()

    def _draw(self) -> None:
        c = self.controls
        n = c["points"].value
        t0 = time.perf_counter()
        feats = {name: fx.embed(m, self.images[:n], self.cfg) for name, m in self.models.items()}  # cached
        t1 = time.perf_counter()
        self.xy = {name: {"pca": fx.pca_2d(f), "tsne": fx.tsne_2d(f, perplexity=c["perplexity"].value)}
                   for name, f in feats.items()}
        t2 = time.perf_counter()
        fig = _figure(10, 4.0 * len(self.models))
        axes = fig.subplots(len(self.models), 2, squeeze=False)
        for row, (name, xy) in zip(axes, self.xy.items()):
            fp.plot_embedding_2d(row[0], xy["pca"], self.labels[:n], self.class_names, legend=False,
                                 title=f"{name}: PCA (2 components)")
            fp.plot_embedding_2d(row[1], xy["tsne"], self.labels[:n], self.class_names,
                                 title=f"{name}: t-SNE (perplexity {c['perplexity'].value})")
        fig.subplots_adjust(left=0.02, right=0.84, wspace=0.08, hspace=0.15, top=0.95, bottom=0.02)
        self.image_widget.value = figure_png(fig)
        self.summary.value = (f"{n} test images through each target encoder (average-pooled): features "
                              f"{t1 - t0:.1f} s, PCA + t-SNE {t2 - t1:.1f} s (both cached: moving back is instant)")


def embedding_explorer(models: Mapping[str, IJEPA] | IJEPA, images: torch.Tensor, labels, cfg: Config,
                       class_names: Optional[Sequence[str]] = None, points: int = 500, perplexity: float = 30,
                       size_px: int = 1000) -> EmbeddingExplorer:
    """PCA and t-SNE of average-pooled target-encoder features (what the paper evaluates), coloured by class,
    one row per model of `models` (e.g. {'trained': ..., 'untrained': ...}).

    Controls: `points` (the first n of `images`), `perplexity` (t-SNE). Features and layouts are cached, so
    revisiting a setting is instant. `images`: uint8 (N, 3, H, W); `labels`: (N,) class ids.
    """
    return EmbeddingExplorer(models, images, labels, cfg, class_names, points, perplexity, size_px)


# -- notebook 07: similarity search --------------------------------------------------------------------

class SimilaritySearch(_App):
    """Top-k gallery neighbours of a query image by cosine similarity of pooled target-encoder features, one
    row per model. See `similarity_search_app`. Keeps `gallery_feats` ({model name: (N, D)}), `query` (the
    query image), `results` ({model name: (indices, scores)}) and `result` (the first model's)."""

    def __init__(self, models: IJEPA | Mapping[str, IJEPA], gallery: torch.Tensor, cfg: Config, labels=None,
                 class_names: Optional[Sequence[str]] = None, k: int = 8, size_px: int = 1100,
                 centre: bool = True):
        self.models, self.gallery, self.cfg = _models(models), gallery, cfg
        self.labels = None if labels is None else np.asarray(labels)
        self.class_names = class_names
        self.gallery_feats = {name: fx.embed(m, gallery, cfg) for name, m in self.models.items()}  # cached
        self.uploaded: Optional[torch.Tensor] = None
        self.query: Optional[torch.Tensor] = None
        self.results: dict = {}
        self.result = None
        c = {
            "source": widgets.ToggleButtons(options=["gallery"], value="gallery", description="query"),
            "index": widgets.IntSlider(0, min=0, max=len(gallery) - 1, description="index",
                                       continuous_update=False),
            "upload": widgets.FileUpload(accept="image/*", multiple=False, description="upload"),
            "k": widgets.IntSlider(min(k, len(gallery) - 1), min=1, max=min(16, len(gallery) - 1),
                                   description="top k", continuous_update=False),
            "centre": widgets.Checkbox(value=centre, description="centred cosine (subtract the gallery's mean)",
                                       indent=False),
        }
        c["upload"].observe(self._on_upload, names="value")
        panel = [widgets.HBox([c["source"], c["index"], c["upload"]]), widgets.HBox([c["k"], c["centre"]])]
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
        i = c["index"].value
        self.query = self.gallery[i] if from_gallery else self.uploaded
        k = c["k"].value
        self.results = {}
        for name, model in self.models.items():
            feats = self.gallery_feats[name]
            qfeat = feats[i] if from_gallery else fx.embed(model, self.uploaded[None], self.cfg)[0]
            self.results[name] = fx.similarity_search(feats, qfeat, k=k, exclude=i if from_gallery else None,
                                                      centre=c["centre"].value)
        self.result = next(iter(self.results.values()))
        qlabel = None if self.labels is None or not from_gallery else int(self.labels[i])
        fig = _figure(1.15 * (k + 1), 1.8 * len(self.models))
        grid = np.asarray(fig.subplots(len(self.models), k + 1, squeeze=False))
        for row, (name, res) in zip(grid, self.results.items()):
            fp.plot_retrieval(row, self.query, self.gallery, *res, labels=self.labels,
                              class_names=self.class_names, query_label=qlabel, query_title=f"{name}: query")
        fig.subplots_adjust(left=0.01, right=0.99, wspace=0.1, hspace=0.65, top=0.86, bottom=0.02)
        self.image_widget.value = figure_png(fig)
        kind = "centred cosine" if c["centre"].value else "cosine"
        parts = []
        for name, (idx, scores) in self.results.items():
            hits = "" if qlabel is None else f", {int((self.labels[idx] == qlabel).sum())}/{k} share its class"
            parts.append(f"<b>{name}</b>: best {kind} {float(scores[0]):.3f}{hits}")
        where = f"gallery image #{i} (left out of its own results)" if from_gallery else "your upload"
        self.summary.value = (f"query: {where} &nbsp;·&nbsp; gallery of {len(self.gallery)} images &nbsp;·&nbsp; "
                              + " &nbsp;·&nbsp; ".join(parts))


def similarity_search_app(models: IJEPA | Mapping[str, IJEPA], gallery: torch.Tensor, cfg: Config, labels=None,
                          class_names: Optional[Sequence[str]] = None, k: int = 8, size_px: int = 1100,
                          centre: bool = True) -> SimilaritySearch:
    """Search a gallery for the images whose pooled target-encoder features are closest (cosine) to a query,
    one row per model (e.g. {'trained': ..., 'untrained': ...}; a single model is called 'trained').

    Controls: `source` ('gallery', or 'upload' once a file is uploaded), `index` (a gallery image as the
    query; it is left out of its own results), `upload` (an image file, centre-cropped and resized to the
    model's input size; an upload of a gallery image finds that image, cosine 1), `k` (neighbours shown),
    `centre` (subtract the gallery's mean feature before the cosine, see `features.common_share`).
    `gallery`: uint8 (N, 3, H, W) at `cfg.model.img_size`.
    """
    return SimilaritySearch(models, gallery, cfg, labels, class_names, k, size_px, centre)


# -- the notebooks' model ------------------------------------------------------------------------------

FALLBACK_STEPS = 100  # a third of notebook 03's run: the stand-in should cost minutes, not notebook 03's time

def untrained_model(cfg: Config, seed: Optional[int] = None) -> IJEPA:
    """A randomly initialised `IJEPA` of `cfg.model` (eval mode): the weights training started from when
    `seed` is the run's `train.seed` (the default), as the Trainer seeds them. Leaves the global RNG as it was."""
    from ijepa_viz.model import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed if seed is None else seed)
        return build_model(cfg.model, ema=cfg.train.ema).eval()


# the shipped model for each dataset the notebooks can show; the dots one is what CI and offline use
SHIPPED_MODELS = {"dots": "dots-cpu-demo", "cifar10": "cifar10-cpu-tiny"}
SOURCES = ("shipped", "notebook03", "cifar10")


def _shipped_description(name: str, model: IJEPA, cfg: Config) -> str:
    card = getattr(model, "card", {}) or {}
    said = card.get("description") or ""
    facts = []
    if card.get("steps") is not None:
        facts.append(f"{card['steps']:,} steps")
    if card.get("epochs") is not None:
        facts.append(f"{float(card['epochs']):.1f} epochs")
    if card.get("train_seconds") is not None:
        facts.append(f"{float(card['train_seconds']) / 60:.1f} min of training")
    trained = f", trained {', '.join(facts)}" if facts else ""
    return (f"shipped weights {name!r}{' (' + said + ')' if said else ''}: ViT {cfg.model.embed_dim} wide, "
            f"{cfg.model.depth} blocks, {cfg.model.img_size} px {cfg.data.name} images{trained}")


def _cifar10_data(cfg: Config) -> tuple[Config, str]:
    """`cfg` with a data section whose CIFAR-10 test images load here, and a note for the description.

    First the ImageFolder tree the shipped model was trained on (`cfg.data.root`, relative to the working
    folder or to the repository), then torchvision's CIFAR-10 (on disk in `<repo>/data`, or downloaded).
    Raises RuntimeError saying why when neither loads (e.g. offline without the files).
    """
    from ijepa_viz.config import override
    from ijepa_viz.data import load_uint8

    tries = []
    if cfg.data.name == "imagefolder":
        root = Path(cfg.data.root)
        places = [root] if root.is_absolute() else [Path.cwd() / root, REPO_ROOT / root]
        for where in dict.fromkeys(p.resolve() for p in places):  # each place once
            tries.append((override(cfg, [f"data.root={where}"]), ""))
    if cfg.data.name != "cifar10" or not tries:
        note = "" if cfg.data.name == "cifar10" else (
            "; images from torchvision's CIFAR-10, normalised with its own mean and std (the model trained with "
            f"those of {cfg.data.name!r})")
        tries.append((override(cfg, ["data.name=cifar10", f"data.root={REPO_ROOT / 'data'}", "data.download=true"]),
                      note))
    errors = []
    for candidate, note in tries:
        try:
            load_uint8(candidate.data, "test", candidate.model.img_size, limit=1)
            return candidate, note
        except Exception as e:  # torchvision raises URLError, RuntimeError, OSError, ... when offline
            errors.append(f"{candidate.data.name} at {candidate.data.root}: {type(e).__name__}: {e}")
    raise RuntimeError("source='cifar10' needs the CIFAR-10 images, and none could be loaded or downloaded here ("
                       + "; ".join(errors) + "); use source='shipped', which works offline")


def feature_sources() -> dict[str, str]:
    """The sources `feature_model` offers on this installation: {source: what it loads}. 'cifar10' only
    appears when its shipped weights are installed (whether its images can be downloaded is checked on use)."""
    from ijepa_viz.pretrained import shipped

    have = shipped()
    out = {}
    if SHIPPED_MODELS["dots"] in have:
        out["shipped"] = f"the shipped model {SHIPPED_MODELS['dots']!r}, trained on the built-in dots (offline)"
    out["notebook03"] = "the run you trained in notebook 03 (or a short run of its settings, trained on demand)"
    if SHIPPED_MODELS["cifar10"] in have:
        out["cifar10"] = (f"the shipped model {SHIPPED_MODELS['cifar10']!r}, on CIFAR-10 (its images must be on "
                          f"disk or downloadable by torchvision: needs the network once)")
    return out


def feature_model(source: str = "shipped", quick: bool = False, verbose: bool = True
                  ) -> tuple[IJEPA, Config, str]:
    """The model the feature notebooks (04, 05, 07) look at: (IJEPA in eval mode, its Config, a description).

    source:
        'shipped' (default): the weights shipped with the package for the built-in `dots` dataset
            (`SHIPPED_MODELS['dots']`), offline; the same in quick mode and in CI.
        'notebook03': the run you trained in notebook 03 (`notebook_model(quick)`: its checkpoint, or a short
            fallback run of its settings trained here when it is missing).
        'cifar10': the shipped CIFAR-10 model, when it is installed and its images load: the ImageFolder tree
            it was trained on, else torchvision's CIFAR-10 (on disk or downloaded; the returned Config's data
            section says which); a clear error otherwise. Never needed offline.
    The description names the weights and how long they were trained (from the model card), for printing.
    Compare with `untrained_model(cfg)`: the same network before training.
    """
    from ijepa_viz.pretrained import load_shipped, shipped

    if source not in SOURCES:
        raise ValueError(f"source={source!r}: choose one of {', '.join(repr(s) for s in SOURCES)}")
    if source == "notebook03":
        model, cfg = notebook_model(quick=quick, verbose=verbose)
        return model, cfg, (f"notebook 03's run: ViT {cfg.model.embed_dim} wide, {cfg.model.depth} blocks, "
                            f"{cfg.model.img_size} px {cfg.data.name} images, {cfg.train.steps:,} steps")
    name = SHIPPED_MODELS["dots" if source == "shipped" else "cifar10"]
    if name not in shipped():
        have = ", ".join(shipped()) or "none"
        raise ValueError(f"source={source!r} needs the shipped model {name!r}, which this installation does not "
                         f"have (shipped: {have}); use source='notebook03'")
    model, cfg = load_shipped(name)
    note = ""
    if source == "cifar10":
        cfg, note = _cifar10_data(cfg)
    return model, cfg, _shipped_description(name, model, cfg) + note


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
