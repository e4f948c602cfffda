"""Draw layer: every plot_* draws the expected artists on the Axes it gets and returns that Axes."""
import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ijepa_viz.config import MaskConfig, get_preset
from ijepa_viz.masks import MaskCollator
from ijepa_viz.viz import plots


def new_ax(n=1):
    fig = Figure(figsize=(3 * n, 3))
    axes = fig.subplots(1, n)
    return axes if n > 1 else axes


def sample(strategy="multiblock", grid=14, batch=3, seed=0, **kw):
    return MaskCollator(MaskConfig(strategy=strategy, **kw), grid, seed=seed).sample(batch, step=0)


IMAGE = torch.randint(0, 256, (3, 112, 112), dtype=torch.uint8)


def rectangles(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle)]


# -- images ------------------------------------------------------------------------------------------

def test_to_display_handles_layouts_and_dtypes():
    hwc = plots.to_display(IMAGE)
    assert hwc.shape == (112, 112, 3) and hwc.dtype == np.float32
    assert np.allclose(hwc, IMAGE.permute(1, 2, 0).numpy() / 255)
    assert np.allclose(plots.to_display(IMAGE.permute(1, 2, 0).numpy()), hwc)
    assert plots.to_display(torch.rand(8, 8)).shape == (8, 8, 3)
    with pytest.raises(ValueError, match="one image"):
        plots.to_display(torch.rand(2, 3, 8, 8))


def test_denormalize_inverts_normalize():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x = torch.rand(2, 3, 8, 8)
    normed = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(plots.denormalize(normed, mean, std), x, atol=1e-6)
    assert np.allclose(plots.to_display(normed[0], mean, std), x[0].permute(1, 2, 0).numpy(), atol=1e-6)
    # without statistics a normalised image is min-max scaled into [0, 1]
    shown = plots.to_display(normed[0])
    assert shown.min() >= 0 and shown.max() <= 1


# -- masks -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["multiblock", "random", "block", "quadrant"])
def test_mask_fractions_match_the_indices(strategy):
    masks = sample(strategy, min_keep=4)
    N = 14 * 14
    for i in range(3):
        ctx, tgt = plots.mask_fractions(masks, i)
        assert 0 < ctx <= 1 and 0 < tgt <= 1
        assert ctx == masks.context[i].unique().numel() / N
        assert tgt == masks.target_mask()[i].any(0).sum().item() / N
        assert ctx + tgt <= 1 + 1e-9  # the context never overlaps the targets


def test_mask_overlay_and_composite_colour_the_right_patches():
    masks = sample()
    overlay = plots.mask_overlay(masks, 0)
    assert overlay.shape == (14, 14, 4)
    H, W = masks.grid
    last = masks.targets[0, -1, 0].item()  # painted last, so never covered by another block
    colour = matplotlib.colors.to_rgba(plots.TARGET_COLOURS[masks.num_targets - 1])
    assert np.allclose(overlay[last // W, last % W, :3], colour[:3])
    ctx = masks.context[0, 0].item()
    assert np.allclose(overlay[ctx // W, ctx % W, :3], matplotlib.colors.to_rgba(plots.CONTEXT_COLOUR)[:3])
    image = torch.full((3, 112, 112), 128, dtype=torch.uint8)
    comp = plots.composite_masks(image, masks, 0)
    assert comp.shape == (112, 112, 3) and comp.min() >= 0 and comp.max() <= 1
    r, c = (last // W) * 8 + 3, (last % W) * 8 + 3
    a = overlay[last // W, last % W, 3]
    assert np.allclose(comp[r, c], (128 / 255) * (1 - a) + np.array(colour[:3]) * a, atol=1e-6)
    with pytest.raises(ValueError, match="patch grid"):
        plots.composite_masks(torch.zeros(3, 100, 100), masks)


def test_plot_masks_draws_image_boxes_and_grid_and_returns_ax():
    ax = new_ax()
    masks = sample()
    out = plots.plot_masks(ax, IMAGE, masks, index=1)
    assert out is ax
    assert len(ax.images) == 1 and ax.images[0].get_array().shape == (112, 112, 3)
    assert len(rectangles(ax)) == masks.num_targets + 1  # one per target block + the context block
    assert any(isinstance(c, LineCollection) and len(c.get_segments()) == 2 * 13 for c in ax.collections)
    # the target outlines sit on the block boxes (pixels = patches * 8)
    top, left, h, w = masks.target_boxes[1, 0].tolist()
    r = rectangles(ax)[1]  # [context, target 0, ...]
    assert r.get_xy() == (left * 8 - 0.5, top * 8 - 0.5) and r.get_width() == w * 8 and r.get_height() == h * 8


def test_plot_masks_updates_in_place():
    ax = new_ax()
    plots.plot_masks(ax, IMAGE, sample())
    before = ax.images[0].get_array().copy()
    plots.plot_masks(ax, IMAGE, sample(seed=1, num_targets=2))
    assert len(ax.images) == 1 and len(rectangles(ax)) == 3
    assert not np.array_equal(before, ax.images[0].get_array())
    plots.plot_masks(ax, IMAGE, sample("random", min_keep=4))  # no boxes for random masks
    assert len(rectangles(ax)) == 0
    plots.plot_masks(ax, IMAGE, sample("quadrant", min_keep=4))
    assert len(rectangles(ax)) == 3 + 1
    plots.plot_masks(ax, IMAGE, sample("block", min_keep=4))
    assert len(rectangles(ax)) == 1  # the target block; the context is its complement, not a box
    plots.plot_masks(ax, torch.zeros(3, 56, 56, dtype=torch.uint8), sample(grid=7, min_keep=2))
    assert ax.images[0].get_array().shape == (56, 56, 3) and ax.get_xlim() == (-0.5, 55.5)


def test_mask_histograms_over_many_samples():
    collator = MaskCollator(MaskConfig(), 14, seed=0)
    s = plots.mask_size_samples(collator, n=300)
    assert all(len(v) in (300, 1200) for v in s.values())
    assert all(((v > 0) & (v <= 1)).all() for v in s.values())
    # the configured target scale 0.15-0.2, up to the rounding of the block sides to whole patches
    assert 0.13 <= s["target"].min() and s["target"].max() <= 0.22
    assert s["context"].mean() < 0.85  # the targets are cut out of the 85-100% context block
    fig = Figure()
    axes = fig.subplots(1, 3)
    out = plots.plot_mask_histograms(axes, collator, samples=s)
    assert list(out) == list(axes)
    for ax in axes:
        assert len([p for p in ax.patches if isinstance(p, Rectangle)]) >= 50  # 50 bins (+ scale bands)
    assert "mean" in axes[0].get_title()


# -- training curves ---------------------------------------------------------------------------------

HISTORY = [{"step": s, "loss": 1.0 / s, "target_std": 0.5,
            **({"feature_std": 0.3, "rankme": 20.0} if s % 5 == 0 else {})} for s in range(1, 21)]


def test_plot_loss_and_in_place_update():
    ax = new_ax()
    assert plots.plot_loss(ax, HISTORY[:10]) is ax
    assert len(ax.get_lines()) == 1 and list(ax.get_lines()[0].get_xdata()) == list(range(1, 11))
    plots.plot_loss(ax, HISTORY)
    assert len(ax.get_lines()) == 1 and len(ax.get_lines()[0].get_xdata()) == 20
    assert ax.get_xlim()[1] >= 20  # rescaled to the new data
    plots.plot_loss(ax, HISTORY, smooth=0.9)
    assert len(ax.get_lines()) == 1  # 20 points: too few to smooth (a window of at most a twentieth of them)
    long = [{"step": s, "loss": 1.0 / s} for s in range(1, 301)]
    plots.plot_loss(ax, long, smooth=0.9)
    assert len(ax.get_lines()) == 2 and "smoothed" in ax.get_lines()[1].get_label()
    assert "0.9 both ways" in ax.get_lines()[1].get_label() and ax.get_legend() is not None
    shorter = plots.plot_loss(new_ax(), long[:40], smooth=0.9)
    assert "0.5 both ways" in shorter.get_lines()[1].get_label()  # capped: a time constant of 40 / 20 points


def test_smoothing_does_not_lag_behind_a_falling_loss():
    x = np.arange(300.0)
    truth = 0.1 + np.exp(-x / 60)
    noisy = truth + np.random.default_rng(0).normal(0, 0.03, len(x))
    smooth = plots._smoothed(noisy, 0.9)  # 300 points: not capped
    one_way = plots._ema(noisy, 0.9)
    # a one-way EMA sits above a falling curve; the forward-backward one goes through its middle
    assert (one_way - truth).mean() > 0.02
    assert abs((smooth - truth).mean()) < 0.01 and np.abs(smooth - truth).max() < 0.05
    assert 0.3 < (smooth > noisy).mean() < 0.7  # not above the raw curve everywhere
    assert np.allclose(plots._smoothed(np.full(50, 2.0), 0.9), 2.0)
    ramp = 5 - 0.01 * x
    assert np.abs(plots._smoothed(ramp, 0.9) - ramp).max() < 0.02  # a straight line stays straight to its ends
    assert np.array_equal(plots._smoothed(np.array([1.0, 0.5, 0.3, 0.2]), 0.9), [1.0, 0.5, 0.3, 0.2])
    # a sharp, convex drop (a loss's first steps) over few points: the capped window keeps the bend
    steep = 0.7 + 0.5 * np.exp(-np.arange(45.0) / 3)
    assert np.abs(plots._smoothed(steep, 0.9) - steep).max() < 0.08  # 0.22 with a window of a quarter


def test_plot_schedules_follow_the_config():
    cfg = get_preset("cpu-tiny")
    fig = Figure()
    axes = fig.subplots(1, 3)
    out = plots.plot_schedules(axes, cfg, total_steps=100, steps_per_epoch=10, step=30)
    assert list(out) == list(axes)
    lr, wd, mom = (ax.get_lines()[0].get_ydata() for ax in axes)
    assert len(lr) == 101
    assert lr[0] == pytest.approx(cfg.optim.start_lr) and lr.max() == pytest.approx(cfg.optim.lr)
    assert wd[0] == pytest.approx(cfg.optim.weight_decay) and wd[-1] == pytest.approx(cfg.optim.final_weight_decay)
    assert mom[0] == pytest.approx(cfg.optim.ema_start) and mom[-1] == pytest.approx(cfg.optim.ema_end)
    assert all(len(ax.get_lines()) == 2 for ax in axes)  # the curve and the current-step marker
    plots.plot_schedules(axes, cfg, 100, 10, step=60)
    assert all(len(ax.get_lines()) == 2 for ax in axes) and list(axes[0].get_lines()[1].get_xdata()) == [60, 60]


def test_plot_collapse_draws_each_monitor():
    ax = new_ax()
    assert plots.plot_collapse(ax, HISTORY[:3]) is ax
    assert {line.get_gid() for line in ax.get_lines()} == {"zero", "target_std"}
    plots.plot_collapse(ax, HISTORY)
    assert {line.get_gid() for line in ax.get_lines()} == {"zero", "target_std", "feature_std"}
    twin = ax._ijepa_twin
    assert [line.get_gid() for line in twin.get_lines()] == ["rankme"]
    lines = {line.get_gid(): line for line in ax.get_lines()}
    assert lines["feature_std"].get_ydata()[0] == pytest.approx(1.0)  # relative to the first reading
    assert lines["feature_std"].get_label() == "feature_std / 0.3" and twin.get_ylim()[0] == 0
    assert len(twin.get_lines()[0].get_xdata()) == 4
    plots.plot_collapse(ax, HISTORY)
    assert len(ax.get_lines()) == 3 and len(twin.get_lines()) == 1


# -- RankMe: singular values and the probe readings of runs --------------------------------------------

def test_singular_value_shares_give_rankme():
    from ijepa_viz.model import rankme

    g = torch.Generator().manual_seed(0)
    healthy = torch.randn(256, 32, generator=g)
    collapsed = torch.ones(256, 1) * torch.randn(1, 32, generator=g) + 1e-3 * torch.randn(256, 32, generator=g)
    for x in (healthy, collapsed):
        p = plots.singular_value_shares(x)
        assert p.shape == (32,) and p.sum() == pytest.approx(1.0) and np.all(np.diff(p) <= 1e-12)
        assert np.exp(-(p * np.log(p)).sum()) == pytest.approx(rankme(x), rel=1e-3)
    assert plots.singular_value_shares(collapsed)[0] > 0.9 > plots.singular_value_shares(healthy)[0]
    ax = new_ax()
    assert plots.plot_spectra(ax, {"healthy": healthy, "collapsed": collapsed}) is ax
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(ax.get_lines()) == 2 and labels[0].startswith("healthy: RankMe") and "of 32" in labels[1]
    assert ax.get_yscale() == "log"


def _probe_history(values, every=5):
    """Metrics rows of a run logged every step, with a collapse check every `every` steps (the latest
    reading repeated in every row, as the Trainer does)."""
    rows, current = [], values[0]
    for step in range(1, every * (len(values) - 1) + 1):
        if step % every == 0:
            current = values[step // every]
        rows.append({"step": step, "loss": 1.0, "probe_rankme": current})
    return rows


def test_probe_readings_and_rankme_runs():
    on, off = _probe_history([3.0, 2.9, 2.8]), _probe_history([3.0, 1.6, 1.2])
    steps, values = plots.probe_readings(on, 5)
    assert list(steps) == [0, 5, 10] and list(values) == [3.0, 2.9, 2.8]
    assert plots.probe_readings([{"step": 1, "loss": 1.0}], 5)[0].size == 0  # no checks logged
    ax = new_ax()
    assert plots.plot_rankme_runs(ax, {"EMA on": on, "EMA off": off}, 5, collapse_line=1.5) is ax
    lines = ax.get_lines()
    assert len(lines) == 3 and list(lines[1].get_ydata()) == [3.0, 1.6, 1.2]
    assert "last 1.20" in lines[1].get_label() and lines[2].get_ydata()[0] == 1.5


# -- ablations ---------------------------------------------------------------------------------------

RESULTS = {"rows": [
    {"group": "mask.strategy", "setting": "random", "linear": 0.31, "knn": 0.25, "seeds": 1},
    {"group": "mask.strategy", "setting": "multiblock", "linear": 0.42, "knn": 0.30, "seeds": 1},
    {"group": "train.ema", "setting": True, "linear": 0.42, "knn": 0.3, "seeds": 1},
    {"group": "train.ema", "setting": False, "linear": 0.12, "knn": 0.1, "seeds": 1},
]}


def test_ablation_bars_put_the_paper_beside_ours():
    ax = new_ax()
    assert plots.plot_ablation_bars(ax, RESULTS, group="mask.strategy") is ax
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(bars) == 4  # 2 settings x (ours, paper)
    ours, paper = bars[:2], bars[2:]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["multiblock", "random"]  # the paper's order
    assert [b.get_height() for b in ours] == pytest.approx([42.0, 31.0])  # fractions shown as %
    assert [b.get_height() for b in paper] == pytest.approx([54.2, 17.6])
    assert "Table 6" in ax.get_xlabel() and "paper" in ax.get_legend().get_texts()[1].get_text()


def test_ablation_bars_without_paper_numbers_and_bad_group():
    ax = new_ax()
    plots.plot_ablation_bars(ax, RESULTS, group="train.ema", metric="knn")
    assert len([p for p in ax.patches if isinstance(p, Rectangle)]) == 2
    assert [t.get_text() for t in ax.get_xticklabels()] == ["true", "false"]
    ax = plots.plot_ablation_bars(new_ax(), {"4": 50.0, "1": 12.0}, group="mask.num_targets", baseline=0.3)
    assert [line.get_ydata()[0] for line in ax.get_lines()] == [30.0]  # the untrained baseline, in %
    with pytest.raises(ValueError, match="no results"):
        plots.plot_ablation_bars(new_ax(), RESULTS, group="model.target")


def test_paper_numbers():
    assert plots.PAPER_ABLATIONS["mask.strategy"] == {"multiblock": 54.2, "block": 20.2, "random": 17.6,
                                                      "quadrant": 15.5}
    assert plots.PAPER_ABLATIONS["model.target"] == {"representation": 66.9, "pixels": 40.7}
    assert plots.PAPER_ABLATIONS["mask.num_targets"] == {"4": 54.2, "1": 9.0}
    assert list(plots.PAPER_ABLATIONS["mask.num_targets"]) == ["4", "1"]  # the paper's choice first


SEEDED = {"rows": [  # the paper's choice first in each group; the base run repeated, as in ablations.json
    {"group": "mask.strategy", "setting": "multiblock", "linear": 0.40, "linear_per_seed": [0.41, 0.39],
     "knn": 0.3, "knn_per_seed": [0.3, 0.3], "rankme": 9.0, "rankme_per_seed": [8.0, 10.0]},
    {"group": "mask.strategy", "setting": "random", "linear": 0.30, "linear_per_seed": [0.31, 0.29],
     "knn": 0.2, "knn_per_seed": [0.2, 0.2], "rankme": 5.0, "rankme_per_seed": [5.0, 5.0]},
    {"group": "model.target", "setting": "representation", "linear": 0.40, "linear_per_seed": [0.41, 0.39],
     "knn": 0.3, "knn_per_seed": [0.3, 0.3], "rankme": 9.0, "rankme_per_seed": [8.0, 10.0]},
    {"group": "model.target", "setting": "pixels", "linear": 0.50, "linear_per_seed": [0.51, 0.49],
     "knn": 0.4, "knn_per_seed": [0.4, 0.4], "rankme": 12.0, "rankme_per_seed": [12.0, 12.0]},
    {"group": "train.ema", "setting": "on", "linear": 0.40, "linear_per_seed": [0.41, 0.39],
     "knn": 0.3, "knn_per_seed": [0.3, 0.3], "rankme": 9.0, "rankme_per_seed": [8.0, 10.0]},
    {"group": "train.ema", "setting": "off", "linear": 0.395, "linear_per_seed": [0.40, 0.39],
     "knn": 0.3, "knn_per_seed": [0.3, 0.3], "rankme": 1.1, "rankme_per_seed": [1.1, 1.1]},
]}


def test_ablation_bars_show_the_spread_between_seeds_and_the_baseline():
    from matplotlib.container import ErrorbarContainer

    ax = plots.plot_ablation_bars(new_ax(), SEEDED, group="mask.strategy", baseline=0.35)
    errs = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(errs) == 1
    segments = errs[0].lines[2][0].get_segments()  # one vertical segment per bar: lowest to highest seed
    assert [tuple(np.round(s[:, 1], 6)) for s in segments] == [(39.0, 41.0), (29.0, 31.0)]
    assert any(line.get_linestyle() == "--" and line.get_ydata()[0] == 35.0 for line in ax.get_lines())
    texts = [t.get_text() for t in ax.texts]
    assert "40.0" in texts and "30.0" in texts
    plain = plots.plot_ablation_bars(new_ax(), SEEDED, group="mask.strategy", seed_range=False)
    assert not [c for c in plain.containers if isinstance(c, ErrorbarContainer)]


def test_ablation_runs_and_the_rankme_panel():
    runs = plots.ablation_runs(SEEDED)
    assert [name for name, _ in runs] == ["base (multiblock, representation, on)", "strategy=random",
                                          "target=pixels", "ema=off"]
    ax = plots.plot_ablation_metric(new_ax(), SEEDED, "rankme", baseline=3.0, threshold=2.0)
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert [b.get_height() for b in bars] == pytest.approx([9.0, 5.0, 12.0, 1.1])
    assert matplotlib.colors.to_hex(bars[3].get_facecolor()) == matplotlib.colors.to_hex("tab:red")  # collapsed
    assert matplotlib.colors.to_hex(bars[0].get_facecolor()) == matplotlib.colors.to_hex("tab:blue")
    assert {line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() in ("--", ":")} == {3.0, 2.0}
    with pytest.raises(ValueError, match="no run"):
        plots.plot_ablation_metric(new_ax(), SEEDED, "final_loss")


def test_ablation_findings_follow_the_numbers():
    text = plots.ablation_findings(SEEDED, baseline=0.35, n_test=10_000, scale="tiny runs", dim=64)
    assert len(text) == 1 + 3  # the baseline, then one sentence per group
    assert text[0].startswith("Against the untrained network (35.0%, linear probe): 3 of 4 runs beat it")
    strategy, target, ema = text[1:]
    assert strategy.startswith("mask.strategy: as in the paper") and "more than the noise" in strategy
    assert target.startswith("model.target: DISAGREES") and "pixels scores highest" in target
    assert "more than the noise" in target and "Likely reason" in target and "tiny runs" in target
    assert "train.ema=off: Collapsed" in ema and "does not tell them apart" in ema
    # the same comparison within the noise: the sentence says so
    close = {"rows": [dict(r) for r in SEEDED["rows"][2:4]]}
    close["rows"][1].update(linear=0.41, linear_per_seed=[0.44, 0.38])
    (sentence,) = plots.ablation_findings(close, n_test=10_000)
    assert "DISAGREES" in sentence and "within the noise" in sentence
    # and flips when the paper's choice wins
    close["rows"][1].update(linear=0.30, linear_per_seed=[0.30, 0.30])
    assert plots.ablation_findings(close)[0].startswith("model.target: as in the paper")


def test_ablation_findings_on_the_saved_results():
    import json
    from pathlib import Path

    saved = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/ablations.json").read_text())
    text = plots.ablation_findings(saved, baseline=0.36, n_test=10_000, dim=192)
    groups = list(dict.fromkeys(r["group"] for r in saved["rows"]))
    assert len(text) == 1 + len(groups) and all(t.startswith(g) for t, g in zip(text[1:], groups))
