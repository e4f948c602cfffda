"""Visualisation in three layers:

* `ijepa_viz.viz.features` - compute: embeddings, PCA colours, t-SNE, predictions (cached where slow);
* `ijepa_viz.viz.plots`    - draw: `plot_*(ax, ...)` draws on a matplotlib Axes and returns it;
* `ijepa_viz.viz.widgets`  - wire: `mask_explorer(...)`, `training_dashboard(...)` return ipywidgets boxes;
* `ijepa_viz.viz.verdicts` - text: sentences computed from results (`probe_verdict`, `prediction_verdict`).

The submodules load on first use, so `import ijepa_viz.viz` stays cheap and needs no ipywidgets.
"""
import importlib

__all__ = ["features", "plots", "widgets", "verdicts"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
