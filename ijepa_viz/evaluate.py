"""Evaluation: frozen features, collapse metrics, prediction metrics and the evaluation table.

The paper evaluates the *target* encoder, average-pooled over patches, with a linear probe (Assran et al., 2023,
Sec. 5). This module does the same on any `VisionTransformer` and any loader of (images, labels), and always
puts two baselines beside it, run through the same code: raw pixels and a randomly initialised encoder of the
same architecture. A self-supervised encoder that does not beat the random one has learned nothing useful.

Read top to bottom:

1. features: `extract_features` (any encoder, any loader), `features_for` (a model and its config's data),
   `raw_pixel_features`;
2. collapse metrics: `feature_std`, `rankme`, `collapse_metrics`;
3. prediction metrics: how well the predictor predicts the target patches, against predicting their mean;
4. `evaluate` (what `ijepa-viz eval` runs), `format_table` and `format_timings` (seconds per phase).

The probes themselves live in `ijepa_viz.probes`: `linear_probe` (logistic regression, C chosen on held-out
*training* images; solved in torch by preconditioned L-BFGS, scikit-learn kept as the reference backend) and
`knn_classifier` (DINO's weighted kNN); both are importable from here too.

    from ijepa_viz.evaluate import evaluate, format_table
    print(format_table(evaluate("runs/default/checkpoint.pt", limit_train=5000)))
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ijepa_viz.checkpoint import load_model
from ijepa_viz.config import Config
from ijepa_viz.data import UInt8Cache, augment_batch, build_loader, dataset_stats, load_uint8
from ijepa_viz.allocator import tune_cpu_allocator
from ijepa_viz.feature_cache import (FEATURE_CACHE_ENV, _cached_extract, _feature_key,  # noqa: F401
                                     _images_digest, default_feature_cache)
from ijepa_viz.masks import MaskCollator, Masks
from ijepa_viz.model import IJEPA, feature_std, rankme  # noqa: F401  (public here too; defined in model.py)
from ijepa_viz.probes import LINEAR_BACKENDS, _as_tensor, knn_classifier, linear_probe  # public here too
from ijepa_viz.train import resolve_device, resolve_precision

__all__ = [
    "extract_features", "features_for", "raw_pixel_features", "linear_probe", "knn_classifier", "feature_std",
    "rankme", "collapse_metrics", "prediction_metrics", "prediction_metrics_on", "evaluate", "format_table",
    "format_timings", "PROBES", "LINEAR_BACKENDS",
]

PROBES = ("linear", "knn")
RAW_PIXEL_MAX_SIZE = 32  # the raw-pixel baseline sees images of at most 32x32 (3,072 numbers), as CIFAR
PATCH_METRIC_IMAGES = 256  # patch-level collapse metrics use the patches of this many test images
EVAL_BATCH_TOKENS = 32768  # feature batches hold about this many patches (512 images of 64 patches) in bf16
EVAL_BATCH_TOKENS_FP32 = 8192  # and in fp32, where the cpu-tiny forward ran fastest at 128 images of 64
# patches on two AVX2 threads (benchmarks/README.md, "Evaluation time")


def _module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else resolve_device(device)


# =============================================================================================
# 1. Features
# =============================================================================================

def _encode(encoder: nn.Module, images: torch.Tensor, pool: str, n_last: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, D * n_last) pooled, or (B, N, D * n_last) patch features."""
    if n_last == 1:
        layers = [encoder(images)]  # [(B, N, D)]
    else:
        layers = encoder.intermediate_layers(images, n_last)  # n_last x (B, N, D), each through the final norm
    x = torch.cat(layers, dim=-1)  # (B, N, D * n_last)
    if x.ndim == 2:  # an encoder that pools itself (e.g. a timm model with global_pool)
        if pool == "none":
            raise ValueError("pool='none' needs an encoder that returns patch features (B, N, D); this one "
                             f"returns pooled features of shape {tuple(x.shape)}")
        return x
    return x.mean(dim=1) if pool == "avg" else x


@torch.no_grad()
def extract_features(encoder: nn.Module, loader: Iterable, *, pool: str = "avg", n_last: int = 1,
                     device: str | torch.device = "cpu", progress: bool = True,
                     limit: Optional[int] = None, precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of every image a loader yields.

    Args:
        encoder: a `VisionTransformer` (or any module mapping (B, 3, H, W) to (B, N, D)). Pass
            `model.target_network` for the paper's protocol (the target encoder), `model.encoder` for the
            context encoder. It runs in eval mode on `device` and is put back in its mode and on its device.
        loader: yields (images float (B, 3, H, W), labels (B,)), e.g. `data.build_loader(..., train=False)`.
        pool: 'avg' averages over the patches (the paper); 'none' keeps every patch.
        n_last: concatenate the outputs of the last n blocks (each through the final norm), a common probing
            variant (DINO's ViT-S linear probe uses the last 4); 1 uses the encoder's output (the paper).
        device: where the encoder runs ('auto' picks cuda, then mps, then cpu).
        progress: show a tqdm progress bar.
        limit: stop after this many images (the first ones the loader yields).
        precision: 'auto' runs under bf16 autocast where the training loop would (CUDA, CPUs with native
            bf16: about 3x faster there), 'fp32' or 'bf16' force it. Features are returned in float32.

    Returns:
        features float32 on the CPU, (N, D * n_last) for pool='avg' or (N, P, D * n_last) for pool='none',
        and labels int64 (N,).
    """
    if pool not in ("avg", "none"):
        raise ValueError(f"pool={pool!r} must be 'avg' (mean over patches) or 'none' (patch features)")
    depth = len(getattr(encoder, "blocks", ())) or None
    if n_last < 1 or (n_last > 1 and not hasattr(encoder, "intermediate_layers")):
        raise ValueError(f"n_last={n_last} must be >= 1, and > 1 needs an encoder with intermediate_layers()")
    if depth is not None and n_last > depth:
        raise ValueError(f"n_last={n_last} is more than the encoder's {depth} blocks")
    return _extract(encoder, loader, pool=pool, n_last=n_last, device=device, progress=progress, limit=limit,
                    precision=precision)[:2]


@torch.no_grad()
def _extract(encoder: nn.Module, loader: Iterable, *, pool: str = "avg", n_last: int = 1,
             device: str | torch.device = "cpu", progress: bool = True, limit: Optional[int] = None,
             precision: str = "auto", keep_patches: Optional[np.ndarray] = None
             ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """`extract_features`, plus the patch features (P, N, D) of the images at positions `keep_patches` (sorted,
    in the loader's order) from the same forward pass (pool='avg' only; None when not asked for)."""
    device = _device(device)
    amp = resolve_precision(precision, device)
    home, was_training = _module_device(encoder), encoder.training
    encoder.eval().to(device)
    feats, labels, kept, seen = [], [], [], 0
    keep = None if keep_patches is None or pool != "avg" else torch.as_tensor(np.asarray(keep_patches))
    total = len(loader) if hasattr(loader, "__len__") else None
    try:
        for images, y in tqdm(loader, total=total, desc="features", unit="batch", disable=not progress,
                              leave=False, dynamic_ncols=True):
            if limit is not None:
                images, y = images[: limit - seen], y[: limit - seen]
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                x = _encode(encoder, images.to(device, non_blocking=True), "none" if keep is not None else pool,
                            n_last)
                if keep is not None and x.ndim == 3:  # (B, N, D): keep some images' patches, then pool
                    rows = keep[(keep >= seen) & (keep < seen + len(images))] - seen
                    if len(rows):
                        kept.append(x[rows.to(device)].float().cpu())
                    x = x.mean(dim=1)
            feats.append(x.float().cpu())
            labels.append(_as_tensor(y).long().cpu())
            seen += len(images)
            if limit is not None and seen >= limit:
                break
    finally:
        encoder.train(was_training).to(home)
    if not feats:
        raise ValueError("the loader yielded no images; check the dataset split and data.batch_size")
    return torch.cat(feats), torch.cat(labels), torch.cat(kept) if kept else None


class _EvalBatches:
    """Eval batches of uint8 images held in memory: yields (normalised float (B, 3, S, S), labels int64 (B,)).

    The same resize and normalisation as the eval loader of `data.build_loader(..., train=False)`.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, img_size: int,
                 stats: tuple[Sequence[float], Sequence[float]]):
        self.images, self.labels, self.batch_size, self.img_size = images, labels, batch_size, img_size
        self.mean, self.std = stats

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.images), self.batch_size):
            images = augment_batch(self.images[i: i + self.batch_size], self.img_size, self.mean, self.std,
                                   train=False)  # (B, 3, S, S), normalised
            yield images, self.labels[i: i + self.batch_size]


def _eval_loader(cfg: Config, split: str, limit: Optional[int]) -> Iterable:
    """The eval loader of cfg.data (in order, no augmentation). With a limit, `limit` images spread evenly over
    the split (`data.load_uint8`), so that class-sorted folders keep every class."""
    if limit is None:
        return build_loader(cfg.data, split, cfg.model.img_size, train=False, seed=0)
    images, labels = load_uint8(cfg.data, split, cfg.model.img_size, limit=limit)
    return _EvalBatches(images, labels, cfg.data.batch_size, cfg.model.img_size, dataset_stats(cfg.data.name))


def features_for(model: IJEPA, cfg: Config, split: str, *, which: str = "target", n_last: int = 1,
                 limit: Optional[int] = None, device: str | torch.device = "cpu",
                 progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pooled features of a model on `split` ('train' or 'test') of cfg.data.

    which: 'target' (the target encoder, the paper's protocol) or 'context' (the context encoder).
    limit: at most this many images, spread evenly over the split. Returns (N, D * n_last) float32, (N,) int64.
    """
    if which not in ("target", "context"):
        raise ValueError(f"which={which!r} must be 'target' (the target encoder) or 'context' (the context encoder)")
    encoder = model.target_network if which == "target" else model.encoder
    return extract_features(encoder, _eval_loader(cfg, split, limit), n_last=n_last, device=device,
                            progress=progress)


def raw_pixel_features(images: torch.Tensor, size: Optional[int] = None) -> torch.Tensor:
    """The raw-pixel baseline: images uint8 (N, 3, H, W) (scaled to [0, 1]) or float -> float32 (N, 3*H*W).

    size: first resize (bilinear, antialiased) to size x size, to keep the probe small on large images.
    The linear probe standardises the features; kNN compares them by cosine similarity.
    """
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.flatten(1)  # (N, 3 * H * W)


# =============================================================================================
# 2. Collapse metrics
# =============================================================================================

def collapse_metrics(pooled: torch.Tensor, patches: Optional[torch.Tensor] = None) -> dict:
    """Collapse metrics of pooled features (N, D) and, when given, of patch features (N, P, D) (all N*P patch
    vectors together). Keys: pooled_std, pooled_rankme, patch_std, patch_rankme (None without patches)."""
    out = {"pooled_std": feature_std(pooled), "pooled_rankme": rankme(pooled), "patch_std": None,
           "patch_rankme": None}
    if patches is not None:
        flat = patches.reshape(-1, patches.shape[-1])  # (N * P, D)
        out.update(patch_std=feature_std(flat), patch_rankme=rankme(flat))
    return out


# =============================================================================================
# 3. Prediction metrics
# =============================================================================================

@torch.no_grad()
def _predicted_and_target(model: IJEPA, images: torch.Tensor, masks: Masks) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and target features of every target patch: two float32 (B * M * K, D) tensors on the CPU."""
    device = _module_device(model)
    was_training = model.training
    model.eval()
    try:
        images, masks = images.to(device), masks.to(device)
        target = model.forward_target(images, masks.targets)  # (B, M, K, D), layer-normed
        z = model.forward_context(images, masks.context)  # (B, Nc, D)
        pred = model.predict(z, masks.context, masks.targets)  # (B, M, K, D)
    finally:
        model.train(was_training)
    D = target.shape[-1]
    return pred.float().reshape(-1, D).cpu(), target.float().reshape(-1, D).cpu()


def _prediction_scores(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """Mean per-patch cosine and L2 error of pred vs target (P, D), and of the mean target vs target."""
    mean = target.mean(dim=0, keepdim=True).expand_as(target)  # (P, D): the baseline predicts the mean
    return {
        "cosine": float(F.cosine_similarity(pred, target, dim=1).mean()),
        "l2": float((pred - target).norm(dim=1).mean()),
        "baseline_cosine": float(F.cosine_similarity(mean, target, dim=1).mean()),
        "baseline_l2": float((mean - target).norm(dim=1).mean()),
    }


def prediction_metrics(model: IJEPA, images: torch.Tensor, masks: Masks) -> dict:
    """How well the predictor predicts the target patches of a batch, against a baseline.

    images (B, 3, H, W) normalised; masks from `MaskCollator.sample(B, step)`. For every target patch:
    the cosine similarity and L2 distance between the prediction s_hat_y and the target s_y (the layer-normed
    target-encoder feature), averaged. The baseline predicts, for every patch, the mean target feature over
    all target patches of the batch; a predictor that does not beat it has not learned where things are.

    Returns {'cosine', 'l2', 'baseline_cosine', 'baseline_l2'} (floats).
    """
    return _prediction_scores(*_predicted_and_target(model, images, masks))


def prediction_metrics_on(model: IJEPA, cfg: Config, split: str = "test", n_images: int = 256,
                          seed: int = 0) -> dict:
    """`prediction_metrics` on `n_images` images of `split` of cfg.data (picked as `data.load_uint8` does),
    with masks from cfg.mask, seeded by `seed`.

    The images go through in batches of cfg.data.batch_size, each with its own masks (batch i uses step i);
    the scores and the mean-target baseline are computed over all target patches of all images.
    """
    images, _ = load_uint8(cfg.data, split, cfg.model.img_size, limit=n_images)
    batches = _EvalBatches(images, torch.zeros(len(images), dtype=torch.long), cfg.data.batch_size,
                           cfg.model.img_size, dataset_stats(cfg.data.name))
    collator = MaskCollator(cfg.mask, cfg.grid_size, seed=seed)
    preds, targets = [], []
    for step, (x, _) in enumerate(batches):
        p, t = _predicted_and_target(model, x, collator.sample(len(x), step))
        preds.append(p)
        targets.append(t)
    return _prediction_scores(torch.cat(preds), torch.cat(targets))


# =============================================================================================
# 4. The evaluation table
# =============================================================================================

def _run_probes(probes: Sequence[str], train: tuple, test: tuple, seed: int, num_classes: int, name: str,
                timings: dict, linear_backend: str = "torch") -> dict:
    row = {}
    if "linear" in probes:
        start = time.perf_counter()
        res = linear_probe(*train, *test, seed=seed, backend=linear_backend)
        row.update(linear=res["accuracy"], linear_C=res["C"])
        timings[f"linear: {name}"] = time.perf_counter() - start
    if "knn" in probes:
        start = time.perf_counter()
        row["knn"] = knn_classifier(*train, *test, num_classes=num_classes)
        timings[f"knn: {name}"] = time.perf_counter() - start
    return row


def _random_init(cfg: Config, seed: int) -> IJEPA:
    """A freshly initialised IJEPA of cfg.model, seeded, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return IJEPA(cfg.model).eval()


def _resolve(checkpoint, cfg: Optional[Config], model: Optional[IJEPA]) -> tuple[IJEPA, Config]:
    if model is None:
        if checkpoint is None:
            raise ValueError("evaluate needs a checkpoint path, or a model together with its cfg")
        model, ckpt_cfg = load_model(checkpoint)
        cfg = cfg or ckpt_cfg
    if cfg is None:
        raise ValueError("evaluate(model=...) needs cfg=... as well: its data section says what to evaluate on")
    return model, cfg


def _split_images(cfg: Config, split: str, limit: Optional[int]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """A split decoded once into memory at the model's resolution (uint8 (N, 3, S, S), labels), as the eval
    loader sees it; None for a large dataset without a limit (streamed by `_eval_loader` instead).

    Without a limit it is the split the training loader decoded (`UInt8Cache`, memoised per process, so
    evaluating right after training, as the demo does, decodes nothing new), resized if its own resolution
    differs from the model's."""
    data = replace(cfg.data, num_workers=max(cfg.data.num_workers, torch.get_num_threads()))  # decoding threads
    size = cfg.model.img_size
    if limit is not None:
        return load_uint8(data, split, size, limit=limit)
    try:
        from ijepa_viz.data.loaders import _fits_in_memory
        small = cfg.data.in_memory and _fits_in_memory(cfg.data, split)
    except ImportError:
        small = cfg.data.in_memory and cfg.data.name != "imagefolder"
    if not small:
        return None
    cache = UInt8Cache.build(data, split, size)  # the key `build_loader` uses
    images = cache.images
    if tuple(images.shape[-2:]) != (size, size):
        images = _resize(images, size)
    return images, cache.labels


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> uint8 (N, 3, size, size), as `data.load_uint8` resizes (bilinear, antialiased,
    rounded)."""
    return torch.cat([F.interpolate(images[i:i + 4096].float(), size=(size, size), mode="bilinear", antialias=True,
                                    align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
                      for i in range(0, len(images), 4096)])


def _pixels_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> the raw-pixel baseline's features, uint8 (N, 3 * size * size)."""
    if tuple(images.shape[-2:]) != (size, size):
        images = _resize(images, size)
    return images.flatten(1)


def evaluate(checkpoint: Optional[str | Path] = None, *, cfg: Optional[Config] = None,
             model: Optional[IJEPA] = None, probes: Sequence[str] = PROBES, limit_train: Optional[int] = None,
             limit_test: Optional[int] = None, device: str | torch.device = "cpu", seed: int = 0,
             progress: bool = True, linear_backend: str = "torch",
             feature_cache: Optional[str | Path] = None) -> dict:
    """Probe a model's average-pooled target encoder beside two baselines run the same way.

    Args:
        checkpoint: a training checkpoint (`load_model`); or pass `model` (and `cfg`) directly.
        cfg: the config whose data section is evaluated on (default: the checkpoint's).
        probes: any of 'linear' (`linear_probe`) and 'knn' (`knn_classifier`).
        limit_train, limit_test: at most this many images of each split, spread evenly over it.
        device: where the encoders run; seed: seeds the random-init encoder and the probe's held-out split.
        linear_backend: `linear_probe`'s backend, 'torch' (default) or 'sklearn' (the slower reference).
        feature_cache: a folder where each encoder's features of each split are kept (None: no cache; the CLI
            uses `default_feature_cache()`). The key is a digest of the encoder's weights and the exact images
            (`_feature_key`), so a result never comes from other weights or images. The untrained encoder is
            the same for every checkpoint of one architecture and seed, so after a first evaluation only the
            trained encoder runs again. Extracting features is most of an evaluation's time (on 2 CPU cores,
            CIFAR-10's 60,000 images through two encoders); a repeated evaluation runs only the probes.

    Rows, in order:
        * 'ijepa (target encoder)': `model.target_network`;
        * 'random init': `IJEPA(cfg.model)` after `torch.manual_seed(seed)`, its target encoder. When `seed`
          equals the run's train.seed these are exactly the weights training started from, so the two rows
          show what training added;
        * 'raw pixels': the same images as uint8 pixels, resized to at most 32 x 32 (RAW_PIXEL_MAX_SIZE) so
          that the probe stays fast on large images (the probes use them as exact integers: `raw_pixel_features`
          scaled by 255, which changes neither the standardised linear probe nor cosine kNN).
    Each row has the probe accuracies (fractions in [0, 1]) and 'linear_C'; the encoder rows also have the
    collapse metrics of the test features: 'pooled_std', 'rankme', and 'patch_std', 'patch_rankme' over the
    patches of 256 test images spread evenly over the test set (None for raw pixels).

    Each split is decoded once (small datasets, or any with a limit) and each encoder sees each image once,
    in batches of about EVAL_BATCH_TOKENS patches (EVAL_BATCH_TOKENS_FP32 in fp32): the pooled features and
    the 256 images' patches come from the same forward pass.

    Returns: {'rows': [...], 'checkpoint', 'data', 'n_train', 'n_test', 'probes', 'seed', 'raw_pixel_size',
    'seconds', 'timings'}: plain Python values, ready for `json.dumps`. 'timings' maps each phase to its
    seconds, in the order they ran: 'load checkpoint', 'images' (decoding both splits), then per row
    'features: <row>', 'collapse metrics: <row>', 'linear: <row>', 'knn: <row>', and 'total'
    (`format_timings` prints them).
    """
    start = time.perf_counter()
    probes = tuple(probes)
    bad = [p for p in probes if p not in PROBES]
    if bad or not probes:
        raise ValueError(f"probes={probes!r}: choose one or more of {', '.join(PROBES)}")
    if linear_backend not in LINEAR_BACKENDS:
        raise ValueError(f"linear_backend={linear_backend!r} must be one of {', '.join(LINEAR_BACKENDS)}")
    timings: dict[str, float] = {}
    loading = model is None
    model, cfg = _resolve(checkpoint, cfg, model)
    if loading:
        timings["load checkpoint"] = time.perf_counter() - start
    device = _device(device)

    tic = time.perf_counter()
    images = {"train": _split_images(cfg, "train", limit_train), "test": _split_images(cfg, "test", limit_test)}
    timings["images"] = time.perf_counter() - tic
    amp = resolve_precision("auto", device)
    if device.type == "cpu":
        tune_cpu_allocator()
    tokens = EVAL_BATCH_TOKENS if amp is not None else EVAL_BATCH_TOKENS_FP32
    batch = max(cfg.data.batch_size, tokens // cfg.grid_size ** 2)
    stats = dataset_stats(cfg.data.name)

    def loader(split: str, limit: Optional[int]) -> Iterable:
        if images[split] is None:
            return build_loader(replace(cfg.data, batch_size=batch), split, cfg.model.img_size, train=False, seed=0)
        return _EvalBatches(*images[split], batch, cfg.model.img_size, stats)

    n_test = len(images["test"][0]) if images["test"] is not None else None
    n_patch = min(PATCH_METRIC_IMAGES, n_test or limit_test or PATCH_METRIC_IMAGES)
    keep = None if n_test is None else np.unique(np.linspace(0, n_test - 1, n_patch).round().astype(np.int64))

    cache_dir = None if feature_cache is None else Path(feature_cache).expanduser()
    digests: dict[str, str] = {}

    def key(encoder: nn.Module, split: str, kept) -> Optional[str]:
        if cache_dir is None or images[split] is None:  # a streamed split is not cached
            return None
        if split not in digests:
            digests[split] = _images_digest(*images[split])
        extra = (split, cfg.model.img_size, tuple(map(tuple, stats)), batch, str(amp), device.type,
                 None if kept is None else kept.tolist())
        return _feature_key(encoder, digests[split], extra)

    rows, n_train, cached = [], None, []
    encoders = [("ijepa (target encoder)", model.target_network),
                ("random init", _random_init(cfg, seed).target_network)]
    for name, encoder in encoders:
        tic = time.perf_counter()
        kw = dict(device=device, progress=progress)
        (train_x, train_y, _), hit_train = _cached_extract(
            cache_dir, key(encoder, "train", None), lambda: _extract(encoder, loader("train", limit_train), **kw))
        (test_x, test_y, patches), hit_test = _cached_extract(
            cache_dir, key(encoder, "test", keep),
            lambda: _extract(encoder, loader("test", limit_test), keep_patches=keep, **kw))
        if patches is None:  # a streamed test set: the patches of n_patch images spread over it, separately
            patches, _ = extract_features(encoder, _eval_loader(cfg, "test", n_patch), pool="none", **kw)
        if hit_train and hit_test:
            cached.append(name)
        timings[f"features: {name}" + (" (cached)" if hit_train and hit_test else "")] = time.perf_counter() - tic
        n_train, n_test = len(train_y), len(test_y)
        num_classes = int(max(train_y.max(), test_y.max())) + 1

        tic = time.perf_counter()
        collapse = collapse_metrics(test_x, patches)
        timings[f"collapse metrics: {name}"] = time.perf_counter() - tic
        rows.append({"name": name, **_run_probes(probes, (train_x, train_y), (test_x, test_y), seed, num_classes,
                                                 name, timings, linear_backend),
                     "pooled_std": collapse["pooled_std"], "rankme": collapse["pooled_rankme"],
                     "patch_std": collapse["patch_std"], "patch_rankme": collapse["patch_rankme"]})

    size = min(cfg.model.img_size, RAW_PIXEL_MAX_SIZE)
    tic = time.perf_counter()
    pixels = {}
    for split, limit in (("train", limit_train), ("test", limit_test)):
        split_images, labels = images[split] or load_uint8(cfg.data, split, size, limit=limit)
        pixels[split] = (_pixels_uint8(split_images, size), labels.long())  # (N, 3 * size * size) uint8
    timings["features: raw pixels"] = time.perf_counter() - tic
    num_classes = int(max(pixels["train"][1].max(), pixels["test"][1].max())) + 1
    rows.append({"name": "raw pixels", **_run_probes(probes, pixels["train"], pixels["test"], seed, num_classes,
                                                     "raw pixels", timings, linear_backend),
                 "pooled_std": None, "rankme": None, "patch_std": None, "patch_rankme": None})

    seconds = time.perf_counter() - start
    timings["total"] = seconds
    return {"rows": rows, "checkpoint": None if checkpoint is None else str(checkpoint), "data": cfg.data.name,
            "n_train": n_train, "n_test": n_test, "probes": list(probes), "seed": seed, "raw_pixel_size": size,
            "seconds": seconds, "timings": timings,
            "feature_cache": None if cache_dir is None else {"dir": str(cache_dir), "cached": cached}}


def format_timings(result: dict) -> str:
    """An `evaluate` result's 'timings' as lines of 'phase  seconds', with each phase's share of the total."""
    timings = result.get("timings") or {}
    if not timings:
        return ""
    total = timings.get("total") or sum(timings.values())
    width = max(len(k) for k in timings)
    lines = [f"time per phase ({torch.get_num_threads()} threads):"]
    for key, sec in timings.items():
        share = "" if key == "total" else f"  {100 * sec / total:5.1f}%" if total else ""
        lines.append(f"  {key:<{width}}  {sec:8.2f} s{share}")
    return "\n".join(lines)


def format_table(result: dict) -> str:
    """The rows of an `evaluate` result as a plain-text table, accuracies in percent."""
    cols = [("linear", "linear", "pct"), ("knn", "kNN (k=20)", "pct"), ("pooled_std", "feature std", "std"),
            ("rankme", "RankMe", "rank")]
    rows = result["rows"]
    cols = [c for c in cols if any(c[0] in r for r in rows)]

    def cell(value, kind: str) -> str:
        if value is None:
            return "-"
        return {"pct": f"{100 * value:.1f}%", "std": f"{value:.4f}", "rank": f"{value:.1f}"}[kind]

    name_w = max(len("encoder"), *(len(r["name"]) for r in rows))
    widths = [max(len(title), 8) for _, title, _ in cols]
    lines = [f"{result.get('data', '?')}: {result.get('n_train', '?')} train / {result.get('n_test', '?')} test "
             f"images" + (f", checkpoint {result['checkpoint']}" if result.get("checkpoint") else "")]
    header = "  ".join([f"{'encoder':<{name_w}}"] + [f"{t:>{w}}" for (_, t, _), w in zip(cols, widths)])
    lines += [header, "-" * len(header)]
    for r in rows:
        cells = [f"{cell(r.get(key), kind):>{w}}" for (key, _, kind), w in zip(cols, widths)]
        lines.append("  ".join([f"{r['name']:<{name_w}}"] + cells))
    return "\n".join(lines)
