"""Checkpoints: atomic writes, safe loads.

Every write goes to a temporary file in the same folder, is flushed to disk, then renamed over the target, so a
killed process leaves either the old checkpoint or the new one, never half a file. Every load uses
`torch.load(..., weights_only=True)`, which refuses pickles that would run code.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1  # bump when the layout of a training checkpoint changes


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit; the message names the file and the fix."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """`torch.save` to `path` through a temporary file and a rename (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def safe_load(path: str | Path, map_location="cpu") -> Any:
    """Load a `torch.save` file with `weights_only=True`; clear errors for every way it can go wrong."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; check the path (or train first)")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder; pass the .pt file inside it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes): the write was cut off; "
                              f"use an earlier checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported global" in msg or "GLOBAL" in msg:
            raise CheckpointError(
                f"refused to load {str(path)!r}: it contains Python objects that are not plain tensors and "
                f"could run code when unpickled (weights_only=True refused it). Only load files you trust; "
                f"convert trusted ones with `ijepa-viz convert`") from None
        raise CheckpointError(f"{str(path)!r} is not a PyTorch checkpoint (unpickling failed: "
                              f"{msg.splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(f"{str(path)!r} is not a readable PyTorch checkpoint: it is truncated, corrupt or "
                              f"another kind of file ({first}); use an earlier checkpoint") from None


def load_training_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load and check a checkpoint written by `ijepa_viz.train`."""
    ckpt = safe_load(path, map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "format_version" not in ckpt:
        raise CheckpointError(f"{str(path)!r} is not an ijepa_viz training checkpoint (no 'model'/'format_version' "
                              f"entries); for official I-JEPA .pth.tar files use `ijepa-viz convert`")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r} has format version {ckpt['format_version']}, newer than this "
                              f"ijepa_viz understands ({FORMAT_VERSION}); upgrade ijepa_viz to read it")
    return ckpt
