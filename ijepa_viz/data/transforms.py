"""Augmentation, two ways: per image with torchvision (`build_transform`), and a whole uint8 batch at once
(`crop_params`, `augment_batch`) for the in-memory loader.

`build_transform(cfg, img_size, train=True)` is the official I-JEPA augmentation (RandomResizedCrop, optional
flip, normalise) and `train=False` the eval transform (resize, center crop, normalise). `augment_batch` draws
the same RandomResizedCrop per sample and resamples the whole batch through one affine grid (~36,000 images/s
at 32 px on one core); crops are continuous (sub-pixel) rather than rounded to whole pixels.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ijepa_viz.config import DataConfig
from ijepa_viz.data.catalog import dataset_stats

__all__ = ["ToRGB", "build_transform", "crop_params", "augment_batch"]


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: grayscale and palette are expanded; transparency is composited on white;
    16-bit and float grayscale are rescaled to 8 bits first."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F" and arr.max(initial=0) <= 1:  # float in [0, 1]
            arr = arr * 255
        elif arr.max(initial=0) > 255:  # 16 bits
            arr = arr / 257
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


class ToRGB:
    """Transform: PIL image of any mode -> RGB PIL image; uint8 tensor (1, H, W) -> (3, H, W); else unchanged."""

    def __call__(self, img: Any) -> Any:
        if isinstance(img, Image.Image):
            return _pil_to_rgb(img)
        if torch.is_tensor(img) and img.ndim == 3 and img.shape[0] == 1:
            return img.expand(3, -1, -1)
        return img

    def __repr__(self) -> str:
        return "ToRGB()"


def build_transform(cfg: DataConfig, img_size: int, train: bool) -> Callable[[Any], torch.Tensor]:
    """The per-image transform: PIL image or uint8 tensor (C, h, w) -> normalised float tensor (3, img_size, img_size).

    train=True is the official I-JEPA augmentation: RandomResizedCrop(img_size, scale=cfg.crop_scale,
    ratio=(3/4, 4/3)), a horizontal flip if cfg.hflip, to float in [0, 1], Normalize(mean, std) of cfg.name.
    train=False: resize the shorter side to img_size, center crop img_size, to float, normalise.
    (torchvision.transforms.v2: ToImage + ToDtype(scale=True) is ToTensor, and also accepts uint8 tensors.)
    """
    from torchvision.transforms import v2

    mean, std = dataset_stats(cfg.name)
    if train:
        steps = [ToRGB(), v2.RandomResizedCrop(img_size, scale=tuple(cfg.crop_scale), antialias=True)]
        if cfg.hflip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        steps = [ToRGB(), v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size)]
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), v2.ToPureTensor()]
    return v2.Compose(steps)

def crop_params(n: int, h: int, w: int, crop_scale: Sequence[float] = (0.3, 1.0), hflip: bool = False,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """RandomResizedCrop (+ optional flip) for n samples of h x w images, as affine matrices theta (n, 2, 3).

    Drawn as torchvision draws it, per sample: area fraction uniform in crop_scale, aspect ratio log-uniform in
    (3/4, 4/3), 10 tries, then the largest centred crop with a ratio in that range. Only (n, h, w) and the
    generator decide the result, so the crops of a global batch can be drawn once and shared out by rows.
    """
    tries = 10
    area = torch.empty(n, tries).uniform_(float(crop_scale[0]), float(crop_scale[1]), generator=generator)
    log_ratio = torch.empty(n, tries).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = torch.exp(log_ratio)
    cw, ch = torch.sqrt(area * h * w * ratio), torch.sqrt(area * h * w / ratio)
    fits = (cw <= w) & (ch <= h)
    first = fits.float().argmax(dim=1, keepdim=True)  # first try that fits
    any_fit = fits.any(dim=1)
    in_ratio = w / h  # fallback as torchvision: the largest centred crop with a ratio inside the range
    fw = float(w) if 3 / 4 <= in_ratio <= 4 / 3 else (h * 4 / 3 if in_ratio > 4 / 3 else float(w))
    fh = float(h) if 3 / 4 <= in_ratio <= 4 / 3 else (float(h) if in_ratio > 4 / 3 else w / (3 / 4))
    cw = torch.where(any_fit, cw.gather(1, first).squeeze(1), torch.tensor(fw))
    ch = torch.where(any_fit, ch.gather(1, first).squeeze(1), torch.tensor(fh))
    pos = torch.rand(n, 2, generator=generator)
    top = torch.where(any_fit, pos[:, 0] * (h - ch), (h - ch) / 2)
    left = torch.where(any_fit, pos[:, 1] * (w - cw), (w - cw) / 2)
    flip = (torch.rand(n, generator=generator) < 0.5) if hflip else torch.zeros(n, dtype=torch.bool)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cw / w * torch.where(flip, -1.0, 1.0)
    theta[:, 0, 2] = (2 * left + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * top + ch) / h - 1
    return theta


def augment_batch(images: torch.Tensor, out_size: int, mean: Sequence[float], std: Sequence[float], *,
                  train: bool = True, crop_scale: Sequence[float] = (0.3, 1.0), hflip: bool = False,
                  generator: Optional[torch.Generator] = None, theta: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Augment a whole batch at once: uint8 (B, 3, S, S) -> normalised float (B, 3, out_size, out_size).

    train=True: RandomResizedCrop as torchvision draws it, per sample (`crop_params`), then an optional
    horizontal flip; each crop is resampled bilinearly through one affine grid (F.affine_grid + F.grid_sample)
    on the images' device. Crops are continuous (sub-pixel), not rounded to whole pixels as torchvision does.
    train=False: a bilinear, antialiased resize to out_size. Both end with (x / 255 - mean) / std.
    Random numbers come from `generator` (a CPU torch.Generator), so a seeded generator repeats a batch exactly;
    `theta` (B, 2, 3) passes crops drawn beforehand by `crop_params` instead.
    """
    b, _, h, w = images.shape
    x = images.float()
    if not train:
        if (h, w) != (out_size, out_size):
            x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False)
    else:
        if theta is None:
            theta = crop_params(b, h, w, crop_scale, hflip, generator)
        grid = F.affine_grid(theta.to(x.device), [b, 3, out_size, out_size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    scale = torch.tensor([1 / (255 * s) for s in std], device=x.device).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=x.device).view(1, 3, 1, 1)
    return torch.addcmul(shift, x, scale)
