"""ijepa_viz: a teaching toolkit for I-JEPA (Assran et al., 2023, arXiv 2301.08243).

The few names a notebook needs, in one namespace:

    import ijepa_viz as ij

    cfg = ij.get_preset("cpu-tiny")                      # Config: model, mask, data, optim, train
    cfg = ij.override(cfg, ["optim.lr=5e-4"])            # the CLI's --set, as a function
    model, cfg = ij.load_pretrained("dots-cpu-demo")     # shipped weights, offline, with model.card
    result = ij.train(cfg)                               # Trainer(cfg).fit(): model, history, checkpoint
    model, cfg = ij.load_model("runs/x/checkpoint.pt")   # a training checkpoint
    model, cfg = ij.load_official("IN1K-vit.h.14-300e.pth.tar")  # a checkpoint of the official code
    table = ij.evaluate_model(model=model, cfg=cfg)      # linear probe + kNN beside two baselines

Also: `IJEPA` and `MaskCollator` (the method), `Trainer`, `load_images` (raw uint8 images of a dataset),
`shipped_weights()`, and the submodules `ij.viz` (features, plots, widgets, verdicts). Everything loads on
first use, so `import ijepa_viz` stays cheap.
"""
import importlib

from ijepa_viz.config import Config, ConfigError, PRESETS, get_preset, override

__version__ = "0.1.0"

# public name -> (module, attribute); imported on first access
_LAZY = {
    "IJEPA": ("ijepa_viz.model", "IJEPA"),
    "MaskCollator": ("ijepa_viz.masks", "MaskCollator"),
    "Trainer": ("ijepa_viz.train", "Trainer"),
    "train": ("ijepa_viz.train", "train"),
    "load_model": ("ijepa_viz.checkpoint", "load_model"),
    # not `evaluate`: that name is the submodule ijepa_viz.evaluate, which would replace it once imported
    "evaluate_model": ("ijepa_viz.evaluate", "evaluate"),
    "format_table": ("ijepa_viz.evaluate", "format_table"),
    "load_images": ("ijepa_viz.data", "load_uint8"),
    "class_names": ("ijepa_viz.data", "class_names"),
    "load_pretrained": ("ijepa_viz.pretrained", "load_pretrained"),
    "load_official": ("ijepa_viz.official", "load_official"),
    "shipped_weights": ("ijepa_viz.pretrained", "shipped"),
    "viz": ("ijepa_viz.viz", None),
}

__all__ = ["Config", "ConfigError", "PRESETS", "get_preset", "override", "__version__", *_LAZY]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'ijepa_viz' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
