"""Small I-JEPA weights that ship inside the package, loaded by name and offline, each with its model card.

Nobody publishes I-JEPA weights small enough for a laptop, so this toolkit trains its own with
`ijepa-viz train` and ships them in `ijepa_viz/weights/`:

* `NAME.safetensors`: the context encoder, the EMA target encoder and the predictor, stored as float16
  (half the bytes of float32; loaded back as float32), with the training config in the file's metadata;
* `NAME.json`: the model card: the exact training command, the commit, epochs, steps and wall time, and the
  evaluation table (linear probe and kNN of the target encoder beside the untrained encoder and raw pixels),
  measured on the float16 weights as shipped.

    import ijepa_viz as ij
    model, cfg = ij.load_pretrained("dots-cpu-demo")     # an IJEPA in eval mode, and its Config
    print(model.card["eval"]["summary"])

`ijepa-viz eval --checkpoint dots-cpu-demo` evaluates a shipped model by name. `benchmarks/ship_weights.py`
makes the files from a training checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ijepa_viz.checkpoint import CheckpointError, _atomic_text, build_for, load_weights
from ijepa_viz.config import Config, ConfigError
from ijepa_viz.official import _read_safetensors, _save_safetensors

__all__ = ["WEIGHTS_DIR", "shipped", "is_shipped", "load_shipped", "save_shipped", "round_trip", "load_pretrained"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_STORE_DTYPE = torch.float16
_PARTS = ("encoder.", "target_encoder.", "predictor.")


def shipped() -> dict[str, str]:
    """The shipped models: {name: one-line description}, from the cards in `WEIGHTS_DIR`."""
    out = {}
    for card in sorted(WEIGHTS_DIR.glob("*.json")):
        if (card.with_suffix(".safetensors")).is_file():
            out[card.stem] = json.loads(card.read_text()).get("description", "")
    return out


def is_shipped(name: str | Path) -> bool:
    """True when `name` is the name of a shipped model (not a path to a file)."""
    return isinstance(name, str) and "/" not in name and name in shipped()


def load_shipped(name: str, map_location="cpu") -> tuple[nn.Module, Config]:
    """A shipped model by name: (IJEPA in eval mode, float32, with `.card`, its model card), and its Config."""
    names = shipped()
    if name not in names:
        raise CheckpointError(f"no shipped model is called {name!r}; shipped models: "
                              f"{', '.join(names) or '(none installed)'}")
    path = WEIGHTS_DIR / f"{name}.safetensors"
    tensors, meta = _read_safetensors(path, "reinstall ijepa_viz")
    try:
        cfg = Config.from_dict(json.loads(meta["config"]))
    except (KeyError, json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"{str(path)!r} carries no valid config in its metadata ({e}); reinstall ijepa_viz") \
            from None
    model = build_for(cfg.model, ema=True)
    load_weights(model, {k: v.float() for k, v in tensors.items()}, repr(str(path)))
    model.card = json.loads((WEIGHTS_DIR / f"{name}.json").read_text())
    if str(map_location) != "cpu":
        model = model.to(map_location)
    return model.eval(), cfg


def save_shipped(model: nn.Module, cfg: Config, name: str, card: dict, folder: Optional[Path] = None) -> Path:
    """Write `folder/NAME.safetensors` (float16 weights of the three networks, config in the metadata) and
    `folder/NAME.json` (the card), each atomically. Returns the weights path."""
    folder = Path(folder or WEIGHTS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v for k, v in model.state_dict().items() if k.startswith(_PARTS)}
    if not any(k.startswith("target_encoder.") for k in sd):
        raise CheckpointError("only models trained with the EMA target encoder can be shipped (train.ema=true)")
    sd = {k: v.to(_STORE_DTYPE) if v.is_floating_point() else v for k, v in sd.items()}
    path = _save_safetensors(sd, folder / f"{name}.safetensors",
                             {"format": "pt", "config": json.dumps(cfg.to_dict())})
    card_path = _atomic_text(folder / f"{name}.json", json.dumps({"name": name, **card}, indent=2) + "\n")
    for p in (path, card_path):
        p.chmod(0o644)  # package data: readable by every user of an installed copy
    return path


def round_trip(model: nn.Module) -> nn.Module:
    """`model` with its weights rounded to the shipped float16 and back (for measuring what ships), in place."""
    with torch.no_grad():
        for p in model.state_dict().values():
            if p.is_floating_point():
                p.copy_(p.to(_STORE_DTYPE).float())
    return model


def load_pretrained(name: str, *, map_location="cpu", **timm_overrides) -> tuple[nn.Module, Config]:
    """Weights by name: a shipped model (`shipped()`, offline), else an official release or a timm name
    (`ijepa_viz.official.load_pretrained`, downloaded on first use)."""
    if is_shipped(name):
        return load_shipped(name, map_location=map_location)
    from ijepa_viz.official import load_pretrained as load_released

    return load_released(name, map_location=map_location, **timm_overrides)
