"""The built-in offline dataset 'shapes': a procedural image renderer and its torch Dataset.

10 classes (`SHAPES_CLASSES`), each image a mosaic of nine copies of the class's shape in random colours, poses
and positions on a textured background, rendered by vectorised signed-distance tests at any resolution (a linear
probe on its raw pixels is near chance). `render_shapes` renders a batch of images by index; `ShapesDataset`
serves them one at a time. Every image is a pure function of (seed, split, index).

This file is self-contained (numpy and torch only): the rest of `ijepa_viz.data` uses it, never the other way
round. One thing outside it depends on it: `_mix64`, the hash of the renderer's random numbers, also seeds the
loaders' epoch order and crops (`ijepa_viz.data.loaders._seed_of`), so changing `_mix64` changes those too.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SHAPES_CLASSES", "MOSAIC_GRID", "render_shapes", "RenderedDataset", "ShapesDataset"]


SHAPES_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "heart", "arrow", "diamond")

# Random numbers come from a counter-based hash (splitmix64) of (seed, split, index, counter): every image is
# a pure function of its key, whatever batch it is rendered in, and a whole batch hashes in a few numpy ops.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_SPLIT_IDS = {"train": 1, "test": 2}


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic): a bijective, well-mixed hash."""
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def _image_keys(seed: int, split: str, indices: np.ndarray) -> np.ndarray:
    """One uint64 key per image: a hash of (seed, split, index)."""
    base = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    base = _mix64(base ^ np.uint64(_SPLIT_IDS[split]))
    return _mix64(base ^ indices.astype(np.uint64))


def _uniform(keys: np.ndarray, start: int, count: int) -> torch.Tensor:
    """Uniform [0, 1) numbers: float32 (N, count), column j a hash of (key, start + j)."""
    counters = np.arange(start, start + count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        bits = _mix64(keys[:, None] ^ (counters[None, :] * _MIX2))
    return torch.from_numpy((bits >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24))


# -- signed distances of the 10 shapes, in shape units (the shape fits in the unit disk) -----------
# Each takes local coordinates u, v (n, H, W) and returns the distance to the outline (negative inside).

def _sd_box(u: torch.Tensor, v: torch.Tensor, a: float, b: float) -> torch.Tensor:
    qx, qy = u.abs() - a, v.abs() - b
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _sd_convex(u: torch.Tensor, v: torch.Tensor, normals: Sequence[tuple[float, float, float]]) -> torch.Tensor:
    """Convex polygon as the intersection of half-planes n.p <= h, each given as (nx, ny, h), |n| = 1."""
    d = None
    for nx, ny, h in normals:
        e = u * nx + v * ny - h
        d = e if d is None else torch.maximum(d, e)
    return d


def _regular_polygon(sides: int, apothem: float, phase: float = math.pi / 2) -> list[tuple[float, float, float]]:
    return [(math.cos(phase + 2 * math.pi * k / sides), math.sin(phase + 2 * math.pi * k / sides), apothem)
            for k in range(sides)]


def _star_edge(outer: float, inner: float) -> tuple[float, float, float, float]:
    """Outward unit normal and anchor of the edge from the tip (outer, 0) to the valley at angle pi/5."""
    bx, by = inner * math.cos(math.pi / 5), inner * math.sin(math.pi / 5)
    nx, ny = by, outer - bx
    norm = math.hypot(nx, ny)
    return nx / norm, ny / norm, outer, 0.0


_TRIANGLE = _regular_polygon(3, 0.58, phase=-math.pi / 2)  # circumradius 1.16
_STAR = _star_edge(1.0, 0.48)
_ARROW_HEAD = [(-1.0, 0.0, -0.1)] + [
    (0.6 / math.hypot(0.6, 0.9), s * 0.9 / math.hypot(0.6, 0.9), 0.6 / math.hypot(0.6, 0.9)) for s in (1, -1)]
_HEART_S = 0.85  # half-diagonal of the heart's rotated square


def _sd_shape(cls: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    name = SHAPES_CLASSES[cls]
    if name == "circle":
        return torch.sqrt(u * u + v * v) - 1.0
    if name == "square":
        return _sd_box(u, v, 0.78, 0.78)
    if name == "triangle":
        return _sd_convex(u, v - 0.2, _TRIANGLE)
    if name == "star":  # fold the plane into one tenth-sector, then one straight edge
        rho, phi = torch.sqrt(u * u + v * v), torch.atan2(v, u)
        sector = 2 * math.pi / 5
        a = torch.remainder(phi, sector)
        a = torch.minimum(a, sector - a)
        nx, ny, ax, ay = _STAR
        return (rho * torch.cos(a) - ax) * nx + (rho * torch.sin(a) - ay) * ny
    if name == "cross":
        return torch.minimum(_sd_box(u, v, 0.95, 0.3), _sd_box(u, v, 0.3, 0.95))
    if name == "ring":
        return (torch.sqrt(u * u + v * v) - 0.7).abs() - 0.3
    if name == "crescent":
        return torch.maximum(torch.sqrt(u * u + v * v) - 1.0, 0.8 - torch.sqrt((u - 0.5) ** 2 + v * v))
    if name == "heart":  # a rotated square with a disc on each upper edge
        s = _HEART_S
        v = v + 0.1 * s
        body = (u.abs() + v.abs() - s) * (1 / math.sqrt(2))
        lobe = torch.sqrt((u.abs() - s / 2) ** 2 + (v - s / 2) ** 2) - s / math.sqrt(2)
        return torch.minimum(body, lobe)
    if name == "arrow":
        return torch.minimum(_sd_box(u + 0.35, v, 0.6, 0.18), _sd_convex(u, v, _ARROW_HEAD))
    if name == "diamond":  # an elongated rhombus, so that no rotation turns it into the square
        a, b = 1.0, 0.55
        return (u.abs() * b + v.abs() * a - a * b) / math.hypot(a, b)
    raise AssertionError(name)  # pragma: no cover


def _paint(img: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor], classes: torch.Tensor,
           cx: torch.Tensor, cy: torch.Tensor, radius: torch.Tensor, angle: torch.Tensor,
           colour: torch.Tensor, active: torch.Tensor) -> None:
    """Alpha-blend one shape into each image of `img` (N, 3, H, W) in place; rows where `active` is False skip.

    Shapes are grouped by class so each signed distance is evaluated once per group over (n, H, W) pixels;
    coverage is clamp(0.5 - distance_in_pixels), a one-pixel anti-aliased edge.
    """
    ys, xs = grid
    px = img.shape[-1]
    for c in range(len(SHAPES_CLASSES)):
        idx = torch.nonzero(active & (classes == c)).flatten()
        if idx.numel() == 0:
            continue
        cos, sin = torch.cos(angle[idx])[:, None, None], torch.sin(angle[idx])[:, None, None]
        r = radius[idx][:, None, None]
        dx, dy = xs - cx[idx][:, None, None], ys - cy[idx][:, None, None]
        u, v = (dx * cos + dy * sin) / r, (dy * cos - dx * sin) / r
        alpha = (0.5 - _sd_shape(c, u, v) * (r * px)).clamp_(0, 1).unsqueeze(1)
        img[idx] = torch.lerp(img[idx], colour[idx][:, :, None, None], alpha)


# Layout of the per-image random numbers (columns of _uniform).
_N_PARAMS = 96
_NOISE_COUNTER = 1 << 20  # per-pixel noise uses counters from here on
MOSAIC_GRID = 3  # copies of the class's shape per side: a 3 x 3 jittered lattice, 9 copies per image


def render_shapes(indices: Sequence[int] | np.ndarray | torch.Tensor, img_size: int, seed: int = 0,
                  split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Render 'shapes' images: (uint8 (N, 3, img_size, img_size), labels int64 (N,)).

    Image `i` of (seed, split) is the same whatever batch it is rendered in; its label is `i % 10`.
    Each image is a small mosaic: a background (a two-colour gradient, a 4x4 field of colour blotches,
    per-pixel noise) under nine copies of the class's shape on a jittered 3 x 3 lattice. Every copy has its
    own random colour (kept apart from the background), rotation, size (radius 10-15% of the image) and offset
    (up to 35% of a lattice cell). What the copies share is only their shape.

    The idea: I-JEPA learns what the context says about the targets, and here the one thing a context block
    says about a target block is the shape of the copies in it (colour, pose and position vary from copy to
    copy). Measured (README, demo): a linear probe on raw pixels stays near chance, but the average-pooled
    features of an untrained ViT already separate some classes, and a few thousand CPU steps of I-JEPA add
    little to them.
    """
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    n = len(indices)
    keys = _image_keys(seed, split, indices)
    p = _uniform(keys, 0, _N_PARAMS)
    labels = torch.from_numpy(indices % len(SHAPES_CLASSES))
    tau = 2 * math.pi

    coords = (torch.arange(img_size, dtype=torch.float32) + 0.5) / img_size  # pixel centres in [0, 1]
    ys, xs = coords[:, None], coords[None, :]

    # -- background: gradient between two colours, then soft colour blotches ------------------------------
    col_a, col_b = p[:, 0:3], p[:, 3:6]
    g_ang, blotch_amp, noise_amp = p[:, 6] * tau, p[:, 7] * 0.35, 0.02 + p[:, 8] * 0.06
    along = ((xs - 0.5) * torch.cos(g_ang)[:, None, None] + (ys - 0.5) * torch.sin(g_ang)[:, None, None])
    t = (along / math.sqrt(0.5) + 0.5).clamp_(0, 1).unsqueeze(1)  # (N, 1, H, W)
    img = torch.lerp(col_a[:, :, None, None], col_b[:, :, None, None], t)
    blotches = (p[:, 9:57].reshape(n, 3, 4, 4) - 0.5) * blotch_amp[:, None, None, None]
    img = img + F.interpolate(blotches, size=(img_size, img_size), mode="bicubic", align_corners=False)
    bg = (col_a + col_b) / 2

    # -- nine copies of the class's shape, each with its own colour, rotation, size and jitter --------------
    cell, every = 1.0 / MOSAIC_GRID, torch.ones(n, dtype=torch.bool)
    hashes = _uniform(keys, _N_PARAMS, 8 * MOSAIC_GRID * MOSAIC_GRID)  # (N, 8 per copy)
    for k in range(MOSAIC_GRID * MOSAIC_GRID):
        q = hashes[:, 8 * k: 8 * k + 8]
        gy, gx = divmod(k, MOSAIC_GRID)
        cx = (gx + 0.5 + (q[:, 0] - 0.5) * 0.7) * cell
        cy = (gy + 0.5 + (q[:, 1] - 0.5) * 0.7) * cell
        colour = q[:, 4:7]
        low_contrast = (colour - bg).norm(dim=1, keepdim=True) < 0.45
        colour = torch.where(low_contrast, torch.where(bg > 0.5, bg - 0.45, bg + 0.45), colour)
        _paint(img, (ys, xs), labels, cx, cy, 0.10 + 0.05 * q[:, 2], q[:, 3] * tau, colour, active=every)

    # -- per-pixel noise, then quantise ----------------------------------------------------------------
    noise = _uniform(keys, _NOISE_COUNTER, img_size * img_size).reshape(n, 1, img_size, img_size) - 0.5
    img = img + noise * (2 * noise_amp[:, None, None, None])
    return (img.clamp_(0, 1) * 255 + 0.5).to(torch.uint8), labels


class RenderedDataset(torch.utils.data.Dataset):
    """A built-in dataset drawn on the fly by a batch renderer `render(indices, img_size, seed, split)`: image i
    of a split is a pure function of (seed, split, i) and its label is i % len(classes). Subclasses set `name`,
    `classes` and `render`.

    `dataset[i]` is `(uint8 tensor (3, img_size, img_size), int label)`, or `(transform(image), label)` when a
    transform is given (the transforms of `build_transform` accept uint8 tensors).
    """

    name: str
    classes: list[str]
    render: Callable  # a staticmethod: (indices, img_size, seed, split) -> (uint8 (N, 3, S, S), labels (N,))

    def __init__(self, split: str, img_size: int, size: int, seed: int = 0,
                 transform: Optional[Callable] = None) -> None:
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.split, self.img_size, self.size, self.seed, self.transform = split, img_size, size, seed, transform

    def __len__(self) -> int:
        return self.size

    @property
    def targets(self) -> list[int]:
        return [i % len(self.classes) for i in range(self.size)]

    def render_batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast path: (uint8 (N, 3, H, W), labels int64 (N,)) for many indices at once, untransformed."""
        return self.render(indices, self.img_size, self.seed, self.split)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a {self.name!r} split of {self.size} images")
        images, labels = self.render_batch([index])
        image = images[0]
        return (self.transform(image) if self.transform is not None else image), int(labels[0])


class ShapesDataset(RenderedDataset):
    """The built-in offline dataset: 10 shape classes (`SHAPES_CLASSES`), each image a mosaic of nine copies
    of its class's shape (see `render_shapes`).

    `dataset[i]` is `(uint8 tensor (3, img_size, img_size), int label)`, or `(transform(image), label)` when a
    transform is given (the transforms of `build_transform` accept uint8 tensors). Images are procedurally
    generated, a pure function of (seed, split, index), at any resolution; 'train' and 'test' differ.
    Each copy's colour, rotation, size and position are random, so raw pixels say little about the class
    (the README's demo table gives the measured raw-pixel probe beside I-JEPA's).
    """

    name, classes, render = "shapes", list(SHAPES_CLASSES), staticmethod(render_shapes)
