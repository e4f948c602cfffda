"""The in-memory path for small datasets: `UInt8Cache` decodes a split once into a uint8 tensor.

'shapes' is rendered, torchvision's arrays are taken as they are, and an ImageFolder split is decoded with PIL
once, file by file. Decoded splits are memoised per process, so a notebook or an evaluation right after training
decodes nothing new. `load_uint8` returns such a split, resized, for display and probing.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ijepa_viz.config import DataConfig
from ijepa_viz.data.catalog import BUILTIN, _FIXED_CLASSES, DataError, _check_split
from ijepa_viz.data.datasets import (ImageFolderDataset, _bad_image, _first_image_size, _load_rgb,
                                     _torchvision_dataset)

__all__ = ["UInt8Cache", "load_uint8"]


_MEMO: dict[tuple, "UInt8Cache"] = {}  # decoded splits of this process, so notebooks decode each one once
_MEMO_MAX = 4


def _subset(n: int, limit: Optional[int]) -> np.ndarray:
    """`limit` evenly spaced indices of range(n) (all of them without a limit): class-sorted folders stay balanced."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max(limit, 1)).round().astype(np.int64))


def _resize_uint8(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 (N, 3, h, w) -> uint8 (N, 3, size, size), bilinear with antialiasing (chunked to bound memory)."""
    if images.shape[-2:] == (size, size):
        return images
    out = [F.interpolate(images[i:i + chunk].float(), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
           for i in range(0, len(images), chunk)]
    return torch.cat(out) if out else images.new_zeros((0, 3, size, size))

class UInt8Cache:
    """A whole split decoded once into memory: images uint8 (N, 3, S, S), labels int64 (N,), class names.

    `UInt8Cache.build(cfg, split, img_size)` makes one: 'shapes' renders at img_size; CIFAR-10/100 and
    Fashion-MNIST use torchvision's arrays at their own resolution (Fashion-MNIST's gray channel is repeated);
    STL-10 likewise; an imagefolder split is decoded with PIL once, file by file (threads when
    cfg.num_workers > 1) behind a progress bar, at the size of its first image (others are resized and
    center-cropped to it). Unreadable files follow cfg.on_bad_image: 'error' raises, 'skip' warns and drops them.
    Built caches are memoised per process (`UInt8Cache.clear_memo()` forgets them, e.g. after files changed
    on disk). Decoding the 60,000 32 px JPEGs of CIFAR-10 in ImageFolder layout
    takes about 12 s on one core (once per process).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}")
        self.images, self.labels, self.classes = images, labels.long(), list(classes)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    @staticmethod
    def clear_memo() -> None:
        """Forget the splits decoded so far in this process."""
        _MEMO.clear()

    @classmethod
    def build(cls, cfg: DataConfig, split: str, img_size: int, limit: Optional[int] = None,
              keep_native: bool = True) -> "UInt8Cache":
        """Decode (or render) `split` of cfg's dataset; `limit` keeps that many evenly spaced images ('shapes':
        the first ones). keep_native=True keeps a dataset's own resolution; False resizes to img_size."""
        _check_split(split)
        key = (cfg.name, os.path.abspath(os.path.expanduser(cfg.root)), split, limit, keep_native,
               img_size if (cfg.name in (*BUILTIN, "imagefolder") or not keep_native) else None,
               (cfg.shapes_train_size, cfg.shapes_test_size) if cfg.name in BUILTIN else None,
               cfg.on_bad_image if cfg.name == "imagefolder" else None)
        if key in _MEMO:
            return _MEMO[key]
        if cfg.name in BUILTIN:
            cache = cls._render_builtin(cfg, split, img_size, limit)
        elif cfg.name == "imagefolder":
            ds = ImageFolderDataset(cfg.root, split, on_bad_image=cfg.on_bad_image)
            size = min(_first_image_size(ds)) if keep_native else img_size
            cache = cls._decode_files(ds, _subset(len(ds), limit), size, cfg.on_bad_image, cfg.num_workers)
        else:
            cache = cls._from_torchvision(cfg, split, limit)
        if not keep_native:
            cache = UInt8Cache(_resize_uint8(cache.images, img_size), cache.labels, cache.classes)
        while len(_MEMO) >= _MEMO_MAX:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[key] = cache
        return cache

    @classmethod
    def _render_builtin(cls, cfg: DataConfig, split: str, img_size: int, limit: Optional[int]) -> "UInt8Cache":
        n = cfg.shapes_train_size if split == "train" else cfg.shapes_test_size
        n = n if limit is None else min(n, limit)
        chunk = 1024
        images = torch.empty((n, 3, img_size, img_size), dtype=torch.uint8)
        labels = torch.empty(n, dtype=torch.int64)
        for start in range(0, n, chunk):
            idx = np.arange(start, min(n, start + chunk))
            images[idx[0]:idx[-1] + 1], labels[idx[0]:idx[-1] + 1] = BUILTIN[cfg.name][1](idx, img_size, 0, split)
        return cls(images, labels, _FIXED_CLASSES[cfg.name])

    @classmethod
    def _from_torchvision(cls, cfg: DataConfig, split: str, limit: Optional[int]) -> "UInt8Cache":
        ds = _torchvision_dataset(cfg, split, transform=None)
        data = ds.data  # CIFAR: ndarray (N, 32, 32, 3); STL-10: ndarray (N, 3, 96, 96); Fashion: tensor (N, 28, 28)
        labels = getattr(ds, "targets", None)
        labels = torch.as_tensor(np.asarray(labels if labels is not None else ds.labels), dtype=torch.int64)
        images = torch.as_tensor(np.asarray(data))
        if images.ndim == 3:
            images = images.unsqueeze(1).expand(-1, 3, -1, -1)
        elif images.shape[-1] == 3:
            images = images.permute(0, 3, 1, 2)
        idx = torch.from_numpy(_subset(len(images), limit))
        return cls(images[idx].contiguous(), labels[idx], _FIXED_CLASSES[cfg.name])

    @classmethod
    def _decode_files(cls, ds: ImageFolderDataset, indices: np.ndarray, size: int, policy: str,
                      threads: int) -> "UInt8Cache":
        from tqdm.auto import tqdm

        arrays = np.empty((len(indices), size, size, 3), dtype=np.uint8)
        ok = np.ones(len(indices), dtype=bool)

        def decode(k: int) -> Optional[tuple[str, BaseException]]:
            path = ds.samples[indices[k]][0]
            try:
                arrays[k] = np.asarray(_load_rgb(path, size))
            except Exception as e:  # noqa: BLE001 - any decoding failure is a bad image
                ok[k] = False
                return path, e
            return None

        pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
        results = pool.map(decode, range(len(indices))) if pool else map(decode, range(len(indices)))
        bar = tqdm(total=len(indices), desc=f"decoding {ds.split_dir}", unit="img", mininterval=1.0,
                   disable=len(indices) < 1000)
        try:
            for failure in results:  # in file order, as each one is done
                if failure is not None:  # 'error' raises here, at the first bad file
                    _bad_image(failure[0], failure[1], policy, "dropping it from the in-memory split")
                bar.update()
        finally:
            bar.close()
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)
        if not ok.any():
            raise DataError(f"no image in {str(ds.split_dir)!r} can be read; check the files")
        images = torch.from_numpy(arrays[ok]).permute(0, 3, 1, 2).contiguous()
        labels = torch.as_tensor([ds.samples[i][1] for i in indices[ok]], dtype=torch.int64)
        return cls(images, labels, ds.classes)

def load_uint8(cfg: DataConfig, split: str, img_size: int, limit: Optional[int] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw images for display and probing: (uint8 (N, 3, img_size, img_size), labels int64 (N,)).

    Un-augmented, resized (shorter side) and center-cropped to img_size. `limit` keeps that many images,
    evenly spaced over the split so class-sorted folders stay balanced ('shapes': the first `limit`).
    """
    cache = UInt8Cache.build(cfg, split, img_size, limit=limit, keep_native=False)
    return cache.images, cache.labels
