"""Masking: which patches the context encoder sees and which ones the predictor must predict.

I-JEPA's multi-block masking (paper, Sec. 3 and Fig. 4), per image on an H x W patch grid:

* sample M = 4 **target** blocks, each covering a fraction s_t ~ U(0.15, 0.2) of the grid with aspect ratio
  r_t ~ U(0.75, 1.5); the targets are the patches y(i) = {y_j : j in B_i} for i = 1..M;
* sample one **context** block of scale s_c ~ U(0.85, 1.0) and aspect 1, then remove from it every patch that
  falls in a target, so the context x = {x_j : j in B_x \\ (B_1 u ... u B_M)} never gives the answer away.

Masks are data: `MaskCollator.sample(batch_size, step)` is a pure, seeded function of (seed, step) that returns
patch indices *and* the blocks' boxes (top, left, height, width), so notebooks can draw them and tests can check
them. Everything is vectorised over the batch: there are no Python loops over images.

Behaviour kept from the official collator (facebookresearch/ijepa, src/masks/multiblock.py), on purpose:

* **one block size per batch**: the scale and the aspect ratio are drawn once per batch (from one uniform number
  u, shared by scale and aspect, as the official `_sample_block_size` does); only the positions vary per image;
* a block is at most (H-1) x (W-1) patches (the official size loop shrinks h while h >= H);
* a context that keeps no more than `min_keep` patches is redrawn;
* every index list is **truncated to the shortest one in the batch**, keeping the first patches in raster
  order, so that a batch is one rectangular tensor.

Departures, each for a documented reason:

* **It never hangs.** The official collator retries forever when no block can keep more than `min_keep`
  patches (e.g. CIFAR at patch 4: an 8x8 grid, 3x3 = 9-patch targets, min_keep = 10). Here the configuration is
  checked against the grid when the collator is built (`MaskConfigError` says which value to change), and the
  context retries are bounded by `max_tries`.
* After repeated failures the official code silently lets the context overlap the targets; here the context
  and the targets never overlap unless `allow_overlap=True`.
* Block positions come from the seeded per-batch generator (official: the global RNG), which makes masks
  deterministic under DataLoader workers and across resumes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch.utils.data import default_collate, get_worker_info

from ijepa_viz.config import ConfigError, MaskConfig

STRATEGIES = ("multiblock", "random", "block", "quadrant")


class MaskConfigError(ConfigError):
    """The mask configuration cannot be satisfied on this patch grid."""


@dataclass
class Masks:
    """The masks of one batch. Patch indices are raster-order positions on the H x W grid (i * W + j).

    context:      (B, Nc) long, sorted indices of the patches the context encoder sees
    targets:      (B, M, Nt) long, sorted indices of the patches of each target block
    context_box:  (B, 4) long, (top, left, height, width) of the context block; -1 where it is not a block
    target_boxes: (B, M, 4) long, the same for each target block
    grid:         (H, W) patches per column and per row
    """

    context: torch.Tensor
    targets: torch.Tensor
    context_box: torch.Tensor
    target_boxes: torch.Tensor
    grid: tuple[int, int]

    @property
    def num_targets(self) -> int:
        return self.targets.shape[1]

    def to(self, device, non_blocking: bool = False) -> "Masks":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if torch.is_tensor(v):
                moved[k] = v.to(device, non_blocking=non_blocking)
        return Masks(**moved)

    def rows(self, index) -> "Masks":
        """The masks of a subset of the images (a slice or an index tensor), e.g. one rank's share."""
        return Masks(self.context[index], self.targets[index], self.context_box[index], self.target_boxes[index],
                     self.grid)

    def context_mask(self) -> torch.Tensor:
        """(B, H*W) bool: True where the context encoder sees the patch."""
        B, N = self.context.shape[0], self.grid[0] * self.grid[1]
        return torch.zeros(B, N, dtype=torch.bool, device=self.context.device).scatter_(1, self.context, True)

    def target_mask(self) -> torch.Tensor:
        """(B, M, H*W) bool: True where target block m covers the patch."""
        B, M, _ = self.targets.shape
        N = self.grid[0] * self.grid[1]
        out = torch.zeros(B, M, N, dtype=torch.bool, device=self.targets.device)
        return out.scatter_(2, self.targets, True)


@dataclass
class MaskedBatch:
    """What `MaskCollator.__call__` returns: images (B, C, H, W), labels (B,) and their `Masks`."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: Masks


# -- block geometry ----------------------------------------------------------------------------

def block_size(u: float, scale: Sequence[float], aspect: Sequence[float], grid: tuple[int, int]) -> tuple[int, int]:
    """Height and width (in patches) of a block for the uniform draw u in [0, 1).

    As in the official collator, one u sets both the scale and the aspect ratio:
    area = floor(H*W * s), h = round(sqrt(area * r)), w = round(sqrt(area / r)), then h <= H-1, w <= W-1.
    """
    H, W = grid
    s = scale[0] + u * (scale[1] - scale[0])
    r = aspect[0] + u * (aspect[1] - aspect[0])
    area = int(H * W * s)
    h = int(round(math.sqrt(area * r)))
    w = int(round(math.sqrt(area / r)))
    h = max(1, min(h, H - 1)) if H > 1 else 1  # official: `while h >= height: h -= 1`; never 0
    w = max(1, min(w, W - 1)) if W > 1 else 1
    return h, w


def _size_range(scale, aspect, grid) -> tuple[int, int]:
    """Exact smallest and largest block area over all draws of u in [0, 1).

    `block_size` is piecewise constant in u. It changes only where floor(H*W*s) steps, or where sqrt(area*r)
    or sqrt(area/r) crosses a half-integer (the rounding of h or w), so evaluating it at every such breakpoint,
    just beside it, and between consecutive breakpoints sees every size it can return. (A fixed sample of u
    can miss short pieces, and then a target could keep no more than `min_keep` patches.)
    """
    N = grid[0] * grid[1]
    (s0, s1), (r0, r1) = scale, aspect
    ds, dr = s1 - s0, r1 - r0
    us = {0.0}
    if ds > 0:
        us.update((j / N - s0) / ds for j in range(int(N * s0) + 1, int(N * s1) + 1))
    if dr > 0:
        for a in range(max(int(N * s0), 1), int(N * s1) + 1):
            lo = 0.0 if ds <= 0 else max(0.0, (a / N - s0) / ds)  # u-interval where the area is a
            hi = 1.0 if ds <= 0 else min(1.0, ((a + 1) / N - s0) / ds)
            r_lo, r_hi = r0 + lo * dr, r0 + hi * dr
            for k in range(max(int(math.sqrt(a * r_lo)) - 1, 0), int(math.sqrt(a * r_hi)) + 2):
                us.add(((k + 0.5) ** 2 / a - r0) / dr)  # h steps
            for k in range(max(int(math.sqrt(a / r_hi)) - 1, 0), int(math.sqrt(a / r_lo)) + 2):
                us.add((a / (k + 0.5) ** 2 - r0) / dr)  # w steps
    pts = sorted(u for u in us if 0.0 <= u < 1.0)
    probes = set(pts)
    probes.update((a + b) / 2 for a, b in zip(pts, pts[1:] + [1.0]))
    probes.update(u + d for u in pts for d in (-1e-12, 1e-12) if 0.0 <= u + d < 1.0)
    areas = [math.prod(block_size(u, scale, aspect, grid)) for u in probes]
    return min(areas), max(areas)


def _block_indices(top: torch.Tensor, left: torch.Tensor, h: int, w: int, W: int) -> torch.Tensor:
    """Raster indices of h x w blocks at (top, left): (...,) -> (..., h*w), sorted within each block."""
    dy = torch.arange(h, device=top.device).repeat_interleave(w)  # (h*w,)
    dx = torch.arange(w, device=top.device).repeat(h)  # (h*w,)
    return (top.unsqueeze(-1) + dy) * W + (left.unsqueeze(-1) + dx)


def _block_mask(top: torch.Tensor, left: torch.Tensor, h: int, w: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B,) corners -> (B, H*W) bool mask of the blocks."""
    H, W = grid
    rows = torch.arange(H, device=top.device)
    cols = torch.arange(W, device=top.device)
    in_r = (rows >= top[:, None]) & (rows < top[:, None] + h)  # (B, H)
    in_c = (cols >= left[:, None]) & (cols < left[:, None] + w)  # (B, W)
    return (in_r[:, :, None] & in_c[:, None, :]).flatten(1)


def _first_k(mask: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) bool -> (B, k) long: the first k True positions of each row, in raster order."""
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # kept patches first, in order
    return order[:, :k]


def _boxes(top, left, h, w) -> torch.Tensor:
    return torch.stack([top, left, torch.full_like(top, h), torch.full_like(top, w)], dim=-1)


# -- the collator ------------------------------------------------------------------------------

class MaskCollator:
    """Seeded mask sampler and DataLoader collate function.

    Args:
        cfg: the mask settings (`MaskConfig`); `cfg.strategy` picks multiblock (paper) or an ablation:
            * ``random``: M sets of random patches with the multiblock target sizes, and a random context of
              the multiblock context size (same counts, no spatial structure);
            * ``block``: one large target block of scale `block_scale` (paper Table 6: 0.6); the context is
              its complement;
            * ``quadrant``: the context is one quadrant, the targets are the other three (M = 3). On odd grids
              each quadrant is floor(H/2) x floor(W/2) patches and the middle row/column is unused.
        grid_size: patches per side (int) or (H, W).
        seed: base seed; the masks of batch `step` depend only on (seed, step).

    Raises:
        MaskConfigError: at construction, when the configuration is impossible on the grid.
    """

    def __init__(self, cfg: MaskConfig, grid_size: int | tuple[int, int], seed: int = 0):
        self.cfg = cfg
        self.grid = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        self.seed = int(seed)
        self.epoch = 0
        self._calls = 0
        if cfg.strategy not in STRATEGIES:
            raise MaskConfigError(f"mask.strategy={cfg.strategy!r} must be one of {', '.join(STRATEGIES)}")
        self._check_feasible()

    # -- configuration check -------------------------------------------------------------------
    def _check_feasible(self) -> None:
        c, (H, W) = self.cfg, self.grid
        N, k = H * W, c.min_keep
        where = f"on the {H}x{W} patch grid"
        if H < 2 or W < 2:
            raise MaskConfigError(f"the patch grid is {H}x{W}; masking needs at least 2x2 patches. "
                                  f"Lower model.patch_size or raise model.img_size")
        if c.strategy in ("multiblock", "random"):
            t_min, t_max = _size_range(c.target_scale, c.target_aspect, self.grid)
            if t_min <= k:
                raise MaskConfigError(
                    f"mask.target_scale={list(c.target_scale)} gives target blocks of only {t_min} patches {where}, "
                    f"but a block must keep more than mask.min_keep={k} patches, so sampling could never finish. "
                    f"Lower mask.min_keep below {t_min}, raise mask.target_scale, or use a smaller model.patch_size")
            c_min, _ = _size_range(c.context_scale, c.context_aspect, self.grid)
            if c_min <= k:
                raise MaskConfigError(
                    f"mask.context_scale={list(c.context_scale)} gives context blocks of only {c_min} patches {where}, "
                    f"not more than mask.min_keep={k}. Lower mask.min_keep or raise mask.context_scale")
            if c.strategy == "random" and N - c.num_targets * t_max <= k:
                raise MaskConfigError(
                    f"mask.strategy=random with {c.num_targets} targets of up to {t_max} patches leaves "
                    f"{N - c.num_targets * t_max} of {N} patches for the context {where}, not more than "
                    f"mask.min_keep={k}. Lower mask.num_targets or mask.target_scale")
        elif c.strategy == "block":
            b_min, b_max = _size_range((c.block_scale, c.block_scale), c.target_aspect, self.grid)
            if b_min <= k or N - b_max <= k:
                raise MaskConfigError(
                    f"mask.block_scale={c.block_scale} {where} leaves a target or a context of no more than "
                    f"mask.min_keep={k} patches. Lower mask.min_keep or change mask.block_scale")
        elif c.strategy == "quadrant":
            q = (H // 2) * (W // 2)
            if q <= k:
                raise MaskConfigError(
                    f"mask.strategy=quadrant {where} gives quadrants of {q} patches, not more than "
                    f"mask.min_keep={k}. Lower mask.min_keep or use a smaller model.patch_size")

    # -- sampling ------------------------------------------------------------------------------
    def generator(self, step: int) -> torch.Generator:
        """The generator of batch `step`: seeded by (seed, step) alone."""
        mixed = (self.seed * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (2**63)
        return torch.Generator().manual_seed(mixed)

    def sample(self, batch_size: int, step: int) -> Masks:
        """Masks for a batch of `batch_size` images; a pure function of (cfg, grid, seed, step).

        Returns:
            `Masks` with context (B, Nc), targets (B, M, Nt) and the boxes.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        g = self.generator(step)
        return getattr(self, "_sample_" + self.cfg.strategy)(batch_size, g)

    def _sample_multiblock(self, B: int, g: torch.Generator) -> Masks:
        c, (H, W) = self.cfg, self.grid
        M = c.num_targets
        # One block size per batch (official): u_t for the targets, u_c for the context.
        th, tw = block_size(torch.rand(1, generator=g).item(), c.target_scale, c.target_aspect, self.grid)
        ch, cw = block_size(torch.rand(1, generator=g).item(), c.context_scale, c.context_aspect, self.grid)

        # Targets B_1..B_M: top-left corners uniform over the valid positions.
        t_top = torch.randint(0, H - th + 1, (B, M), generator=g)
        t_left = torch.randint(0, W - tw + 1, (B, M), generator=g)
        targets = _block_indices(t_top, t_left, th, tw, W)  # (B, M, th*tw)
        in_target = torch.zeros(B, H * W, dtype=torch.bool).scatter_(1, targets.flatten(1), True)  # (B, N)

        # Context B_x \ (B_1 u ... u B_M), redrawn (bounded) where it keeps <= min_keep patches.
        c_top = torch.zeros(B, dtype=torch.long)
        c_left = torch.zeros(B, dtype=torch.long)
        context = torch.zeros(B, H * W, dtype=torch.bool)
        todo = torch.ones(B, dtype=torch.bool)
        for _ in range(c.max_tries):
            n = int(todo.sum())
            top = torch.randint(0, H - ch + 1, (n,), generator=g)
            left = torch.randint(0, W - cw + 1, (n,), generator=g)
            cand = _block_mask(top, left, ch, cw, self.grid)  # (n, N)
            if not c.allow_overlap:
                cand &= ~in_target[todo]
            ok = cand.sum(1) > c.min_keep
            rows = todo.nonzero().squeeze(1)[ok]
            context[rows], c_top[rows], c_left[rows] = cand[ok], top[ok], left[ok]
            todo[rows] = False
            if not todo.any():
                break
        else:
            raise MaskConfigError(
                f"after mask.max_tries={c.max_tries} draws, {int(todo.sum())} image(s) still had a context of no "
                f"more than mask.min_keep={c.min_keep} patches: the {M} targets of {th}x{tw} patches cover most of "
                f"the {ch}x{cw} context block on the {H}x{W} grid. Lower mask.num_targets, mask.target_scale or "
                f"mask.min_keep, or raise mask.max_tries")

        k = int(context.sum(1).min())  # official: truncate every row to the shortest
        return Masks(
            context=_first_k(context, k),
            targets=targets,
            context_box=_boxes(c_top, c_left, ch, cw),
            target_boxes=_boxes(t_top, t_left, th, tw),
            grid=self.grid,
        )

    def _sample_random(self, B: int, g: torch.Generator) -> Masks:
        c, (H, W) = self.cfg, self.grid
        N, M = H * W, c.num_targets
        th, tw = block_size(torch.rand(1, generator=g).item(), c.target_scale, c.target_aspect, self.grid)
        ch, cw = block_size(torch.rand(1, generator=g).item(), c.context_scale, c.context_aspect, self.grid)
        nt = th * tw
        nc = min(max(ch * cw - M * nt, c.min_keep + 1), N - M * nt)
        perm = torch.rand(B, N, generator=g).argsort(dim=1)  # (B, N) a random order of the patches
        targets = perm[:, : M * nt].view(B, M, nt).sort(dim=-1).values  # (B, M, nt)
        context = perm[:, M * nt: M * nt + nc].sort(dim=-1).values  # (B, nc)
        none = torch.full((B, 4), -1, dtype=torch.long)
        return Masks(context, targets, none, none[:, None].expand(B, M, 4).clone(), self.grid)

    def _sample_block(self, B: int, g: torch.Generator) -> Masks:
        c, (H, W) = self.cfg, self.grid
        s = (c.block_scale, c.block_scale)
        th, tw = block_size(torch.rand(1, generator=g).item(), s, c.target_aspect, self.grid)
        top = torch.randint(0, H - th + 1, (B, 1), generator=g)
        left = torch.randint(0, W - tw + 1, (B, 1), generator=g)
        targets = _block_indices(top, left, th, tw, W)  # (B, 1, th*tw)
        in_target = torch.zeros(B, H * W, dtype=torch.bool).scatter_(1, targets.flatten(1), True)
        context = _first_k(~in_target, H * W - th * tw)  # the complement, (B, N - th*tw)
        return Masks(context, targets, torch.full((B, 4), -1, dtype=torch.long), _boxes(top, left, th, tw), self.grid)

    def _sample_quadrant(self, B: int, g: torch.Generator) -> Masks:
        H, W = self.grid
        qh, qw = H // 2, W // 2
        tops = torch.tensor([0, 0, H - qh, H - qh])
        lefts = torch.tensor([0, W - qw, 0, W - qw])
        quads = _block_indices(tops, lefts, qh, qw, W)  # (4, qh*qw)
        others = torch.tensor([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
        q = torch.randint(0, 4, (B,), generator=g)  # the context quadrant of each image
        tq = others[q]  # (B, 3)
        return Masks(
            context=quads[q],  # (B, qh*qw)
            targets=quads[tq],  # (B, 3, qh*qw)
            context_box=_boxes(tops[q], lefts[q], qh, qw),
            target_boxes=_boxes(tops[tq], lefts[tq], qh, qw),
            grid=self.grid,
        )

    # -- DataLoader use ------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Call before iterating a DataLoader for `epoch`, so that each epoch gets new masks."""
        self.epoch = int(epoch)
        self._calls = 0

    def __call__(self, samples: list) -> MaskedBatch:
        """Collate (image, label) samples and attach masks.

        The batch index is recovered under DataLoader workers (batch i goes to worker i % num_workers), so
        the masks of batch i of epoch e depend only on (seed, e, i), whatever the number of workers.
        """
        images, labels = default_collate([(s[0], s[1]) for s in samples])
        info = get_worker_info()
        batch_idx = self._calls * info.num_workers + info.id if info is not None else self._calls
        self._calls += 1
        masks = self.sample(images.shape[0], step=self.epoch * 1_000_000_007 + batch_idx)
        return MaskedBatch(images, labels, masks)
