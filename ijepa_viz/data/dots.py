"""The built-in offline dataset 'dots': figures drawn with dots, where the class is the arrangement alone.

10 classes (`DOTS_CLASSES`): a horizontal line, a vertical line, the two diagonals, a circle, a plus, an x, a
square, a triangle and a corner. Each image draws its class's figure with `DOTS_PER_FIGURE` = 8 round dots on a
flat grey background, evenly spaced along the figure from a random starting point and each slightly jittered;
the whole figure turns by up to +-20 degrees and has a random size and position. All dots of an image are
either lighter or darker than the background (`DOT_COLOUR = "image-polarity"`), the sign drawn per image.

Why this data teaches I-JEPA (numbers in the README's demo table, measured, not assumed):
* A dot looks the same in every class, so no patch says the class on its own. What a context block does say
  about a target block is where the figure goes next: whether the dots continue into it, and along which
  direction. That is exactly the class, and it is almost all a context block can predict: the dots' colour
  follows from one sign per image, and nothing else varies from image to image.
* Raw pixels fail: a dark and a light figure of one class are opposite images, so no linear map of the pixels
  reads the class (and the figure moves, turns and scales besides).
* An untrained ViT's average-pooled features are close to a bag of per-patch features, and a bag of identical
  dots says little about their arrangement; so the untrained encoder stays far below a trained one, whose
  features gather each class (once per sign) where the untrained one's do not.

Earlier designs (a random colour per dot, a random background colour, per-pixel noise: still knobs below, for
benchmarks/dots_design.py) kept the untrained encoder low too, but their per-image colours filled the trained
features, and no class clusters formed (benchmarks/README.md, "A demo that learns" to "Eighth round").

Every image is a pure function of (seed, split, index), rendered at any resolution; the label of image i is
i % 10. This file shares only the counter-based hash of `shapes` (`_image_keys`, `_uniform`).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ijepa_viz.data.shapes import _SPLIT_IDS, RenderedDataset, _image_keys, _uniform

__all__ = ["DOTS_CLASSES", "DOTS_PER_FIGURE", "render_dots", "DotsDataset"]

DOTS_CLASSES = ("hline", "vline", "diagonal", "antidiagonal", "circle", "plus", "x", "square", "triangle", "corner")
DOTS_PER_FIGURE = 8  # dots per image, the same in every class (so the amount of "dot" says nothing)
DOT_RADIUS = (0.035, 0.05)  # dot radius, a fraction of the image side (1.1-1.6 px at 32 px)
FIGURE_HALF_SIZE = (0.30, 0.44)  # half the figure's extent, a fraction of the image side
JITTER = 0.02  # each dot moves by up to +-JITTER/2 of the image side in x and y
NOISE = 0.0  # per-pixel noise, +-NOISE around the background or dot colour
BACKGROUND = (0.5, 0.5)  # each channel of the flat background colour is drawn from this range (fixed grey)
GREY_BACKGROUND = False  # True: one draw for all three channels, so the background varies in brightness only
# DOT_COLOUR: None: a random colour per dot; "image": one random colour per image; (r, g, b): every dot in that
# colour; "dot-polarity" / "image-polarity": CONTRAST lighter or darker than the background in every channel,
# the sign drawn per dot / per image (the design knobs of benchmarks/dots_design.py's fourth round)
DOT_COLOUR = "image-polarity"
CONTRAST = 0.4
BACKGROUND_CELLS = 0  # 0: a flat background; n: an n x n grid of cells, each with its own random colour
CLUTTER_DOTS = 0  # extra dots, like the figure's, at uniform random places: they belong to no figure
ROTATION = 20.0  # each figure turns by a random angle in [-ROTATION, ROTATION] degrees about its centre


def _figure(points: Sequence[tuple[float, float]], closed: bool = False) -> list[tuple[tuple, tuple]]:
    """Segments of a polyline through `points` in [-1, 1]^2 (y points down, as in the image)."""
    pts = list(points) + ([points[0]] if closed else [])
    return [(pts[i], pts[i + 1]) for i in range(len(pts) - 1)]


_CIRCLE = [(math.cos(2 * math.pi * k / 48), math.sin(2 * math.pi * k / 48)) for k in range(48)]
# Each figure: a list of straight segments ((x0, y0), (x1, y1)), fitting in [-1, 1]^2.
_FIGURES = {
    "hline": _figure([(-1, 0), (1, 0)]),
    "vline": _figure([(0, -1), (0, 1)]),
    "diagonal": _figure([(-1, -1), (1, 1)]),
    "antidiagonal": _figure([(-1, 1), (1, -1)]),
    "circle": _figure(_CIRCLE, closed=True),
    "plus": _figure([(-1, 0), (1, 0)]) + _figure([(0, -1), (0, 1)]),
    "x": _figure([(-1, -1), (1, 1)]) + _figure([(-1, 1), (1, -1)]),
    "square": _figure([(-1, -1), (1, -1), (1, 1), (-1, 1)], closed=True),
    "triangle": _figure([(0, -1), (1, 0.8), (-1, 0.8)], closed=True),
    "corner": _figure([(-1, -1), (-1, 1), (1, 1)]),
    # Not in DOTS_CLASSES: more figures for design runs (benchmarks/dots_design.py --dots "DOTS_CLASSES=(...)")
    "arc": _figure(_CIRCLE[:25]),
    "zigzag": _figure([(-1, 1), (-0.5, -1), (0, 1), (0.5, -1), (1, 1)]),
    "tee": _figure([(-1, -1), (1, -1)]) + _figure([(0, -1), (0, 1)]),
    "vee": _figure([(-1, -1), (0, 1), (1, -1)]),
    "diamond": _figure([(0, -1), (1, 0), (0, 1), (-1, 0)], closed=True),
    "equals": _figure([(-1, -0.5), (1, -0.5)]) + _figure([(-1, 0.5), (1, 0.5)]),
}


def _along(segments: list[tuple[tuple, tuple]], t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Points at arc-length fractions t in [0, 1) along a figure: (x, y), each shaped like t."""
    a = torch.tensor([s[0] for s in segments], dtype=torch.float32)  # (S, 2) segment starts
    b = torch.tensor([s[1] for s in segments], dtype=torch.float32)  # (S, 2) segment ends
    length = (b - a).norm(dim=1)
    ends = torch.cumsum(length, 0) / length.sum()  # (S,) where each segment ends, as a fraction
    seg = torch.searchsorted(ends, t.contiguous(), right=True).clamp_(max=len(segments) - 1)
    start = ends[seg] - length[seg] / length.sum()
    f = ((t - start) / (length[seg] / length.sum())).clamp_(0, 1)  # position within the segment
    p = a[seg] + f.unsqueeze(-1) * (b[seg] - a[seg])
    return p[..., 0], p[..., 1]


# Layout of the per-image random numbers (columns of _uniform).
_PER_IMAGE = 8  # background colour (3), figure half-size, centre (2), starting point, noise
_PER_DOT = 6  # jitter (2), radius, colour (3)
_ROTATION_COUNTER = 1 << 17  # the per-image rotation uses this counter
_CLUTTER_COUNTER = 1 << 18  # clutter dots (x, y, radius, colour (3)) use counters from here on
_CELL_COUNTER = 1 << 19  # background cell colours use counters from here on
_NOISE_COUNTER = 1 << 20  # per-pixel noise uses counters from here on

_POLARITY = ("dot-polarity", "image-polarity")


def _dot_colours(uniform: torch.Tensor) -> torch.Tensor:
    """Dot colours (N, K, 3) from the random draws `uniform` (N, K, 3), as DOT_COLOUR says."""
    if DOT_COLOUR is None or isinstance(DOT_COLOUR, str):  # the modes are applied once all dots are drawn
        return uniform
    return torch.tensor(DOT_COLOUR).expand(uniform.shape)


def render_dots(indices: Sequence[int] | np.ndarray | torch.Tensor, img_size: int, seed: int = 0,
                split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Render 'dots' images: (uint8 (N, 3, img_size, img_size), labels int64 (N,)).

    Image `i` of (seed, split) is the same whatever batch it is rendered in; its label is `i % 10`.
    """
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    n, k = len(indices), DOTS_PER_FIGURE
    keys = _image_keys(seed, split, indices)
    p = _uniform(keys, 0, _PER_IMAGE)  # (N, 8)
    q = _uniform(keys, _PER_IMAGE, _PER_DOT * k).reshape(n, k, _PER_DOT)  # (N, K, 6)
    labels = torch.from_numpy(indices % len(DOTS_CLASSES))

    # -- the figure: K dots evenly spaced along it from a random start, then scaled, placed and jittered ------
    bg = BACKGROUND[0] + (BACKGROUND[1] - BACKGROUND[0]) * p[:, 0:3]  # (N, 3)
    if GREY_BACKGROUND:
        bg = bg[:, :1].expand(n, 3)
    half = FIGURE_HALF_SIZE[0] + (FIGURE_HALF_SIZE[1] - FIGURE_HALF_SIZE[0]) * p[:, 3]  # (N,)
    room = (1 - 2 * half - JITTER).clamp(min=0)  # how far the figure's centre can move and stay inside
    cx, cy = 0.5 + (p[:, 4] - 0.5) * room, 0.5 + (p[:, 5] - 0.5) * room
    t = (p[:, 6:7] + torch.arange(k) / k) % 1.0  # (N, K) arc-length fractions
    fx, fy = torch.zeros(n, k), torch.zeros(n, k)
    for c, name in enumerate(DOTS_CLASSES):
        rows = labels == c
        if rows.any():
            fx[rows], fy[rows] = _along(_FIGURES[name], t[rows])
    if ROTATION:  # turn the unit figure about its centre before it is scaled and placed
        a = torch.deg2rad(ROTATION * (2 * _uniform(keys, _ROTATION_COUNTER, 1) - 1))  # (N, 1)
        fx, fy = fx * torch.cos(a) - fy * torch.sin(a), fx * torch.sin(a) + fy * torch.cos(a)
    x = cx[:, None] + half[:, None] * fx + (q[..., 0] - 0.5) * JITTER  # (N, K) dot centres in [0, 1]
    y = cy[:, None] + half[:, None] * fy + (q[..., 1] - 0.5) * JITTER
    radius = DOT_RADIUS[0] + (DOT_RADIUS[1] - DOT_RADIUS[0]) * q[..., 2]  # (N, K)
    colour = _dot_colours(q[..., 3:6])  # (N, K, 3), kept
    if CLUTTER_DOTS:  # dots of the same kind anywhere in the image, after the figure's: (N, K + CLUTTER_DOTS)
        m = CLUTTER_DOTS
        c = _uniform(keys, _CLUTTER_COUNTER, 6 * m).reshape(n, m, 6)  # (N, M, 6)
        x, y = torch.cat([x, 0.05 + 0.9 * c[..., 0]], 1), torch.cat([y, 0.05 + 0.9 * c[..., 1]], 1)
        radius = torch.cat([radius, DOT_RADIUS[0] + (DOT_RADIUS[1] - DOT_RADIUS[0]) * c[..., 2]], 1)
        colour = torch.cat([colour, _dot_colours(c[..., 3:6])], 1)
        k = k + m
    # at least 0.4 away from the background:
    coords = (torch.arange(img_size, dtype=torch.float32) + 0.5) / img_size  # pixel centres in [0, 1]
    if BACKGROUND_CELLS:  # an n x n grid of random colours instead of one flat colour
        c = BACKGROUND_CELLS
        cells = BACKGROUND[0] + (BACKGROUND[1] - BACKGROUND[0]) * _uniform(keys, _CELL_COUNTER, 3 * c * c)
        cells = cells.reshape(n, 3, c, c)  # (N, 3, c, c)
        idx = (coords * c).long().clamp_(max=c - 1)  # (H,) the cell of each pixel row / column
        img = cells[:, :, idx][:, :, :, idx]  # (N, 3, H, W)
        cx_i = (x * c).long().clamp(0, c - 1)  # (N, K) the cell under each dot
        cy_i = (y * c).long().clamp(0, c - 1)
        under = cells.permute(0, 2, 3, 1)[torch.arange(n)[:, None], cy_i, cx_i]  # (N, K, 3)
    else:
        img = bg[:, :, None, None].expand(n, 3, img_size, img_size).clone()  # (N, 3, H, W)
        under = bg[:, None].expand(n, k, 3)
    if DOT_COLOUR == "image":  # every dot of an image, clutter included, takes its first dot's colour
        colour = colour[:, :1].expand(n, k, 3)
    if DOT_COLOUR in _POLARITY:  # lighter or darker than what lies under the dot, by CONTRAST in every channel
        draw = colour[..., :1] if DOT_COLOUR == "dot-polarity" else colour[:, :1, :1].expand(n, k, 1)
        colour = (under + torch.where(draw < 0.5, CONTRAST, -CONTRAST)).clamp(0, 1)
    else:
        near = (colour - under).norm(dim=-1, keepdim=True) < 0.4
        colour = torch.where(near, torch.remainder(under + 0.5, 1.0), colour)

    # -- paint: a one-pixel anti-aliased disc per dot, later dots over earlier ones ------------------------
    for j in range(k):
        d = torch.sqrt((coords[None, None, :] - x[:, j, None, None]) ** 2
                       + (coords[None, :, None] - y[:, j, None, None]) ** 2)  # (N, H, W)
        alpha = ((radius[:, j, None, None] - d) * img_size + 0.5).clamp_(0, 1).unsqueeze(1)  # (N, 1, H, W)
        img = torch.lerp(img, colour[:, j, :, None, None], alpha)

    # -- per-pixel noise, then quantise ----------------------------------------------------------------
    if NOISE:
        noise = _uniform(keys, _NOISE_COUNTER, img_size * img_size).reshape(n, 1, img_size, img_size) - 0.5
        img = img + noise * (2 * NOISE)
    return (img.clamp_(0, 1) * 255 + 0.5).to(torch.uint8), labels


class DotsDataset(RenderedDataset):
    """The built-in offline dataset 'dots': 10 figures drawn with dots (`DOTS_CLASSES`, see `render_dots`).

    `dataset[i]` is `(uint8 tensor (3, img_size, img_size), int label)`, or `(transform(image), label)` when a
    transform is given. Images are a pure function of (seed, split, index), at any resolution.
    """

    name, classes, render = "dots", list(DOTS_CLASSES), staticmethod(render_dots)
