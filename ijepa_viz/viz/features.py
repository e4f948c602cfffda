"""Compute layer of the feature notebooks (04 predictions, 05 features, 07 similarity): no drawing here.

Read top to bottom:

1. Inputs: `as_input` turns uint8 images into the normalised floats the encoder expects, `to_uint8` back;
   `resize` changes the resolution of uint8 images; `new_images` renders built-in images that are in no split
   of the dataset, and `drawn_picture` draws a picture unlike any of them (queries from outside the data).
2. Embeddings: `embed` runs the target (or context) encoder over a set of images, average-pooled (what the
   paper evaluates) or per patch. Cached: the same model weights on the same images are encoded once.
   Two numbers describe a set of features before any picture: `position_share` (how much of the patch
   features' variance is the patch's position) and `common_share` / `mean_cosine` (how much of every pooled
   feature is one vector they all share, which pushes every cosine towards 1).
3. Projections for plotting: `pca_rgb` (3 principal components of patch features as colours; with
   `remove_position` first, the content rather than the position), `pca_2d` and `tsne_2d` (cached) of
   pooled features.
4. Predictions: `prediction_maps` runs the I-JEPA stages on one image and compares the predictor's output
   with the target encoder's, patch by patch, on the grid; `prediction_colours` paints both in one PCA.
5. Retrieval: `patch_bank` + `nearest_patches` look up the real image patches whose target embeddings lie
   closest to a prediction (a cheap stand-in for the paper's generative decoder, which was not released), and
   `retrieval_pixel_gaps` measures whether those patches look like the hidden one at all;
   `similarity_search` ranks a gallery by cosine similarity (optionally centred on the gallery's mean).

Tensors that come from the model (`embed`, `prediction_maps`, `patch_bank`) are CPU float32 torch tensors;
whatever goes to scikit-learn or matplotlib (projections, maps, rankings) is numpy.

It stays one file because the five sections are the steps of one pipeline (inputs, embeddings, projections,
predictions, retrieval) built on one content-keyed cache (`_Cache`, `_digest_module`, `_digest_array`) that
`embed`, `tsne_2d` and `patch_bank` share; notebooks 04, 05 and 07 import it as their one compute layer.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ijepa_viz.config import Config
from ijepa_viz.masks import MaskCollator, Masks
from ijepa_viz.model import IJEPA, VisionTransformer, gather_tokens

__all__ = [
    "as_input", "to_uint8", "resize", "new_images", "drawn_picture", "NEW_IMAGES_SEED",
    "encoder_of", "embed", "clear_cache", "position_mean", "position_share", "common_share", "mean_cosine",
    "pca_rgb", "remove_position", "pca_2d", "tsne_2d", "to_grid", "PredictionMaps", "prediction_maps",
    "prediction_colours", "PatchBank", "patch_bank", "patch_pixels", "Neighbours", "nearest_patches",
    "retrieval_pixel_gaps", "similarity_search",
]


# -- a small cache keyed on content ----------------------------------------------------------------

class _Cache:
    """A bounded LRU dict. Keys are content digests, so retraining a model or editing images misses."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self.data: OrderedDict = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key, compute: Callable):
        if key in self.data:
            self.hits += 1
            self.data.move_to_end(key)
            return self.data[key]
        self.misses += 1
        value = compute()
        self.data[key] = value
        while len(self.data) > self.maxsize:
            self.data.popitem(last=False)
        return value

    def clear(self) -> None:
        self.data.clear()
        self.hits = self.misses = 0


_EMBED_CACHE = _Cache(maxsize=8)
_TSNE_CACHE = _Cache(maxsize=16)


def clear_cache() -> None:
    """Forget every cached embedding and t-SNE layout."""
    _EMBED_CACHE.clear()
    _TSNE_CACHE.clear()


def _digest_array(x) -> str:
    """Digest of an array's shape, dtype and bytes."""
    a = x.detach().cpu().contiguous().numpy() if torch.is_tensor(x) else np.ascontiguousarray(x)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


@torch.no_grad()
def _digest_module(module: nn.Module) -> tuple:
    """Cheap fingerprint of a module's weights: class, parameter shapes and two weighted sums per tensor."""
    tensors = list(module.state_dict().values())
    sums = torch.stack([torch.stack([t.double().sum(), (t.double().flatten() * torch.linspace(
        -1, 1, t.numel(), dtype=torch.float64, device=t.device)).sum()]) for t in tensors if t.numel()])
    return (type(module).__name__, tuple(tuple(t.shape) for t in tensors), _digest_array(sums.cpu()))


# -- 1. inputs ---------------------------------------------------------------------------------------

def _stats(cfg) -> tuple[Sequence[float], Sequence[float]]:
    from ijepa_viz.data import dataset_stats

    name = cfg if isinstance(cfg, str) else cfg.data.name
    return dataset_stats(name)


def as_input(images: torch.Tensor, cfg: Config | str | None) -> torch.Tensor:
    """Images as the encoder expects them: float (B, 3, H, W), normalised with the dataset's mean and std.

    uint8 images (0-255, as `load_uint8` returns them) are scaled to [0, 1] and normalised with the statistics
    of `cfg.data.name` (or of the dataset named by `cfg`); float images are taken as already normalised (as a
    data loader yields them) and returned as float32. One image (3, H, W) becomes a batch of one.
    """
    images = torch.as_tensor(images)
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        return images.float()
    if cfg is None:
        raise ValueError("uint8 images need the config (or dataset name) whose mean and std normalise them; "
                         "pass cfg=...")
    mean, std = _stats(cfg)
    x = images.float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def to_uint8(images: torch.Tensor, cfg: Config | str | None = None) -> torch.Tensor:
    """The inverse of `as_input`: normalised float images (B, 3, H, W) -> uint8; uint8 pass through."""
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        return images
    if cfg is None:
        raise ValueError("float images need the config (or dataset name) whose mean and std undo their "
                         "normalisation; pass cfg=...")
    mean, std = _stats(cfg)
    shape = (1,) * (images.ndim - 3) + (3, 1, 1)
    x = images.float() * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 images (N, 3, H, W) or one (3, H, W) to size x size (bilinear, antialiased), still uint8:
    e.g. to show an outside image to a model trained at another resolution."""
    images = torch.as_tensor(images)
    one = images.ndim == 3
    x = images[None] if one else images
    x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8)
    return x[0] if one else x


NEW_IMAGES_SEED = 2718  # the datasets always render with seed 0: images of this seed are in no split of them


def new_images(dataset: str, n: int, img_size: int, seed: int = NEW_IMAGES_SEED, start: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` new images of a built-in dataset ('dots' or 'shapes'): (uint8 (n, 3, S, S), labels (n,)).

    Drawn by the dataset's own renderer (`data.render_dots`, `data.render_shapes`: the same kind of content
    and the same classes), but with a seed the dataset never uses: none of them is a training, test or gallery
    image.
    """
    from ijepa_viz.data import BUILTIN

    if dataset not in BUILTIN:
        raise ValueError(f"dataset={dataset!r}: new images can be drawn for the built-in {', '.join(BUILTIN)}")
    if seed == 0:
        raise ValueError("seed 0 renders the dataset's own images; pick another seed for new ones")
    return BUILTIN[dataset][1](np.arange(start, start + n), img_size, seed, "test")


def drawn_picture(img_size: int) -> torch.Tensor:
    """A small picture drawn with a few PIL strokes, unlike any built-in image: a house (a square and a
    triangular roof), a round sun and a strip of grass on a sky-blue background. uint8 (3, S, S).

    It belongs to none of the dataset's classes: a query from outside the data, with no right answer.
    """
    from PIL import Image, ImageDraw

    big = 8 * img_size  # drawn large, then shrunk (antialiased)
    u = big / 100  # drawing units: the picture is 100 x 100
    img = Image.new("RGB", (big, big), (150, 200, 240))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 80 * u, big, big], fill=(70, 160, 60))  # grass
    d.ellipse([68 * u, 8 * u, 90 * u, 30 * u], fill=(250, 210, 40))  # sun
    d.rectangle([22 * u, 50 * u, 58 * u, 84 * u], fill=(200, 70, 50))  # walls
    d.polygon([(16 * u, 52 * u), (40 * u, 28 * u), (64 * u, 52 * u)], fill=(110, 60, 40))  # roof
    d.rectangle([35 * u, 64 * u, 45 * u, 84 * u], fill=(60, 40, 30))  # door
    img = img.resize((img_size, img_size), Image.LANCZOS)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


# -- 2. embeddings -----------------------------------------------------------------------------------

def encoder_of(model: IJEPA | VisionTransformer, which: str = "target") -> VisionTransformer:
    """The encoder to embed with: 'target' (the EMA target encoder, which the paper evaluates) or 'context'."""
    if which not in ("target", "context"):
        raise ValueError(f"which={which!r} must be 'target' or 'context'")
    if isinstance(model, IJEPA):
        return model.target_network if which == "target" else model.encoder
    if isinstance(model, nn.Module):
        return model  # already an encoder (e.g. a VisionTransformer)
    raise TypeError(f"expected an IJEPA model or an encoder module, got {type(model).__name__}")


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def _embed(encoder: nn.Module, images: torch.Tensor, cfg, pool: str, normalize: bool, batch_size: int
           ) -> torch.Tensor:
    device, was_training = _device(encoder), encoder.training
    encoder.eval()
    out = []
    try:
        for i in range(0, images.shape[0], batch_size):
            x = as_input(images[i: i + batch_size], cfg).to(device)
            h = encoder(x)  # (b, P, D)
            if normalize:
                h = F.layer_norm(h.float(), h.shape[-1:])  # the targets' parameter-free LayerNorm
            out.append((h.mean(1) if pool == "avg" else h).float().cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(out)


def embed(model: IJEPA | VisionTransformer, images: torch.Tensor, cfg: Config | str | None = None,
          which: str = "target", pool: str = "avg", batch_size: int = 256, normalize: bool = False,
          cache: bool = True) -> torch.Tensor:
    """Encode images with one of the model's encoders.

    Args:
        model: an `IJEPA` (or a bare encoder, in which case `which` is ignored).
        images: uint8 (N, 3, H, W) (normalised with `cfg`'s dataset statistics) or normalised float.
        which: 'target' (EMA target encoder: what the paper evaluates) or 'context'.
        pool: 'avg' averages over patches (the paper's evaluation features); 'none' keeps every patch.
        normalize: apply the targets' parameter-free LayerNorm over features, i.e. return the space the
            predictor predicts into (`forward_target` does the same).
        cache: reuse the result for the same weights and images (keyed on their content).

    Returns:
        float32 CPU tensor (N, D) for pool='avg', (N, P, D) for pool='none', P patches in raster order.
    """
    if pool not in ("avg", "none"):
        raise ValueError(f"pool={pool!r} must be 'avg' or 'none'")
    images = torch.as_tensor(images)
    if images.ndim == 3:
        images = images.unsqueeze(0)
    encoder = encoder_of(model, which)
    compute = lambda: _embed(encoder, images, cfg, pool, normalize, batch_size)  # noqa: E731
    if not cache:
        return compute()
    stats = tuple(_stats(cfg)) if images.dtype == torch.uint8 and cfg is not None else None
    key = ("embed", _digest_module(encoder), _digest_array(images), stats, pool, normalize)
    return _EMBED_CACHE.get(key, compute)


def position_mean(model: IJEPA, images: torch.Tensor, cfg: Config | str | None = None) -> torch.Tensor:
    """Each patch position's mean target feature over `images`, in the space the predictor predicts into
    (LayerNorm-ed target-encoder features): float32 (P, D). Subtract it to see content, not position."""
    return embed(model, images, cfg, pool="none", normalize=True).mean(0)


def position_share(patch_feats) -> float:
    """How much of the variance of patch features (N, P, D) is the patch's position: the variance of the
    per-position means over all patch features' variance, in [0, 1].

    1 means every image gives the same feature at a position (the features are a map of coordinates);
    0 means the position says nothing and all variation is the image's content.
    """
    x = torch.as_tensor(patch_feats).float()
    if x.ndim != 3 or x.shape[0] < 2:
        raise ValueError(f"position_share needs (N, P, D) patch features of N >= 2 images, got {tuple(x.shape)}")
    flat = x.reshape(-1, x.shape[-1])
    total = ((flat - flat.mean(0)) ** 2).sum(-1).mean()
    pos = x.mean(0)  # (P, D)
    between = ((pos - flat.mean(0)) ** 2).sum(-1).mean()
    return float(between / total.clamp_min(1e-12))


def image_share(patch_feats) -> float:
    """How much of the variance of patch features (N, P, D) is the image's own mean: the variance of the
    per-image means over all patch features' variance, in [0, 1].

    1 means every patch of an image carries the same feature (a code for the whole image, nothing local);
    0 means the patches of one image differ as much as patches of different images. With `position_share`,
    it splits the variance into what the position sets, what the image sets, and what is left to each patch.
    """
    x = torch.as_tensor(patch_feats).float()
    if x.ndim != 3 or x.shape[0] < 2:
        raise ValueError(f"image_share needs (N, P, D) patch features of N >= 2 images, got {tuple(x.shape)}")
    flat = x.reshape(-1, x.shape[-1])
    total = ((flat - flat.mean(0)) ** 2).sum(-1).mean()
    between = ((x.mean(1) - flat.mean(0)) ** 2).sum(-1).mean()  # (N, D) image means
    return float(between / total.clamp_min(1e-12))


def common_share(feats) -> float:
    """The part of pooled features (N, D) that all images share: |mean|^2 / mean(|f|^2), in [0, 1].

    Near 1, every feature is mostly the same vector (the mean) plus a small image-specific part, so any two
    images have a cosine near 1 and raw cosine scores all look alike; centring (subtracting the mean) removes
    the shared part.
    """
    x = torch.as_tensor(feats).float().reshape(-1, torch.as_tensor(feats).shape[-1])
    return float(x.mean(0).pow(2).sum() / x.pow(2).sum(-1).mean().clamp_min(1e-12))


def mean_cosine(feats, centre: bool = False) -> float:
    """The average cosine similarity between two different images' features (N, D) (exact, over all pairs),
    after subtracting the mean feature when `centre` is True."""
    x = torch.as_tensor(feats).float()
    n = x.shape[0]
    if n < 2:
        raise ValueError("mean_cosine needs at least 2 feature vectors")
    if centre:
        x = x - x.mean(0)
    u = F.normalize(x.double(), dim=-1)
    return float((u.sum(0).pow(2).sum() - n) / (n * (n - 1)))


# -- 3. projections ----------------------------------------------------------------------------------

def _numpy(x) -> np.ndarray:
    return x.detach().cpu().float().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float32)


def pca_rgb(patch_feats, fit_on=None, percentiles: tuple[float, float] = (1.0, 99.0)) -> np.ndarray:
    """Colour patches by the first three principal components of their features.

    Args:
        patch_feats: (P, D) or (N, P, D) patch features (rows of NaN stay NaN: e.g. patches with no prediction).
        fit_on: features (any shape (..., D)) to fit the PCA and the colour range on; default `patch_feats`.
            Fit on the true target features to show predictions and targets in the same colours.
        percentiles: component values at these percentiles of `fit_on` map to 0 and 1 (then clipped).

    Returns:
        float32 array patch_feats.shape[:-1] + (3,), in [0, 1] (NaN where the input row was NaN).
    """
    from sklearn.decomposition import PCA

    X = _numpy(patch_feats)
    D = X.shape[-1]
    flat = X.reshape(-1, D)
    ok = np.isfinite(flat).all(1)
    fit = flat[ok] if fit_on is None else _numpy(fit_on).reshape(-1, D)
    fit = fit[np.isfinite(fit).all(1)]
    if len(fit) < 3:
        raise ValueError(f"pca_rgb needs at least 3 finite feature vectors to fit 3 components, got {len(fit)}")
    pca = PCA(n_components=3, svd_solver="full").fit(fit)
    ref = pca.transform(fit)
    lo, hi = np.percentile(ref, percentiles[0], axis=0), np.percentile(ref, percentiles[1], axis=0)
    out = np.full((flat.shape[0], 3), np.nan, dtype=np.float32)
    if ok.any():
        out[ok] = np.clip((pca.transform(flat[ok]) - lo) / np.maximum(hi - lo, 1e-8), 0.0, 1.0)
    return out.reshape(*X.shape[:-1], 3)


def remove_position(patch_feats, mean=None):
    """Subtract each patch position's mean feature, leaving what the patch's *content* adds.

    The encoder adds a fixed sin-cos position embedding to every patch, and in a small or briefly trained ViT
    that position signal dominates the patch features: a PCA of them mostly paints the coordinates. Removing
    the mean feature of each position over many images shows the content instead.

    Args:
        patch_feats: (N, P, D) or (P, D) patch features (tensor or array).
        mean: (P, D) mean feature of each position; default: the mean over the N images of `patch_feats`.
    Returns: patch_feats minus the mean, same shape and type.
    """
    if mean is None:
        if patch_feats.ndim != 3:
            raise ValueError("remove_position needs (N, P, D) features to average over, or an explicit mean")
        mean = patch_feats.mean(0)
    return patch_feats - mean


def pca_2d(feats) -> np.ndarray:
    """First two principal components of (N, D) features -> float32 (N, 2)."""
    from sklearn.decomposition import PCA

    X = _numpy(feats)
    return PCA(n_components=2, svd_solver="full" if X.shape[0] <= 1000 else "randomized",
               random_state=0).fit_transform(X).astype(np.float32)


def _tsne(X: np.ndarray, perplexity: float, seed: int, iterations: int, exaggeration_iterations: int
          ) -> np.ndarray:
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if X.shape[1] > 50:  # the usual first step: 50 principal components keep the neighbourhoods, cost less
        X = PCA(n_components=50, svd_solver="randomized", random_state=seed).fit_transform(X)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", angle=0.8,
                max_iter=iterations, random_state=seed)
    # scikit-learn fixes the early-exaggeration phase at 250 of the iterations (a class attribute, no
    # parameter); with PCA initialisation and the automatic learning rate far fewer suffice.
    tsne._EXPLORATION_MAX_ITER = min(exaggeration_iterations, iterations - 50)
    return tsne.fit_transform(X).astype(np.float32)


def tsne_2d(feats, perplexity: float = 30.0, seed: int = 0, iterations: int = 300,
            exaggeration_iterations: int = 100) -> np.ndarray:
    """t-SNE of (N, D) features -> float32 (N, 2). Cached on the features' content and the settings.

    scikit-learn's Barnes-Hut t-SNE (angle 0.8) after a 50-component PCA, initialised with PCA (stable
    layouts from run to run) and the automatic learning rate. `iterations` counts all gradient steps, the
    first `exaggeration_iterations` of them with early exaggeration (scikit-learn's default: 1000 and 250;
    these shorter defaults keep about the same trustworthiness in a quarter of the time, see
    benchmarks/embedding_speed.py).
    `perplexity` is lowered to (N - 1) / 3 when N is too small for it.
    """
    X = _numpy(feats)
    if X.ndim != 2 or X.shape[0] < 4:
        raise ValueError(f"tsne_2d needs (N, D) features with N >= 4, got shape {X.shape}")
    if iterations < 250 or exaggeration_iterations < 0:
        raise ValueError(f"tsne_2d needs iterations >= 250 (scikit-learn's minimum; got {iterations}) and "
                         f"exaggeration_iterations >= 0 (got {exaggeration_iterations})")
    perplexity = float(min(perplexity, (X.shape[0] - 1) / 3))
    key = (_digest_array(X), perplexity, int(seed), int(iterations), int(exaggeration_iterations))
    return _TSNE_CACHE.get(key, lambda: _tsne(X, perplexity, seed, iterations, exaggeration_iterations))


def to_grid(values, index, grid: int | tuple[int, int]) -> np.ndarray:
    """Scatter per-patch values (K, ...) at raster patch indices (K,) onto a (H, W, ...) grid, NaN elsewhere.

    A patch listed more than once gets the mean of its values.
    """
    H, W = (grid, grid) if isinstance(grid, int) else grid
    v = _numpy(values)
    idx = np.asarray(index, dtype=np.int64).reshape(-1)
    total = np.zeros((H * W,) + v.shape[1:], dtype=np.float64)
    count = np.zeros(H * W, dtype=np.int64)
    np.add.at(total, idx, v)
    np.add.at(count, idx, 1)
    shape = (H * W,) + (1,) * (v.ndim - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(count.reshape(shape) > 0, total / count.reshape(shape), np.nan)
    return out.astype(np.float32).reshape((H, W) + v.shape[1:])


# -- 4. predictions ----------------------------------------------------------------------------------

@dataclass
class PredictionMaps:
    """What the predictor got right and wrong on one image.

    cos:        (H, W) cosine similarity between predicted and target features per patch; NaN off the targets
    err:        (H, W) squared error per patch, averaged over features (the paper's L2 loss at that patch)
    pred:       (K, D) predicted target features, K = target patches of the selected block(s)
    target:     (K, D) true target features (target encoder on the full image, LayerNorm, then selected)
    patch:      (K,) raster index of each row
    block:      (K,) target block of each row
    all_targets:(N, D) target features of every patch of the image (for colour scales fitted on the image)
    masks:      the one-image `Masks` used
    """

    cos: np.ndarray
    err: np.ndarray
    pred: torch.Tensor
    target: torch.Tensor
    patch: np.ndarray
    block: np.ndarray
    all_targets: torch.Tensor
    masks: Masks

    @property
    def mean_cos(self) -> float:
        return float(F.cosine_similarity(self.pred, self.target, dim=-1).mean())

    @property
    def mean_err(self) -> float:
        return float(((self.pred - self.target) ** 2).mean())


@torch.no_grad()
def prediction_maps(model: IJEPA, image: torch.Tensor, masks: Masks, index: Optional[int] = None, *,
                    cfg: Config | str | None = None, row: int = 0) -> PredictionMaps:
    """Run the I-JEPA stages on one image and compare predictions with targets patch by patch.

    Args:
        model: an `IJEPA`.
        image: one image (3, H, W), uint8 (then pass `cfg` for its normalisation) or normalised float.
        masks: masks from `MaskCollator.sample`; row `row` is used.
        index: the target block to show (0 .. M-1), or None for all of them.

    Returns:
        `PredictionMaps` with (H, W) cosine and error maps on the patch grid (NaN off the target patches).
    """
    was_training = model.training
    model.eval()
    try:
        device = _device(model)
        x = as_input(image, cfg)[:1].to(device)  # (1, C, H, W)
        m = masks.rows(slice(row, row + 1)).to(device)
        M = m.targets.shape[1]
        if index is not None and not 0 <= index < M:
            raise ValueError(f"index={index} must name a target block in 0..{M - 1}, or be None for all")
        N = m.grid[0] * m.grid[1]
        everything = torch.arange(N, device=device).view(1, 1, N)
        all_targets = model.forward_target(x, everything)[0, 0]  # (N, D): every patch, LayerNorm-ed
        target = gather_tokens(all_targets.unsqueeze(0), m.targets)[0]  # (M, K, D)
        z = model.forward_context(x, m.context)  # (1, Nc, D)
        pred = model.predict(z, m.context, m.targets)[0].float()  # (M, K, D)
    finally:
        model.train(was_training)
    blocks = range(M) if index is None else [index]
    pred = torch.cat([pred[b] for b in blocks]).cpu()  # (K_sel, D)
    target = torch.cat([target[b] for b in blocks]).float().cpu()
    patch = torch.cat([m.targets[0, b] for b in blocks]).cpu().numpy()
    block = np.concatenate([np.full(m.targets.shape[2], b) for b in blocks])
    cos = F.cosine_similarity(pred, target, dim=-1)  # (K_sel,)
    err = ((pred - target) ** 2).mean(-1)
    return PredictionMaps(cos=to_grid(cos, patch, m.grid), err=to_grid(err, patch, m.grid), pred=pred,
                          target=target, patch=patch, block=block, all_targets=all_targets.float().cpu(),
                          masks=m.to("cpu"))


def prediction_colours(maps: PredictionMaps, pos=None) -> dict:
    """True and predicted target features of one image in the same colours (`pca_rgb`).

    One PCA, fitted on all the image's true target features minus `pos` (each position's mean, e.g.
    `position_mean`; None subtracts nothing), colours the true and the predicted features, so equal colours
    mean similar features. Returns {'all': (P, 3) every patch's true feature, 'true': (H, W, 3) and 'pred':
    (H, W, 3) on the patch grid, NaN off the targets}.
    """
    g = maps.masks.grid
    pos_all = 0 if pos is None else torch.as_tensor(pos)
    at = 0 if pos is None else pos_all[torch.as_tensor(maps.patch)]
    fit = maps.all_targets - pos_all
    K = len(maps.patch)
    rgb = pca_rgb(torch.cat([maps.target - at, maps.pred - at]), fit_on=fit)
    return {"all": pca_rgb(fit), "true": to_grid(rgb[:K], maps.patch, g), "pred": to_grid(rgb[K:], maps.patch, g)}


# -- 5. retrieval ------------------------------------------------------------------------------------

@dataclass
class PatchBank:
    """Target features of every patch of a set of images, with the pixels of each patch.

    feats:   (N*P, D) LayerNorm-ed target features (the space the predictor predicts into)
    pixels:  (N*P, p, p, 3) uint8 patch pixels
    image:   (N*P,) which image each row comes from
    patch:   (N*P,) raster index of the patch in its image
    """

    feats: torch.Tensor
    pixels: np.ndarray
    image: np.ndarray
    patch: np.ndarray

    def __len__(self) -> int:
        return self.feats.shape[0]


def patch_bank(model: IJEPA, images: torch.Tensor, cfg: Config | str | None = None, batch_size: int = 256
               ) -> PatchBank:
    """Embed every patch of `images` (uint8 (N, 3, H, W), or normalised float with `cfg`) with the target
    encoder, as targets are made (LayerNorm without affine), and keep each patch's pixels."""
    images = torch.as_tensor(images)
    feats = embed(model, images, cfg, which="target", pool="none", normalize=True, batch_size=batch_size)
    N, P, D = feats.shape
    patches = patch_pixels(images, int(round(P ** 0.5)), cfg)  # (N, P, p, p, 3)
    return PatchBank(feats=feats.reshape(N * P, D), pixels=patches.reshape(N * P, *patches.shape[2:]),
                     image=np.repeat(np.arange(N), P), patch=np.tile(np.arange(P), N))


def patch_pixels(images: torch.Tensor, grid: int, cfg: Config | str | None = None) -> np.ndarray:
    """The pixels of every patch: images (N, 3, H, W) (uint8, or normalised float with `cfg`) cut on a
    grid x grid lattice -> uint8 (N, grid * grid, p, p, 3), patches in raster order."""
    pix = to_uint8(torch.as_tensor(images), cfg)
    if pix.ndim == 3:
        pix = pix[None]
    N, p = pix.shape[0], pix.shape[-1] // grid
    return pix.reshape(N, 3, grid, p, grid, p).permute(0, 2, 4, 3, 5, 1).reshape(N, grid * grid, p, p, 3).numpy()


@dataclass
class Neighbours:
    """For each query row: the k closest bank rows, best first.

    index: (K, k) rows of the bank; score: (K, k) cosine similarities; pixels: (K, k, p, p, 3) uint8 patches.
    """

    index: np.ndarray
    score: np.ndarray
    pixels: np.ndarray


def _cosine_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, banned: Optional[torch.Tensor] = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    q = F.normalize(torch.as_tensor(queries).float(), dim=-1)
    keys = F.normalize(torch.as_tensor(keys).float(), dim=-1)
    sim = q @ keys.T  # (Q, N)
    if banned is not None:
        sim[:, banned] = -float("inf")
    k = min(k, int(sim.shape[1] if banned is None else sim.shape[1] - int(banned.sum())))
    score, index = sim.topk(k, dim=1)
    return index.numpy(), score.numpy()


def nearest_patches(pred, bank: PatchBank, k: int = 5, exclude_image: Optional[int] = None) -> Neighbours:
    """The real patches whose target features are closest (cosine) to each predicted feature.

    Args:
        pred: (K, D) predicted (or true) target features, e.g. `PredictionMaps.pred`.
        bank: a `PatchBank`.
        k: neighbours per query.
        exclude_image: leave this bank image out (the query's own image, to ask for *other* evidence).
    """
    banned = None if exclude_image is None else torch.from_numpy(bank.image == exclude_image)
    index, score = _cosine_topk(torch.as_tensor(pred).reshape(-1, bank.feats.shape[1]), bank.feats, k, banned)
    return Neighbours(index=index, score=score, pixels=bank.pixels[index])


def retrieval_pixel_gaps(model: IJEPA, images: torch.Tensor, bank: PatchBank, cfg: Config, k: int = 6,
                         seed: int = 0) -> dict[str, np.ndarray]:
    """Do the bank patches nearest to a prediction look like the hidden patch? A number, not an impression.

    For every target patch of every image (masks from cfg.mask, image i with step i of a collator seeded
    `seed`), the mean absolute pixel difference (0-255 grey levels, over the patch's pixels and channels)
    between the true patch and each of three sets of k bank patches, averaged over the k:

    * 'prediction': the k nearest (cosine) to the predictor's output;
    * 'truth': the k nearest to the true target feature (what this lookup can do at best);
    * 'random': k bank patches drawn at random (what it does knowing nothing).

    `bank` must come from the same model (`patch_bank(model, ...)`). Returns {name: (n_target_patches,)}
    float arrays, one entry per target patch, in the same order for all three (so they can be paired).
    """
    images = torch.as_tensor(images)
    collator = MaskCollator(cfg.mask, cfg.grid_size, seed=seed)
    rng = np.random.default_rng(seed)
    pix = patch_pixels(images, cfg.grid_size, cfg).astype(np.float32)  # (N, P, p, p, 3)
    out: dict[str, list] = {"prediction": [], "truth": [], "random": []}
    for i in range(images.shape[0]):
        maps = prediction_maps(model, images[i], collator.sample(1, step=i), cfg=cfg)
        truth = pix[i, maps.patch][:, None]  # (K, 1, p, p, 3)
        picked = {"prediction": nearest_patches(maps.pred, bank, k).pixels,
                  "truth": nearest_patches(maps.target, bank, k).pixels,
                  "random": bank.pixels[rng.integers(0, len(bank), size=(len(maps.patch), k))]}
        for name, patches in picked.items():
            out[name].append(np.abs(patches.astype(np.float32) - truth).mean(axis=(1, 2, 3, 4)))
    return {name: np.concatenate(v) for name, v in out.items()}


def similarity_search(gallery_feats, query_feat, k: int = 8, exclude: Optional[int] = None,
                      centre: bool | torch.Tensor = False) -> tuple[np.ndarray, np.ndarray]:
    """Rank a gallery by cosine similarity to a query.

    Args:
        gallery_feats: (N, D) features. query_feat: (D,) or (Q, D).
        exclude: a gallery index to leave out (the query itself, when it comes from the gallery).
        centre: subtract a vector from gallery and query features before the cosine: True for the gallery's
            mean feature (the part every image shares, see `common_share`), or a (D,) vector. Centred
            cosines spread over [-1, 1] where raw ones may all sit near 1.

    Returns:
        (indices, scores): int64 and float32 arrays of shape (k,) for one query, (Q, k) for several; best first.
    """
    q = torch.as_tensor(np.asarray(query_feat) if not torch.is_tensor(query_feat) else query_feat).float()
    g = torch.as_tensor(np.asarray(gallery_feats) if not torch.is_tensor(gallery_feats) else gallery_feats).float()
    if centre is not False and centre is not None:
        mean = g.mean(0) if centre is True else torch.as_tensor(centre).float()
        q, g = q - mean, g - mean
    banned = None
    if exclude is not None:
        banned = torch.zeros(g.shape[0], dtype=torch.bool)
        banned[exclude] = True
    index, score = _cosine_topk(q.reshape(-1, g.shape[-1]), g, k, banned)
    return (index[0], score[0]) if q.ndim == 1 else (index, score)
