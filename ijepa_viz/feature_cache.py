"""The feature cache of `evaluate`: an encoder's features of a split, kept on disk for the next evaluation.

Extracting features is most of an evaluation's time. A file here is named by a digest of everything the
features depend on (the encoder's weights, the exact images, the settings), so a result never comes from
other weights or images, and the untrained encoder, the same for every checkpoint of one architecture and
seed, is extracted once.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ijepa_viz.checkpoint import atomic_save

__all__ = ["FEATURE_CACHE_ENV", "FEATURE_CACHE_FILES", "default_feature_cache"]

FEATURE_CACHE_ENV = "IJEPA_VIZ_FEATURE_CACHE"  # the CLI's default cache folder, when set
FEATURE_CACHE_FILES = 16  # a cache folder keeps the most recently used files, at most this many


def default_feature_cache() -> Path:
    """`$IJEPA_VIZ_FEATURE_CACHE`, else `$XDG_CACHE_HOME/ijepa_viz/features` (`~/.cache/...`)."""
    if os.environ.get(FEATURE_CACHE_ENV):
        return Path(os.environ[FEATURE_CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ijepa_viz" / "features"


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().data)


def _images_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """A digest of the exact uint8 images and their labels."""
    h = hashlib.sha256()
    _hash_tensor(h, images)
    _hash_tensor(h, labels)
    return h.hexdigest()


def _feature_key(encoder: nn.Module, images_digest: str, extra: tuple) -> str:
    """A digest of everything the features depend on: the encoder's class and weights, the images
    (`_images_digest`), and `extra` (resolution, normalisation, batch size, precision, the kept patches), with
    torch's version. A checkpoint trained further, or other images, get another key; the same untrained encoder
    of the same seed and architecture gets the same key for every checkpoint."""
    h = hashlib.sha256(f"{type(encoder).__name__}|{images_digest}|{extra}|{torch.__version__}".encode())
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        _hash_tensor(h, t)
    return h.hexdigest()[:32]


def _cached_extract(cache_dir: Optional[Path], key: Optional[str], extract) -> tuple[tuple, bool]:
    """`extract()`'s (features, labels, patches), read from `cache_dir/<key>.pt` when there, else computed and
    written there atomically (a killed run leaves no half-written file). Returns (result, was_cached)."""
    if cache_dir is None or key is None:
        return extract(), False
    path = cache_dir / f"{key}.pt"
    if path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            os.utime(path)  # recently used: kept longest
            return (saved["features"], saved["labels"], saved.get("patches")), True
        except Exception:  # unreadable (another version, a damaged disk): compute it again
            path.unlink(missing_ok=True)
    out = extract()
    try:
        atomic_save({"features": out[0], "labels": out[1], "patches": out[2]}, path)
        files = sorted(cache_dir.glob("*.pt"), key=lambda f: f.stat().st_mtime, reverse=True)
        for old in files[FEATURE_CACHE_FILES:]:
            old.unlink(missing_ok=True)
    except OSError as e:  # a full or read-only disk costs the next run its head start, not this run its result
        warnings.warn(f"could not keep features in the cache folder {str(cache_dir)!r} ({e}); this evaluation "
                      f"goes on without it. Free space there, or pass --feature-cache DIR / --no-feature-cache",
                      stacklevel=2)
    return out, False
