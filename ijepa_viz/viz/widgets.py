"""ipywidgets apps for the notebooks: the mask explorer and the training dashboard, and the notebooks' runs.

The *wire* layer: these functions only connect controls to the compute and draw functions of
`ijepa_viz.masks`, `ijepa_viz.train` and `ijepa_viz.viz.plots`, and return an ipywidgets box. The last section
holds what notebook 03 runs (its configuration, two short EMA on / off runs, how far the weights moved), so
that the notebook only narrates and calls.

Figures are plain Agg `matplotlib.figure.Figure` objects (no pyplot, no ipympl): each redraw updates the
existing artists and sends a PNG to an `ipywidgets.Image`, which JupyterLab shows without any extension.

Where the notebooks keep their run: `NOTEBOOK_RUN` (`<runs>/notebook`, checkpoint `NOTEBOOK_CHECKPOINT`), where
`<runs>` is `$IJEPA_VIZ_RUNS` if set (relative paths count from the repository root) or `<repo>/runs`.
Notebook 03 writes the checkpoint there and the later notebooks read it.

Data: the notebooks train on the built-in `dots` dataset (rendered on the fly: offline, and what CI uses).
To train notebook 03 on real CIFAR-10 instead, set `IJEPA_VIZ_CIFAR10` to a copy of it before starting
Jupyter: an ImageFolder tree (`<dir>/train/<class>/*.png` and `<dir>/test/...`) or the folder that holds
torchvision's `cifar-10-batches-py` (`local_cifar10`). A torchvision download into `<repo>/data` is used
without the variable.

It stays one file because its sections share the notebooks' locations and settings (`REPO_ROOT`,
`RUNS_DIR`, `NOTEBOOK_CHECKPOINT`, `CIFAR10_ENV`), which notebooks, `feature_widgets` and the tests read or
replace on this one module; each app is a class of its own and reads on its own.
"""
from __future__ import annotations

import functools
import io
import os
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

import ipywidgets as widgets
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from ijepa_viz.config import Config, ConfigError, MaskConfig, override
from ijepa_viz.masks import STRATEGIES, MaskCollator
from ijepa_viz.viz import plots

__all__ = [
    "REPO_ROOT", "RUNS_DIR", "NOTEBOOK_RUN", "NOTEBOOK_CHECKPOINT", "sample_image", "image_from_bytes",
    "figure_png", "MaskExplorer", "mask_explorer", "TrainingDashboard", "training_dashboard", "run_training",
    "notebook_config", "local_cifar10", "steps_for_budget", "initial_weights", "weight_change", "ema_init_share",
    "run_summary", "target_features", "untrained_like", "ema_runs",
]


# -- where things live ----------------------------------------------------------------------------

def _repo_root() -> Path:
    """The checkout that holds this package (a folder with ijepa_viz/ and pyproject.toml), else the cwd."""
    here = Path(__file__).resolve().parent.parent.parent
    return here if (here / "pyproject.toml").is_file() and (here / "ijepa_viz").is_dir() else Path.cwd()


REPO_ROOT = _repo_root()
RUNS_DIR = REPO_ROOT / os.environ.get("IJEPA_VIZ_RUNS", "runs")  # an absolute $IJEPA_VIZ_RUNS replaces the root
NOTEBOOK_RUN = RUNS_DIR / "notebook"  # notebook 03 trains here; notebooks 04-07 load its checkpoint
NOTEBOOK_CHECKPOINT = NOTEBOOK_RUN / "checkpoint.pt"


def sample_image() -> torch.Tensor:
    """The bundled sample image: image 3 of the 'shapes' test split at 112 px (a mosaic of nine stars), uint8
    (3, 112, 112), equal to `data.render_shapes([3], 112, split="test")`. At patch 8 its grid is 14 x 14, the
    grid of the paper's ViT/16 at 224 px."""
    data = resources.files("ijepa_viz").joinpath("assets/sample_shapes_112.png").read_bytes()
    return image_from_bytes(data, size=None)


def image_from_bytes(data: bytes, size: Optional[int] = 224) -> torch.Tensor:
    """Decode an image file (PNG, JPEG, ...) -> uint8 (3, S, S): the centred square crop, resized to `size`
    (None keeps the crop's own side)."""
    img = Image.open(io.BytesIO(bytes(data))).convert("RGB")
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if size is not None and side != size:
        img = img.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def figure_png(fig: Figure) -> bytes:
    """Render an Agg figure to PNG bytes (draw, then a fast zlib level-1 encode with Pillow)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    buf = io.BytesIO()
    Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3]).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _new_figure(figsize, dpi) -> Figure:
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


# -- the mask explorer ----------------------------------------------------------------------------

def _patch_sizes(side: int, max_grid: int = 64) -> list[int]:
    """Patch sizes that divide the image side and give a grid of 2 to max_grid patches per side."""
    return [p for p in range(1, side + 1) if side % p == 0 and 2 <= side // p <= max_grid]


def _swatch(colour: str, text: str) -> str:
    return (f'<span style="display:inline-block;width:0.9em;height:0.9em;background:{colour};'
            f'border:1px solid #888;vertical-align:middle;margin:0 0.25em 0 0.6em"></span>{text}')


class MaskExplorer(widgets.VBox):
    """The mask explorer: an image with I-JEPA's context and target blocks drawn over it, and a control for
    every setting of `MaskConfig` that shapes them. See `mask_explorer`.

    Attributes: `controls` (name -> widget), `image_widget` (ipywidgets.Image with the PNG), `fractions`
    (HTML with the live context / target fractions; their values in `fraction_values`), `error` (HTML: the
    `MaskConfigError` of an impossible setting, else empty), `masks` (the last `Masks`), `figure` / `ax`,
    `redraw_times` (seconds per redraw).
    """

    def __init__(self, image=None, mask_cfg: Optional[MaskConfig] = None, patch_size: int = 8,
                 dataset: str = "shapes", seed: int = 0, size_px: int = 360):
        cfg = mask_cfg or MaskConfig()
        self._images = {"bundled sample": sample_image()}
        if image is not None:
            self._images = {"given image": _square_uint8(image), **self._images}
        self._dataset = dataset
        self.masks = None
        self.fraction_values: Optional[tuple[float, float]] = None  # (context, target) of the last masks
        self.redraw_times: list[float] = []
        first = next(iter(self._images.values()))
        sizes = _patch_sizes(first.shape[-1])
        c = self.controls = {
            "source": widgets.Dropdown(options=[*self._images, f"{dataset} dataset"], description="image"),
            "index": widgets.BoundedIntText(value=0, min=0, max=9999, description="index",
                                            layout=widgets.Layout(width="160px")),
            "upload": widgets.FileUpload(accept="image/*", multiple=False, description="upload"),
            "strategy": widgets.Dropdown(options=list(STRATEGIES), value=cfg.strategy, description="strategy"),
            "num_targets": widgets.IntSlider(value=cfg.num_targets, min=1, max=8, description="targets M"),
            "target_scale": widgets.FloatRangeSlider(value=cfg.target_scale, min=0.01, max=1.0, step=0.01,
                                                     description="target scale"),
            "target_aspect": widgets.FloatRangeSlider(value=cfg.target_aspect, min=0.2, max=4.0, step=0.05,
                                                      description="target aspect"),
            "context_scale": widgets.FloatRangeSlider(value=cfg.context_scale, min=0.05, max=1.0, step=0.01,
                                                      description="context scale"),
            "patch_size": widgets.SelectionSlider(options=sizes, value=_closest(sizes, patch_size),
                                                  description="patch size"),
            "min_keep": widgets.IntSlider(value=cfg.min_keep, min=0, max=40, description="min_keep"),
            "seed": widgets.IntSlider(value=seed, min=0, max=999, description="seed"),
            "resample": widgets.Button(description="new masks", icon="refresh", tooltip="seed + 1"),
        }
        for w in c.values():
            if not isinstance(w, (widgets.Button, widgets.FileUpload)):
                w.style.description_width = "90px"
        self._base_cfg = cfg
        self.figure = _new_figure((size_px / 100, size_px / 100), 100)
        self.ax = self.figure.add_axes((0, 0, 1, 1))
        self.image_widget = widgets.Image(format="png", width=size_px, height=size_px)
        self.fractions = widgets.HTML()
        self.error = widgets.HTML(layout=widgets.Layout(display="none"))
        legend = widgets.HTML(_swatch(plots.CONTEXT_COLOUR, "context (the encoder sees it)")
                              + "".join(_swatch(col, f"target {m + 1}")
                                        for m, col in enumerate(plots.TARGET_COLOURS[:4]))
                              + _swatch(plots.HIDDEN_COLOUR, "seen by neither"))
        panel = widgets.VBox([
            widgets.HBox([c["source"], c["index"]]), c["upload"], c["strategy"], c["num_targets"],
            c["target_scale"], c["target_aspect"], c["context_scale"], c["patch_size"], c["min_keep"],
            widgets.HBox([c["seed"], c["resample"]]),
        ])
        super().__init__([widgets.HBox([self.image_widget, panel]), legend, self.fractions, self.error])
        self.add_class("ijepa-mask-explorer")
        for name, w in c.items():
            if name == "resample":
                w.on_click(lambda _: setattr(c["seed"], "value", (c["seed"].value + 1) % (c["seed"].max + 1)))
            elif name == "upload":
                w.observe(self._on_upload, names="value")
            elif name == "source":
                w.observe(self._on_source, names="value")
            else:
                w.observe(lambda change: None if self._muted else self.redraw(), names="value")
        self.redraw()

    # -- state -----------------------------------------------------------------------------------
    @property
    def image(self) -> torch.Tensor:
        """The image being masked: uint8 (3, S, S)."""
        src = self.controls["source"].value
        if src in self._images:
            return self._images[src]
        return _dataset_image(self._dataset, self.controls["index"].value)

    def mask_config(self) -> MaskConfig:
        """The `MaskConfig` that the controls describe."""
        c, base = self.controls, self._base_cfg
        return MaskConfig(strategy=c["strategy"].value, num_targets=c["num_targets"].value,
                          target_scale=tuple(c["target_scale"].value), target_aspect=tuple(c["target_aspect"].value),
                          context_scale=tuple(c["context_scale"].value), context_aspect=base.context_aspect,
                          min_keep=c["min_keep"].value, allow_overlap=base.allow_overlap,
                          block_scale=base.block_scale, max_tries=base.max_tries)

    def _on_upload(self, change) -> None:
        files = change["new"]
        if not files:
            return
        try:
            self._images["uploaded file"] = image_from_bytes(files[0]["content"], size=224)
        except Exception as e:  # not an image: say so in the box
            self._show_error(f"{files[0].get('name', 'the upload')!r} is not an image PIL can read: {e}",
                             title="Could not read the upload.")
            return
        src = self.controls["source"]
        if "uploaded file" not in src.options:
            src.options = [*src.options, "uploaded file"]
        if src.value == "uploaded file":
            self._on_source({"new": "uploaded file"})
        else:
            src.value = "uploaded file"  # triggers _on_source

    def _on_source(self, change) -> None:
        try:
            side = self.image.shape[-1]
        except Exception:
            return self.redraw()  # which shows why
        ps = self.controls["patch_size"]
        sizes = _patch_sizes(side)
        if list(ps.options) != sizes:
            want = _closest(sizes, ps.value * side / max(1, self._last_side))
            self._muted = True  # one redraw below, not one per trait change
            try:
                ps.options = sizes
                ps.value = want
            finally:
                self._muted = False
        self.redraw()

    _last_side = 112
    _muted = False

    def _show_error(self, msg: str, title: str = "Impossible setting.") -> None:
        self.error.value = (f'<div style="color:#b00020;border:1px solid #b00020;padding:4px 8px;'
                            f'white-space:pre-wrap"><b>{title}</b> {_html_escape(msg)}</div>')
        self.error.layout.display = None
        self.fractions.value = "<i>no masks for this setting; change a control to continue</i>"

    # -- the redraw ------------------------------------------------------------------------------
    def redraw(self) -> None:
        """Sample masks for the current controls and redraw the figure and the fractions (or show the
        error of an impossible setting). Records its time in `redraw_times`."""
        t0 = time.perf_counter()
        try:
            img = self.image
        except Exception as e:  # e.g. a dataset that is not on this machine
            self._show_error(f"{type(e).__name__}: {e}", title="Could not load the image.")
            self.redraw_times.append(time.perf_counter() - t0)
            return
        self._last_side = img.shape[-1]
        grid = img.shape[-1] // self.controls["patch_size"].value
        try:
            collator = MaskCollator(self.mask_config(), grid, seed=self.controls["seed"].value)
            masks = collator.sample(1, step=0)
        except (ConfigError, ValueError) as e:
            self._show_error(str(e))
            if not self.image_widget.value:  # nothing drawn yet: show the bare image
                self.image_widget.value = _png_of(img, self.image_widget.width)
            self.redraw_times.append(time.perf_counter() - t0)
            return
        self.masks = masks
        self.error.value = ""
        self.error.layout.display = "none"
        plots.plot_masks(self.ax, img, masks)
        self.image_widget.value = figure_png(self.figure)
        ctx, tgt = self.fraction_values = plots.mask_fractions(masks)
        N = grid * grid
        neither = 1 - (torch.unique(torch.cat([masks.context[0], masks.targets[0].flatten()])).numel() / N)
        self.fractions.value = (
            f'<span class="ijepa-fractions"><b>context</b> {ctx:.1%} of the patches ({round(ctx * N)}/{N}) '
            f'&nbsp;·&nbsp; <b>targets</b> {tgt:.1%} ({round(tgt * N)}/{N}, {masks.num_targets} blocks of '
            f'{masks.targets.shape[2]} patches) &nbsp;·&nbsp; seen by neither {neither:.1%} '
            f'&nbsp;·&nbsp; grid {grid}x{grid}</span>')
        self.redraw_times.append(time.perf_counter() - t0)


def _png_of(image: torch.Tensor, size_px) -> bytes:
    """PNG of a uint8 (3, H, W) image scaled (nearest) to size_px."""
    size = int(size_px)
    img = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((size, size), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _closest(options: Sequence[int], value: float) -> int:
    return min(options, key=lambda o: abs(o - value))


def _html_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _square_uint8(image) -> torch.Tensor:
    """Any image `plots.to_display` accepts -> uint8 (3, S, S), its centred square. Image files (a path, or
    PNG/JPEG bytes) are cropped and resized to 224 px, as uploads."""
    if isinstance(image, (str, Path)):
        image = Path(image).read_bytes()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return image_from_bytes(image, size=224)
    x = torch.from_numpy((plots.to_display(image) * 255 + 0.5).astype(np.uint8)).permute(2, 0, 1)
    side = min(x.shape[1:])
    top, left = (x.shape[1] - side) // 2, (x.shape[2] - side) // 2
    return x[:, top:top + side, left:left + side].contiguous()


_DATASET_CACHE: dict = {}


@functools.lru_cache(maxsize=32)
def _dataset_image(name: str, index: int, img_size: int = 112) -> torch.Tensor:
    """Image `index` of a dataset's test split, uint8 (3, S, S): a built-in one ('shapes', 'dots') is rendered at `img_size`
    (no files needed); other datasets load through `ijepa_viz.data.load_uint8` at their own size."""
    from ijepa_viz import data

    if name in data.BUILTIN:
        return data.BUILTIN[name][1]([index], img_size, 0, "test")[0][0]
    if name not in _DATASET_CACHE:
        from ijepa_viz.config import DataConfig
        size = 32 if name in ("cifar10", "cifar100") else 96
        _DATASET_CACHE[name] = data.load_uint8(DataConfig(name=name, download=False), "test", size, limit=200)[0]
    images = _DATASET_CACHE[name]
    return images[index % len(images)]


def mask_explorer(image=None, mask_cfg: Optional[MaskConfig] = None, patch_size: int = 8,
                  dataset: str = "shapes", seed: int = 0, size_px: int = 360) -> MaskExplorer:
    """An interactive view of I-JEPA's masks on one image.

    Args:
        image: an image to start from (tensor/array in any layout, PIL image, or an image file's path or bytes,
            cropped to a square and resized to 224 px); None starts
            from the bundled sample (`sample_image`). The 'image' dropdown also offers image `index` of
            `dataset`'s test split, and an uploaded file (FileUpload; cropped to a square, 224 px).
        mask_cfg: the starting `MaskConfig` (default: the paper's multi-block settings).
        patch_size: the starting patch size in pixels (the closest divisor of the image side).
        seed: the starting mask seed; "new masks" draws the next one.
        size_px: side of the figure in pixels.

    Returns a `MaskExplorer` (an ipywidgets VBox). Every control redraws the figure in place and updates the
    fractions line; an impossible setting (e.g. targets that can never keep more than `min_keep` patches)
    shows the `MaskConfigError` message in the box instead of raising.
    """
    return MaskExplorer(image, mask_cfg, patch_size, dataset, seed, size_px)


# -- the training dashboard -------------------------------------------------------------------------

class TrainingDashboard(widgets.VBox):
    """Live training view: loss, collapse monitors and the lr / weight-decay / EMA-momentum schedules in one
    figure, a progress bar, a status line, and Start / Stop buttons. See `training_dashboard`.

    It is a `Trainer` callback: `on_step` receives every metrics row. Attributes: `history` (the rows, with
    'feature_std' and 'rankme' added on monitor steps), `trainer`, `result` (the `TrainResult` once done),
    `error` (an exception raised by the run, if any).
    """

    def __init__(self, cfg: Config, monitor_every: Optional[int] = None, eval_images: int = 256,
                 resume: bool = False, redraw_every_s: float = 0.5, loader=None, max_seconds: Optional[float] = None):
        self.cfg = cfg.validate()
        self.max_seconds = max_seconds  # stop (with a checkpoint) once the run has taken this long
        self.time_capped = False  # True when max_seconds ended the run
        self._fit_start = None
        self.monitor_every = monitor_every
        self.eval_images = eval_images
        self.resume = resume
        self.redraw_every_s = redraw_every_s
        self._loader = loader
        self.history: list[dict] = []
        self.trainer = None
        self.initial_state: Optional[dict] = None  # the encoders' weights when the run started
        self.result = None
        self.error: Optional[BaseException] = None
        self.thread: Optional[threading.Thread] = None
        self._stop_requested = False
        self._last_draw = 0.0
        self._draw_cost = 0.0  # seconds the last redraw took
        self._last_monitor = None
        self._eval_batch = None

        self.start_button = widgets.Button(description="Start", icon="play", button_style="success")
        self.stop_button = widgets.Button(description="Stop", icon="stop", button_style="danger", disabled=True,
                                          tooltip="stop after this step and write a checkpoint")
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="step")
        self.status = widgets.HTML("ready: press Start")
        self.start_button.on_click(lambda _: self.start(block=False))
        self.stop_button.on_click(lambda _: self.stop())
        self.figure = _new_figure((10.5, 5.6), 80)
        gs = self.figure.add_gridspec(2, 6, hspace=0.5, wspace=1.0, left=0.07, right=0.94, top=0.93, bottom=0.09)
        self.axes = {"loss": self.figure.add_subplot(gs[0, :3]), "collapse": self.figure.add_subplot(gs[0, 3:]),
                     "schedules": [self.figure.add_subplot(gs[1, 2 * i:2 * i + 2]) for i in range(3)]}
        self.image_widget = widgets.Image(format="png")
        super().__init__([widgets.HBox([self.start_button, self.stop_button, self.progress]), self.status,
                          self.image_widget])
        self.add_class("ijepa-training-dashboard")

    # -- control ---------------------------------------------------------------------------------
    def start(self, block: bool = False, progress: bool = False):
        """Build the `Trainer` and run it: in a background thread (block=False, the Start button; the
        notebook stays responsive and Stop works), or here (block=True; returns the `TrainResult`)."""
        if self.thread is not None and self.thread.is_alive():
            return None
        self.start_button.disabled = True
        self.stop_button.disabled = False
        self._stop_requested = False
        if block:
            self._run(progress)
            if self.error is not None:
                raise self.error
            return self.result
        self.thread = threading.Thread(target=self._run, args=(progress,), daemon=True, name="ijepa-train")
        self.thread.start()
        return None

    def stop(self) -> None:
        """Stop after the current step; the Trainer writes `<out_dir>/checkpoint.pt`."""
        self._stop_requested = True
        self.status.value = "stopping after this step..."
        if self.trainer is not None:
            self.trainer.stop()

    def wait(self, timeout: Optional[float] = None):
        """Wait for a background run to end; returns its `TrainResult` (None if it is still running)."""
        if self.thread is not None:
            self.thread.join(timeout)
        return self.result

    def _run(self, progress: bool) -> None:
        from ijepa_viz.train import Trainer

        self.error = None
        try:
            self.status.value = "building the model and the data..."
            self.trainer = Trainer(self.cfg, callbacks=[self], resume=self.resume, progress=progress,
                                   loader=self._loader)
            if self._stop_requested:
                self.trainer.stop()
            self.initial_state = initial_weights(self.trainer.model)
            self.history = [dict(r) for r in self.trainer.history]  # a resumed run keeps its earlier curve
            self.progress.max = self.trainer.total_steps
            self.progress.value = self.trainer.step
            self.status.value = f"training: {self.trainer.total_steps} steps on {self.trainer.device}"
            self._fit_start, self.time_capped = time.perf_counter(), False
            self.result = self.trainer.fit()
            how = "stopped early" if self.result.stopped_early else "done"
            how += f" (time cap of {self.max_seconds:g} s)" if self.time_capped else ""
            self.status.value = (f"{how} at step {self.result.step} in {self.result.wall_time:.0f} s; "
                                 f"checkpoint: <code>{self.result.checkpoint}</code>")
        except BaseException as e:  # shown in the box; re-raised by start(block=True)
            self.error = e
            self.status.value = f'<span style="color:#b00020">error: {_html_escape(f"{type(e).__name__}: {e}")}</span>'
        finally:
            self.start_button.disabled = False
            self.stop_button.disabled = True
            self.redraw()

    # -- Trainer callbacks ------------------------------------------------------------------------
    def on_step(self, trainer, row: dict) -> None:
        row = dict(row)
        if self._stop_requested:
            trainer.stop()
        if (self.max_seconds is not None and self._fit_start is not None
                and time.perf_counter() - self._fit_start > self.max_seconds and row["step"] < trainer.total_steps):
            self.time_capped = True  # a machine busier than when the steps were timed: end here, with a checkpoint
            trainer.stop()
        due = self._last_monitor is None or row["step"] - self._last_monitor >= (self.monitor_every or 0)
        if self.monitor_every and due:
            row.update(self.monitor(trainer))
            self._last_monitor = row["step"]
        self.history.append(row)
        self.progress.value = row["step"]
        # at most every redraw_every_s, and never more than a fifth of the time: a redraw (~0.1-0.3 s on a
        # busy CPU) runs in the training thread, so frequent redraws would slow the run they show
        if time.perf_counter() - self._last_draw >= max(self.redraw_every_s, 4 * self._draw_cost):
            self.redraw()

    def on_epoch(self, trainer, summary: dict) -> None:
        self.status.value = f"epoch {summary['epoch'] + 1} done: mean loss {summary['loss']:.4f}"

    def monitor(self, trainer) -> dict:
        """Collapse metrics of the target encoder on a fixed batch of test images: the std of the average-
        pooled features (`evaluate.feature_std`) and their effective rank (`evaluate.rankme`)."""
        from ijepa_viz.model import feature_std, rankme

        x = self._eval_images(trainer.device)
        model = trainer.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            feats = model.target_network(x).mean(dim=1).float().cpu()  # (n, D): average-pooled, as the paper
        model.train(was_training)
        return {"feature_std": float(feature_std(feats)), "rankme": float(rankme(feats))}

    def _eval_images(self, device) -> torch.Tensor:
        if self._eval_batch is None:
            from ijepa_viz.data import dataset_stats, load_uint8

            imgs, _ = load_uint8(self.cfg.data, "test", self.cfg.model.img_size, limit=self.eval_images)
            mean, std = dataset_stats(self.cfg.data.name)
            x = imgs.float() / 255
            m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
            self._eval_batch = (x - m) / s
        return self._eval_batch.to(device)

    # -- drawing ---------------------------------------------------------------------------------
    def redraw(self) -> None:
        """Redraw the figure from `history` (during a run: at most every `redraw_every_s` seconds, and at most
        a fifth of the wall time)."""
        start = time.perf_counter()
        a = self.axes
        plots.plot_loss(a["loss"], self.history)
        plots.plot_collapse(a["collapse"], self.history)
        t = self.trainer
        if t is not None:
            step = self.history[-1]["step"] if self.history else 0
            plots.plot_schedules(a["schedules"], self.cfg, t.total_steps, t.steps_per_epoch, step=step)
        self.image_widget.value = figure_png(self.figure)
        self._last_draw = time.perf_counter()
        self._draw_cost = self._last_draw - start


def training_dashboard(cfg: Config, monitor_every: Optional[int] = None, eval_images: int = 256,
                       resume: bool = False, loader=None) -> TrainingDashboard:
    """A training dashboard for `cfg`: press Start to train in the background, Stop to end the run after the
    current step with a checkpoint in `cfg.train.out_dir`.

    Args:
        monitor_every: every this many steps, also compute the feature std and RankMe of the target encoder
            on `eval_images` test images (None: only the per-step 'target_std').
        resume: continue from `<out_dir>/checkpoint.pt` when it exists.
        loader: batches to train on instead of `cfg.data` (as `Trainer`).
    """
    return TrainingDashboard(cfg, monitor_every, eval_images, resume, loader=loader)


def run_training(cfg: Config, live: bool = True, monitor_every: Optional[int] = None, eval_images: int = 256,
                 resume: bool = False, progress: Optional[bool] = None, max_seconds: Optional[float] = None):
    """Train `cfg` here and now (blocking) and return the `TrainResult`; what notebooks call.

    live=True shows a `TrainingDashboard` that updates while the cell runs (interrupt the kernel to stop early:
    the Trainer ends the step and writes its checkpoint); live=False draws nothing. `progress` shows the
    Trainer's tqdm bar (default: only when not live; the dashboard has its own). A fresh run (resume=False)
    replaces the metrics.jsonl of an earlier run in the same out_dir, so the plots show this run only.
    The result's `history` is the dashboard's: the metrics rows, with 'feature_std' and 'rankme' added every
    `monitor_every` steps; its `initial_state` holds the encoders' weights when the run started
    (`initial_weights`, for `weight_change`). `max_seconds` ends the run early (with its checkpoint) once it has
    trained that long: a bound on the cell's time when the machine is busier than when the steps were timed
    (`result.time_capped` says whether it did).
    """
    if not resume:
        metrics = Path(cfg.train.out_dir) / "metrics.jsonl"
        if metrics.exists():
            metrics.unlink()
    dash = TrainingDashboard(cfg, monitor_every, eval_images, resume, redraw_every_s=1.0, max_seconds=max_seconds)
    if live:
        from IPython.display import display

        dash.start_button.layout.display = "none"
        display(dash)
    result = dash.start(block=True, progress=(not live) if progress is None else progress)
    result.history = dash.history
    result.initial_state = dash.initial_state
    result.time_capped = dash.time_capped
    return result


# -- the notebooks' runs ------------------------------------------------------------------------------

CIFAR10_ENV = "IJEPA_VIZ_CIFAR10"


def local_cifar10() -> Optional[Path]:
    """A CIFAR-10 on this machine for the notebooks, or None (they then train on the built-in 'dots'):

    1. `$IJEPA_VIZ_CIFAR10`: an ImageFolder tree (a folder with train/ and test/), or torchvision's
       `cifar-10-batches-py` folder or the folder that holds it. Any other value raises ValueError (a variable
       that is set but wrong should not silently fall back to 'dots');
    2. `<repo>/data/cifar-10-batches-py`: torchvision's download (`--set data.download=true` once, online).
    """
    env = os.environ.get(CIFAR10_ENV, "").strip()
    if env:
        root = Path(env).expanduser()
        if (root / "train").is_dir():
            return root
        if (root / "cifar-10-batches-py").is_dir():
            return root
        if root.name == "cifar-10-batches-py" and root.is_dir():
            return root.parent
        raise ValueError(f"${CIFAR10_ENV}={env!r} is neither an ImageFolder tree (train/ and test/ folders) nor "
                         f"torchvision's cifar-10-batches-py; fix it, or unset it to use the built-in dots")
    if (REPO_ROOT / "data" / "cifar-10-batches-py").is_dir():
        return REPO_ROOT / "data"
    return None


QUICK_OVERRIDES = [  # a 2-block, 64-wide ViT on 256 dots images: a handful of steps in a few seconds
    "model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.pred_embed_dim=32", "model.pred_depth=1",
    "data.name=dots", "data.batch_size=32", "data.shapes_train_size=256", "data.shapes_test_size=128",
    "train.steps=6", "train.log_every=1", "optim.warmup_epochs=0.25",
]
# Normal mode: the preset as it is, a metrics row every step (a loss curve of hundreds of points, not a handful)
NORMAL_OVERRIDES = ["train.log_every=1", "train.checkpoint_every=100"]
# What a notebook run spends beyond the timed steps: the dashboard's redraws (at most a fifth of the time), its
# monitors, the trainer's collapse checks and checkpoints. The timed steps get the budget divided by this.
DASHBOARD_OVERHEAD = 1.25


def steps_for_budget(cfg: Config, seconds: float, min_steps: int = 20, max_steps: int = 5000) -> int:
    """How many optimiser steps of `cfg` fit in `seconds` on this machine: times two steps (after one warm-up
    step) of a throwaway model on random images, so the run's schedules can span exactly the steps it does."""
    from ijepa_viz.train import Trainer

    B, S = cfg.data.batch_size, cfg.model.img_size
    images = torch.randn(B, 3, S, S)
    probe = Trainer(override(cfg, ["train.steps=3", "train.collapse_every=0"]),
                    loader=[(images, torch.zeros(B))], progress=False)
    probe.train_step(images)  # warm-up: allocations, kernels
    t = time.perf_counter()
    for _ in range(2):
        probe.train_step(images)
    per_step = (time.perf_counter() - t) / 2
    return int(min(max_steps, max(min_steps, seconds / per_step)))


def _train_size(cfg: Config) -> int:
    """Training images of cfg.data (for the warmup length); counted on disk for an imagefolder."""
    if cfg.data.name in ("shapes", "dots"):
        return cfg.data.shapes_train_size
    if cfg.data.name == "imagefolder":
        return sum(1 for f in (Path(cfg.data.root) / "train").rglob("*") if f.is_file())
    return 50_000  # CIFAR-10/100


def notebook_config(quick: bool, out_dir: Path | str = NOTEBOOK_RUN, extra: Sequence[str] = (),
                    budget_s: float = 150.0, preset: str = "cpu-demo") -> Config:
    """The training run of notebook 03: `preset` (default 'cpu-demo': a 4-block, 128-wide ViT/4 at 32 px with
    VICReg terms and a faster EMA, which learns the built-in dots within minutes) on 'dots', or on
    CIFAR-10 when `local_cifar10` finds one, for as many steps as fit in `budget_s` seconds on this machine
    (`steps_for_budget`, leaving `DASHBOARD_OVERHEAD` for the dashboard), with a warmup of a tenth of them and
    a metrics row every step. `quick` shrinks it
    to a 2-block model for 6 steps, always on 'dots'. `extra` overrides come last; a 'train.steps=N' among
    them replaces the timing (the config is then the same on every machine)."""
    from ijepa_viz.config import get_preset

    sets = ["mask.min_keep=4", f"train.out_dir={out_dir}"]
    sets += QUICK_OVERRIDES if quick else NORMAL_OVERRIDES
    cifar = None if quick else local_cifar10()
    if cifar is not None and (cifar / "train").is_dir():
        sets += ["data.name=imagefolder", f"data.root={cifar}"]
    elif cifar is not None:
        sets += ["data.name=cifar10", f"data.root={cifar}", "data.download=false"]
    cfg = override(get_preset(preset), sets)
    if not quick:
        fixed = [e.split("=", 1)[1] for e in extra if e.replace(" ", "").startswith("train.steps=")]
        steps = int(fixed[-1]) if fixed else steps_for_budget(cfg, budget_s / DASHBOARD_OVERHEAD)
        per_epoch = max(1, _train_size(cfg) // cfg.data.batch_size)
        cfg = override(cfg, [f"train.steps={steps}", f"optim.warmup_epochs={max(1, steps // 10) / per_epoch}"])
    return override(cfg, list(extra))


def run_summary(result, cfg: Config) -> str:
    """A plain sentence on what a run did: steps, images, seconds, passes over the training set."""
    seen = result.step * cfg.data.batch_size
    n = _train_size(cfg)
    speed = seen / max(result.wall_time, 1e-9)
    text = (f"{result.step} optimiser steps of {cfg.data.batch_size} images in {result.wall_time:.0f} s "
            f"({speed:.0f} images a second): {seen:,} images, {seen / n:.1f} passes over the {n:,} training images "
            f"of '{cfg.data.name}'. (The paper trains for 300 passes over the 1.28 million ImageNet images.)")
    planned = cfg.train.steps
    if result.stopped_early and planned:
        why = ("the time cap: the machine ran slower than when the steps were timed"
               if getattr(result, "time_capped", False) else result.stop_reason or "stopped")
        text += f" It stopped early, at step {result.step} of {planned} ({why})."
    return text


# -- how far the weights moved ------------------------------------------------------------------------

def initial_weights(model) -> dict[str, dict[str, torch.Tensor]]:
    """A copy of the encoders' weights now: {'context encoder': {name: tensor}, 'target encoder': {...}}
    (no target encoder without the EMA). Taken before training, it is the reference of `weight_change`."""
    parts = {"context encoder": model.encoder, "target encoder": getattr(model, "target_encoder", None)}
    return {name: {k: v.detach().float().cpu().clone() for k, v in m.state_dict().items() if v.is_floating_point()}
            for name, m in parts.items() if m is not None}


def weight_change(model, initial: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """How far each encoder moved from `initial` (`initial_weights`): ||w - w0|| / ||w0|| over all its
    weights, as a fraction (0: unchanged; 0.01: moved by 1% of its size)."""
    parts = {"context encoder": model.encoder, "target encoder": getattr(model, "target_encoder", None)}
    out = {}
    for name, ref in initial.items():
        now = parts.get(name).state_dict()
        diff = sum(float((now[k].detach().float().cpu() - v).pow(2).sum()) for k, v in ref.items())
        size = sum(float(v.pow(2).sum()) for v in ref.values())
        out[name] = (diff / max(size, 1e-30)) ** 0.5
    return out


def ema_init_share(cfg: Config, steps: int, steps_per_epoch: Optional[int] = None) -> float:
    """The weight that the target encoder's *initial* weights still have after `steps` EMA updates.

    Each step sets target <- m_t target + (1 - m_t) context, so after T steps the initial target weights
    enter the target with the factor m_0 m_1 ... m_(T-1) (the momenta of `schedules.schedule` over the run). With
    the paper's m >= 0.996, 50 steps leave that factor at 0.996^50 = 0.82 or more: the target encoder is still
    mostly its random initialisation, whatever the context encoder learned."""
    from ijepa_viz.schedules import schedule

    spe = steps_per_epoch or max(1, _train_size(cfg) // cfg.data.batch_size)
    total = cfg.train.steps or cfg.train.epochs * spe
    warmup = int(round(cfg.optim.warmup_epochs * spe))
    return float(np.prod([schedule(t, total, warmup, cfg.optim, steps_per_epoch=spe)[2] for t in range(steps)]))


# -- features and short runs for the collapse section of notebook 03 ---------------------------------

def target_features(model, cfg: Config, n: int = 256) -> torch.Tensor:
    """Average-pooled target-encoder features of `n` test images of cfg.data: float (n, D)."""
    from ijepa_viz.evaluate import features_for

    return features_for(model, cfg, "test", limit=n, progress=False)[0]


def untrained_like(cfg: Config):
    """The network a run of `cfg` starts from: `IJEPA(cfg.model)` after `torch.manual_seed(cfg.train.seed)`,
    as the Trainer builds it, in eval mode. The global RNG is left as it was."""
    from ijepa_viz.model import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return build_model(cfg.model, ema=True).eval()


# A 2-block, 64-wide ViT/4 at 32 px on 512 shapes images, batch 32, lr 3e-3, the paper's EMA 0.996 -> 1.0 and
# a collapse check every 5 steps. Without the EMA it collapses within about 20 steps (probe RankMe 2.8 -> 1.4);
# with it the RankMe stays near its start. About 3 s a run for 60 steps on one core.
EMA_RUN_OVERRIDES = [
    "model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.pred_embed_dim=32", "model.pred_depth=1",
    "data.name=shapes", "data.batch_size=32", "data.shapes_train_size=512", "data.shapes_test_size=256",
    "mask.min_keep=4", "optim.lr=3e-3", "optim.warmup_epochs=0.3", "optim.ema_start=0.996", "optim.ema_end=1.0",
    "train.collapse_every=5", "train.log_every=1", "train.checkpoint_every=100000", "train.checkpoint_minutes=0",
    "train.precision=fp32",
]


def ema_runs(quick: bool, out_dir: Path | str = RUNS_DIR / "ema-on-off", steps: Optional[int] = None) -> dict:
    """Two short runs of a small model that differ only in train.ema: {'EMA on': result, 'EMA off': result}.

    cpu-tiny's recipe with `EMA_RUN_OVERRIDES`, for `steps` steps (default 60, 30 in quick mode). Each
    `TrainResult` also has `cfg` and `initial_state` (`initial_weights` before the first step). The run
    without the EMA collapses and the Trainer warns about it once."""
    from ijepa_viz.config import get_preset
    from ijepa_viz.train import Trainer

    steps = steps or (30 if quick else 60)
    out = {}
    for name, ema in (("EMA on", "true"), ("EMA off", "false")):
        cfg = override(get_preset("cpu-tiny"), EMA_RUN_OVERRIDES + [
            f"train.steps={steps}", f"train.ema={ema}", f"train.out_dir={Path(out_dir) / name.replace(' ', '-')}"])
        trainer = Trainer(cfg, progress=False)
        initial = initial_weights(trainer.model)
        result = trainer.fit()
        result.cfg, result.initial_state = cfg, initial
        out[name] = result
    return out
