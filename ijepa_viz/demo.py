"""`ijepa-viz demo` / `make demo`: the main job, offline, in at most five minutes on a 2-core laptop CPU.

It trains the `cpu-demo` preset on the built-in `dots` dataset for `DEMO_STEPS` steps (fewer where they do not
fit the time budget), evaluates the
average-pooled target encoder with a linear probe and kNN against a randomly initialised encoder of the same
architecture and raw pixels, and writes `report.html` with PNG figures: sampled masks, the loss curve, PCA and
t-SNE of the trained and the untrained encoder's features side by side, and the probe accuracies, with a
sentence computed from them (`viz.verdicts.probe_verdict`) and the time spent training and evaluating.
"""
from __future__ import annotations

import html
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ijepa_viz.config import Config, get_preset, override  # noqa: E402

QUICK = ["model.img_size=16", "model.patch_size=2", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
         "model.pred_embed_dim=16", "model.pred_depth=1", "mask.min_keep=1", "mask.num_targets=2",
         "data.batch_size=16", "data.shapes_train_size=128", "data.shapes_test_size=64", "train.log_every=1"]


# The demo's recipe: 800 steps of cpu-demo (measured at that length, benchmarks/results/dots_design.jsonl); the
# time budget only shortens it on a machine too slow to run them in time.
DEMO_STEPS = 800


class _TimeBudget:
    """Callback: stop training once `seconds` have passed (the schedules are sized to end near then)."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def on_step(self, trainer, row):
        if time.perf_counter() > self.end:
            trainer.stop()


def _estimate_steps(cfg: Config, seconds: float) -> int:
    """Steps that fit in `seconds`, from timing a few steps of a throwaway trainer on random images."""
    from ijepa_viz.train import Trainer

    B = cfg.data.batch_size
    images = torch.randn(B, 3, cfg.model.img_size, cfg.model.img_size)
    probe = Trainer(override(cfg, ["train.steps=4"]), loader=[(images, torch.zeros(B))], progress=False)
    for _ in range(2):  # warm-up: allocations, thread pools, kernel choices
        probe.train_step(images)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        probe.train_step(images)
        times.append(time.perf_counter() - t)
    # The median step: one step slowed by another program at startup should not shorten the whole run (a
    # mean of 3 steps, timed while another job started, once planned 223 steps that then took 87 s of 180).
    per_step = sorted(times)[len(times) // 2]
    return max(10, int(seconds * 0.95 / per_step))


def demo_config(out_dir: str | Path, quick: bool = False) -> Config:
    cfg = get_preset("cpu-demo")
    sets = ["data.name=dots", f"train.out_dir={out_dir}", "train.log_every=5", "train.checkpoint_every=100"]
    return override(cfg, sets + (QUICK if quick else []))


def run_demo(out_dir: str | Path = "runs/demo", seconds: float = 180.0, quick: bool = False,
             progress: bool = True) -> Path:
    """Train, evaluate and write `<out_dir>/report.html`; returns its path."""
    from ijepa_viz.evaluate import evaluate
    from ijepa_viz.feature_cache import default_feature_cache
    from ijepa_viz.train import Trainer

    out = Path(out_dir)
    cfg = demo_config(out, quick)
    start = time.perf_counter()
    steps = 12 if quick else min(DEMO_STEPS, _estimate_steps(cfg, seconds))
    cfg = override(cfg, [f"train.steps={steps}"])
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        ckpt.unlink()  # a demo always starts fresh
    (out / "metrics.jsonl").unlink(missing_ok=True)
    print(f"training cpu-demo on {cfg.data.name} for {steps} steps (at most ~{seconds:.0f} s) -> {out}")
    result = Trainer(cfg, callbacks=[_TimeBudget(seconds * 1.1)], progress=progress).fit()
    train_s = time.perf_counter() - start

    print("evaluating: linear probe of the target encoder vs the untrained encoder and raw pixels")
    tick = time.perf_counter()
    limits = dict(limit_train=128, limit_test=64) if quick else {}
    # The untrained encoder is the same in every demo (same preset, same seed): its features are kept in the
    # feature cache, keyed on the exact weights and images, so only the first demo on a machine extracts them.
    cache = None if quick else default_feature_cache()
    ev = evaluate(result.checkpoint, cfg=cfg, model=result.model, probes=("linear", "knn"), progress=progress,
                  feature_cache=cache, **limits)
    eval_s = time.perf_counter() - tick
    tick = time.perf_counter()
    figures, clusters = _figures(cfg, result, out, n_points=128 if quick else 1000)
    figures_s = time.perf_counter() - tick
    from ijepa_viz.viz.verdicts import probe_verdict

    verdict = probe_verdict(ev)
    times = {"train": train_s, "eval": eval_s, "figures": figures_s, "total": time.perf_counter() - start}
    report = _write_report(out, cfg, result, ev, figures, times, verdict, clusters)
    (out / "demo.json").write_text(json.dumps({"steps": result.step, "seconds": times, "verdict": verdict,
                                               "clusters": clusters, "eval": ev}, indent=2, default=str))
    for row in ev["rows"]:
        print(f"  {row['name']:28s} linear {row.get('linear', float('nan')) * 100:5.1f}%   "
              f"kNN {row.get('knn', float('nan')) * 100:5.1f}%")
    print(verdict)
    for sentence in clusters:
        print(sentence)
    print(f"time: training {train_s:.0f} s, evaluation {eval_s:.0f} s, figures {figures_s:.0f} s, "
          f"total {times['total']:.0f} s")
    return report


def _figures(cfg: Config, result, out: Path, n_points: int = 1000) -> tuple[dict[str, str], list[str]]:
    """The report's figures (name -> file name) and, for each PCA and t-SNE panel, the sentence that says
    whether its classes form clusters (`verdicts.cluster_verdict`), then one per encoder on how many of an
    image's nearest neighbours share its class (`verdicts.neighbour_verdict`): what a t-SNE can show."""
    from ijepa_viz.data import class_names, load_uint8
    from ijepa_viz.evaluate import _random_init
    from ijepa_viz.masks import MaskCollator
    from ijepa_viz.viz.feature_plots import plot_embedding_2d
    from ijepa_viz.viz.features import embed, pca_2d, tsne_2d
    from ijepa_viz.viz.plots import plot_loss, plot_masks
    from ijepa_viz.viz.verdicts import cluster_verdict, neighbour_purity, neighbour_verdict

    files = {}
    images, labels = load_uint8(cfg.data, "test", cfg.model.img_size, limit=n_points)
    masks = MaskCollator(cfg.mask, cfg.grid_size, seed=0).sample(4, step=0)
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.2))
    for i, ax in enumerate(axes):
        plot_masks(ax, images[i], masks, index=i)
    fig.suptitle("multi-block masks: context patches and target blocks")
    files["masks"] = _save(fig, out / "masks.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    plot_loss(ax, result.history)
    files["loss"] = _save(fig, out / "loss.png")

    names = class_names(cfg.data)
    untrained = _random_init(cfg, cfg.train.seed)  # the weights this run started from
    feats = {"trained": embed(result.model, images, cfg), "untrained": embed(untrained, images, cfg)}
    fig, axes = plt.subplots(2, 2, figsize=(11, 9))
    clusters = []
    for col, (name, f) in enumerate(feats.items()):
        for row, (method, to_2d) in enumerate((("PCA", pca_2d), ("t-SNE", tsne_2d))):
            xy = to_2d(f)  # (N, 2)
            plot_embedding_2d(axes[row, col], xy, labels, names, legend=col == 1, title=f"{name}: {method}")
            clusters.append(cluster_verdict(xy, labels, f"the {name} encoder's {method}"))
    for name, f in feats.items():  # why a t-SNE can or cannot gather the classes: it keeps neighbourhoods
        clusters.append(neighbour_verdict(*neighbour_purity(f, labels), f"the {name} encoder's features"))
    fig.suptitle(f"target-encoder features of {len(images)} test images, coloured by class (never seen in training)")
    files["embedding"] = _save(fig, out / "embedding.png")
    return files, clusters


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _write_report(out: Path, cfg: Config, result, ev: dict, figures: dict, times: dict, verdict: str,
                  clusters: list[str]) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = [r["name"] for r in ev["rows"]]
    accs = [r.get("linear", 0) * 100 for r in ev["rows"]]
    bars = ax.barh(names, accs, color=["tab:blue", "tab:gray", "tab:orange"][: len(names)])
    ax.bar_label(bars, fmt="%.1f%%")
    ax.axvline(100 / len(class_names_of(cfg)), color="k", ls=":", lw=1, label="chance")
    ax.set(xlabel=f"linear-probe accuracy on the {cfg.data.name} test images (%)", xlim=(0, 105))
    ax.legend(loc="lower right", fontsize=8)
    figures["probe"] = _save(fig, out / "probe.png")
    rows = "".join(
        f"<tr><td>{html.escape(r['name'])}</td><td>{r.get('linear', float('nan')) * 100:.1f}%</td>"
        f"<td>{r.get('knn', float('nan')) * 100:.1f}%</td></tr>" for r in ev["rows"])
    m = cfg.model
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>ijepa_viz demo</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}img{{max-width:100%}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px}}</style></head><body>
<h1>ijepa_viz demo: I-JEPA on the built-in {html.escape(cfg.data.name)} dataset</h1>
<p>ViT with width {m.embed_dim}, depth {m.depth}, patch {m.patch_size} on {m.img_size}&nbsp;px images;
predictor width {m.pred_embed_dim}, depth {m.pred_depth}. Trained {result.step} steps of batch
{cfg.data.batch_size} without labels. Time: training {times['train']:.0f}&nbsp;s, evaluation
{times['eval']:.0f}&nbsp;s, figures {times['figures']:.0f}&nbsp;s; total {times['total']:.0f}&nbsp;s.</p>
<h2>What the model sees</h2><img src="{figures['masks']}">
<h2>Training loss</h2><img src="{figures['loss']}">
<h2>Linear probe: learned features vs baselines</h2>
<p><b>{html.escape(verdict)}</b></p>
<table><tr><th>features</th><th>linear probe</th><th>kNN (k=20)</th></tr>{rows}</table>
<p>{ev['n_train']:,} training and {ev['n_test']:,} test images; the probe sees labels, the encoder never did.</p>
<img src="{figures['probe']}">
<h2>Features: trained against untrained</h2><img src="{figures['embedding']}">
<ul>{"".join(f"<li>{html.escape(s)}</li>" for s in clusters)}</ul>
</body></html>"""
    path = out / "report.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path


def class_names_of(cfg: Config) -> list[str]:
    from ijepa_viz.data import class_names

    return class_names(cfg.data)
