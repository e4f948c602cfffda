"""Mask invariants over many grids, seeds and configurations; the up-front configuration check; bounded
retries; determinism (also under DataLoader workers); and a hypothesis property test over random configs."""
from __future__ import annotations

import math
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from ijepa_viz.config import ConfigError, MaskConfig
from ijepa_viz.masks import MaskCollator, MaskConfigError, MaskedBatch, Masks, block_size

torch.set_num_threads(1)

STRATEGIES = ("multiblock", "random", "block", "quadrant")


# -- the invariants -----------------------------------------------------------------------------

def cells(top: int, left: int, h: int, w: int, W: int) -> list[int]:
    """Raster indices of the h x w block at (top, left), sorted."""
    return [(top + i) * W + left + j for i in range(h) for j in range(w)]


def clamp(v: int, G: int) -> int:
    return max(1, min(v, G - 1))


def size_bounds(scale, aspect, grid) -> tuple[tuple[int, int], tuple[int, int]]:
    """Bounds on (h, w) implied by the official size rule at the ends of the scale/aspect ranges: the area
    floor(H*W*s) and the aspect r only grow with the draw, h = round(sqrt(area*r)) grows with both and
    w = round(sqrt(area/r)) grows with the area and shrinks with r; both are clipped to [1, G-1]."""
    H, W = grid
    a0, a1 = int(H * W * scale[0]), int(H * W * scale[1])
    h_lo, h_hi = clamp(round(math.sqrt(a0 * aspect[0])), H), clamp(round(math.sqrt(a1 * aspect[1])), H)
    w_lo, w_hi = clamp(round(math.sqrt(a0 / aspect[1])), W), clamp(round(math.sqrt(a1 / aspect[0])), W)
    return (h_lo, h_hi), (w_lo, w_hi)


def check_invariants(m: Masks, cfg: MaskConfig, grid: tuple[int, int], B: int) -> None:
    H, W = grid
    N = H * W
    ctx, tgt = m.context, m.targets
    M = {"quadrant": 3, "block": 1}.get(cfg.strategy, cfg.num_targets)
    assert ctx.dtype == torch.long and tgt.dtype == torch.long
    assert ctx.ndim == 2 and ctx.shape[0] == B
    assert tgt.ndim == 3 and tgt.shape[:2] == (B, M), "M target blocks of one size"
    assert m.num_targets == M and tuple(m.grid) == (H, W)
    assert m.context_box.shape == (B, 4) and m.target_boxes.shape == (B, M, 4)
    Nc, Nt = ctx.shape[1], tgt.shape[2]
    assert Nc > cfg.min_keep, f"context of {Nc} patches, min_keep={cfg.min_keep}"
    assert Nt > cfg.min_keep, f"targets of {Nt} patches, min_keep={cfg.min_keep}"
    assert ((ctx >= 0) & (ctx < N)).all() and ((tgt >= 0) & (tgt < N)).all()
    assert (ctx.diff(dim=-1) > 0).all(), "context rows must be sorted and unique"
    assert (tgt.diff(dim=-1) > 0).all(), "target rows must be sorted and unique"
    cmask, tmask = m.context_mask(), m.target_mask()
    assert cmask.shape == (B, N) and tmask.shape == (B, M, N)
    assert (cmask.sum(1) == Nc).all() and (tmask.sum(2) == Nt).all()
    if not cfg.allow_overlap:
        assert not (cmask & tmask.any(1)).any(), "context and targets overlap"

    ctx_l, tgt_l = ctx.tolist(), tgt.tolist()
    cbox, tbox = m.context_box.tolist(), m.target_boxes.tolist()
    if cfg.strategy == "multiblock":
        (h_lo, h_hi), (w_lo, w_hi) = size_bounds(cfg.target_scale, cfg.target_aspect, grid)
        th, tw = tbox[0][0][2], tbox[0][0][3]
        assert h_lo <= th <= h_hi and w_lo <= tw <= w_hi, (th, tw, (h_lo, h_hi), (w_lo, w_hi))
        assert Nt == th * tw
        (ch_lo, ch_hi), (cw_lo, cw_hi) = size_bounds(cfg.context_scale, cfg.context_aspect, grid)
        ch, cw = cbox[0][2], cbox[0][3]
        assert ch_lo <= ch <= ch_hi and cw_lo <= cw <= cw_hi, (ch, cw)
        allowed_sizes = []
        for b in range(B):
            union = set()
            for i in range(M):
                top, left, h, w = tbox[b][i]
                assert (h, w) == (th, tw), "one target size per batch"
                assert 0 <= top <= H - h and 0 <= left <= W - w
                assert tgt_l[b][i] == cells(top, left, h, w, W), "target indices are the box's cells"
                union |= set(tgt_l[b][i])
            top, left, h, w = cbox[b]
            assert (h, w) == (ch, cw), "one context size per batch"
            assert 0 <= top <= H - h and 0 <= left <= W - w
            box = cells(top, left, h, w, W)
            allowed = [n for n in box if cfg.allow_overlap or n not in union]
            assert set(ctx_l[b]) <= set(box), "context lies inside its box"
            assert ctx_l[b] == allowed[:Nc], "context = first patches of box minus targets, raster order"
            allowed_sizes.append(len(allowed))
        assert Nc == min(allowed_sizes), "rows truncated to the shortest context in the batch"
    elif cfg.strategy == "random":
        assert (m.context_box == -1).all() and (m.target_boxes == -1).all()
        for b in range(B):
            seen = set()
            for i in range(M):
                assert not seen & set(tgt_l[b][i]), "random targets are disjoint"
                seen |= set(tgt_l[b][i])
    elif cfg.strategy == "block":
        assert (m.context_box == -1).all()
        for b in range(B):
            top, left, h, w = tbox[b][0]
            assert 0 <= top <= H - h and 0 <= left <= W - w
            assert tgt_l[b][0] == cells(top, left, h, w, W)
            assert ctx_l[b] == [n for n in range(N) if n not in set(tgt_l[b][0])], "context = complement"
    elif cfg.strategy == "quadrant":
        qh, qw = H // 2, W // 2
        quads = {(0, 0), (0, W - qw), (H - qh, 0), (H - qh, W - qw)}
        assert Nc == Nt == qh * qw
        for b in range(B):
            boxes = [tuple(cbox[b])] + [tuple(x) for x in tbox[b]]
            assert {(t, l) for t, l, _, _ in boxes} == quads, "context + targets are the four quadrants"
            assert all((h, w) == (qh, qw) for _, _, h, w in boxes)
            assert ctx_l[b] == cells(*cbox[b], W)
            for i in range(M):
                assert tgt_l[b][i] == cells(*tbox[b][i], W)


# -- invariants over grids, seeds and configurations ---------------------------------------------

CONFIGS = {
    "paper-k2": dict(min_keep=2),
    "paper-k10": dict(min_keep=10),
    "one-target": dict(num_targets=1, target_scale=(0.1, 0.3), target_aspect=(0.5, 2.0), min_keep=1),
    "overlap": dict(allow_overlap=True, min_keep=3),
    "small-context": dict(num_targets=2, context_scale=(0.5, 0.7), min_keep=2),
    "wide-targets": dict(num_targets=3, target_scale=(0.05, 0.1), target_aspect=(0.3, 3.0), min_keep=0,
                         block_scale=0.4),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_invariants_over_grids_and_seeds(strategy, name):
    built = 0
    for grid in range(6, 17):
        cfg = MaskConfig(strategy=strategy, **CONFIGS[name])
        try:
            col = MaskCollator(cfg, grid, seed=grid)
        except MaskConfigError:
            continue
        built += 1
        for step, B in ((0, 1), (1, 5), (7, 8)):
            check_invariants(col.sample(B, step), cfg, (grid, grid), B)
    assert built >= 3, f"{name}/{strategy} was feasible on only {built} grids"


@pytest.mark.parametrize("grid", [(6, 10), (12, 7)])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rectangular_grids(grid, strategy):
    cfg = MaskConfig(strategy=strategy, min_keep=1)
    col = MaskCollator(cfg, grid, seed=3)
    for step in range(3):
        check_invariants(col.sample(4, step), cfg, grid, 4)


def test_paper_masks_on_imagenet_grid_have_paper_sizes():
    """224 px / patch 16 = 14x14: targets are ~15-20% of the grid, the context ~85-100% minus the targets."""
    cfg = MaskConfig(min_keep=10)
    col = MaskCollator(cfg, 14)
    for step in range(10):
        m = col.sample(8, step)
        check_invariants(m, cfg, (14, 14), 8)
        assert 0.1 * 196 <= m.targets.shape[-1] <= 0.25 * 196
        ch, cw = m.context_box[0, 2:].tolist()
        assert ch == cw and 0.7 * 196 <= ch * cw <= 169  # square, at most 13x13


def test_one_block_size_per_batch_shared_draw():
    """As the official collator: one uniform draw sets both the target scale and aspect of the whole batch."""
    cfg = MaskConfig()
    col = MaskCollator(cfg, 14, seed=5)
    for step in range(5):
        g = col.generator(step)
        u_t, u_c = torch.rand(1, generator=g).item(), torch.rand(1, generator=g).item()
        m = col.sample(4, step)
        assert tuple(m.target_boxes[0, 0, 2:].tolist()) == block_size(u_t, cfg.target_scale, cfg.target_aspect,
                                                                      (14, 14))
        assert tuple(m.context_box[0, 2:].tolist()) == block_size(u_c, cfg.context_scale, cfg.context_aspect,
                                                                   (14, 14))


def test_block_size_official_rule():
    # area = floor(196 * 0.15) = 29; r = 0.75: h = round(sqrt(21.75)) = 5, w = round(sqrt(38.67)) = 6
    assert block_size(0.0, (0.15, 0.2), (0.75, 1.5), (14, 14)) == (5, 6)
    # a full-grid block is shrunk to (H-1) x (W-1)
    assert block_size(0.999, (1.0, 1.0), (1.0, 1.0), (8, 8)) == (7, 7)
    # never zero
    assert block_size(0.0, (0.001, 0.001), (1.0, 1.0), (4, 4)) == (1, 1)


# -- determinism ----------------------------------------------------------------------------------

def _equal(a: Masks, b: Masks) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k))
               for k in ("context", "targets", "context_box", "target_boxes"))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_determinism(strategy):
    cfg = MaskConfig(strategy=strategy, min_keep=4)
    a, b = MaskCollator(cfg, 12, seed=1), MaskCollator(cfg, 12, seed=1)
    for step in (0, 3, 10**9):
        assert _equal(a.sample(6, step), b.sample(6, step))
        assert _equal(a.sample(6, step), a.sample(6, step))
    first = a.sample(6, 0)
    assert all(not _equal(first, a.sample(6, s)) for s in range(1, 6)), "different steps must differ"
    assert not _equal(first, MaskCollator(cfg, 12, seed=2).sample(6, 0)), "different seeds must differ"


# -- impossible settings and bounded work --------------------------------------------------------

def test_cifar_patch4_min_keep10_raises_clearly():
    """32 px / patch 4 = 8x8 grid: targets are 3x3 = 9 patches, not more than min_keep=10. The official
    collator loops forever here; ours says which values to change."""
    t0 = time.perf_counter()
    with pytest.raises(MaskConfigError) as e:
        MaskCollator(MaskConfig(min_keep=10), 8)  # the official min_keep
    assert time.perf_counter() - t0 < 1.0
    msg = str(e.value)
    assert "min_keep" in msg and "target_scale" in msg and "8x8" in msg
    assert isinstance(e.value, ConfigError)
    # the fix it suggests works
    check_invariants(MaskCollator(MaskConfig(min_keep=4), 8).sample(8, 0), MaskConfig(min_keep=4), (8, 8), 8)


def test_quadrant_too_small_grid_raises():
    with pytest.raises(MaskConfigError, match="quadrant"):
        MaskCollator(MaskConfig(strategy="quadrant", min_keep=4), 4)  # quadrants of 2x2 = 4 patches
    with pytest.raises(MaskConfigError, match="2x2"):
        MaskCollator(MaskConfig(strategy="quadrant", min_keep=0), 1)
    MaskCollator(MaskConfig(strategy="quadrant", min_keep=3), 4)  # 4 > 3 is fine


def test_other_impossible_settings_raise():
    with pytest.raises(MaskConfigError, match="strategy"):
        MaskCollator(MaskConfig(strategy="checkerboard"), 8)
    with pytest.raises(MaskConfigError, match="context_scale"):
        MaskCollator(MaskConfig(context_scale=(0.1, 0.1), min_keep=8), 8)
    with pytest.raises(MaskConfigError, match="random"):
        MaskCollator(MaskConfig(strategy="random", num_targets=6, target_scale=(0.2, 0.2), min_keep=4), 8)
    with pytest.raises(MaskConfigError, match="block_scale"):
        MaskCollator(MaskConfig(strategy="block", block_scale=0.9, min_keep=11), 6)  # 36 - 5x5 = 11


def test_rare_short_target_blocks_are_caught_up_front():
    """Regression: on a 21x21 grid these ranges give 112-patch targets only for u in a short interval that a
    fixed sample of u missed, so min_keep=119 passed the check and a 112-patch target came out (step 618)."""
    cfg = MaskConfig(num_targets=1, target_scale=(0.2674556465578502, 0.9814867430932283),
                     target_aspect=(0.5316091927227145, 3.457875004682681), min_keep=119)
    with pytest.raises(MaskConfigError, match="112 patches"):
        MaskCollator(cfg, 21)
    cfg.min_keep = 111
    col = MaskCollator(cfg, 21)
    check_invariants(col.sample(1, 618), cfg, (21, 21), 1)


def test_max_tries_raises_instead_of_hanging():
    """Six 3x4 targets on an 8x8 grid leave little of a 4x4 context: the up-front check passes (blocks are big
    enough alone), but contexts often keep <= min_keep patches. With max_tries=1 sampling must raise."""
    cfg = MaskConfig(num_targets=6, target_scale=(0.2, 0.25), context_scale=(0.3, 0.35), min_keep=8, max_tries=1)
    col = MaskCollator(cfg, 8)
    t0 = time.perf_counter()
    raised = 0
    for step in range(20):
        try:
            m = col.sample(8, step)
        except MaskConfigError as e:
            raised += 1
            assert "max_tries" in str(e) and "min_keep" in str(e)
        else:
            check_invariants(m, cfg, (8, 8), 8)
    assert raised >= 10
    assert time.perf_counter() - t0 < 2.0


def test_construction_is_fast_on_large_grids():
    t0 = time.perf_counter()
    for strategy in STRATEGIES:
        for grid in (14, 16, 32):
            MaskCollator(MaskConfig(strategy=strategy), grid)
    MaskCollator(MaskConfig(target_scale=(0.01, 0.9), target_aspect=(0.2, 5.0), min_keep=0), 32)
    assert time.perf_counter() - t0 < 3.0


# -- DataLoader use ---------------------------------------------------------------------------------

def _loader_masks(col: MaskCollator, ds, workers: int, epoch: int) -> list[MaskedBatch]:
    col.set_epoch(epoch)
    return list(DataLoader(ds, batch_size=4, shuffle=False, collate_fn=col, num_workers=workers))


def test_collate_fn_returns_images_labels_masks():
    x = torch.randn(6, 3, 32, 32)
    y = torch.arange(6)
    col = MaskCollator(MaskConfig(min_keep=4), 8, seed=0)
    out = col([(x[i], y[i]) for i in range(6)])
    assert isinstance(out, MaskedBatch)
    assert torch.equal(out.images, x) and torch.equal(out.labels, y)
    check_invariants(out.masks, col.cfg, (8, 8), 6)
    moved = out.masks.to("cpu")
    assert _equal(moved, out.masks)


def test_dataloader_workers_give_the_same_masks():
    ds = TensorDataset(torch.randn(20, 3, 32, 32), torch.arange(20))
    cfg = MaskConfig(min_keep=4)
    col = MaskCollator(cfg, 8, seed=11)
    serial = _loader_masks(col, ds, 0, epoch=0)
    parallel = _loader_masks(col, ds, 2, epoch=0)
    assert len(serial) == len(parallel) == 5
    for a, b in zip(serial, parallel):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert _equal(a.masks, b.masks)
        check_invariants(b.masks, cfg, (8, 8), a.images.shape[0])
    assert not _equal(serial[0].masks, serial[1].masks), "batches within an epoch differ"
    # a new epoch gives new masks; the same epoch again gives the same ones
    again = _loader_masks(col, ds, 0, epoch=0)
    nxt = _loader_masks(col, ds, 0, epoch=1)
    assert all(_equal(a.masks, b.masks) for a, b in zip(serial, again))
    assert all(not _equal(a.masks, b.masks) for a, b in zip(serial, nxt))


# -- property test ------------------------------------------------------------------------------------

@st.composite
def mask_settings(draw):
    strategy = draw(st.sampled_from(STRATEGIES))
    H = draw(st.integers(2, 32))
    W = draw(st.one_of(st.just(H), st.integers(2, 32)))

    def rng(lo, hi):
        a, b = draw(st.floats(lo, hi)), draw(st.floats(lo, hi))
        return (min(a, b), max(a, b))

    cfg = MaskConfig(
        strategy=strategy,
        num_targets=draw(st.integers(1, 6)),
        target_scale=rng(0.01, 1.0),
        target_aspect=rng(0.2, 5.0),
        context_scale=rng(0.05, 1.0),
        context_aspect=(1.0, 1.0) if draw(st.booleans()) else rng(0.5, 2.0),
        min_keep=draw(st.integers(0, 20)),
        allow_overlap=draw(st.booleans()),
        block_scale=draw(st.floats(0.05, 0.95)),
        max_tries=draw(st.integers(1, 50)),
    )
    return cfg, (H, W), draw(st.integers(1, 8)), draw(st.integers(0, 10**6)), draw(st.integers(0, 2**31))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask_settings())
def test_property_either_clear_error_or_valid_masks(setting):
    cfg, grid, B, step, seed = setting
    t0 = time.perf_counter()
    try:
        col = MaskCollator(cfg, grid, seed=seed)
    except MaskConfigError as e:
        assert str(e)
        assert time.perf_counter() - t0 < 2.0
        return
    try:
        m = col.sample(B, step)
    except MaskConfigError as e:
        assert "max_tries" in str(e)
    else:
        check_invariants(m, cfg, grid, B)
    assert time.perf_counter() - t0 < 2.0
