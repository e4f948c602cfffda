"""Evaluation: frozen features, a linear probe, kNN, collapse metrics and prediction metrics.

The paper evaluates the *target* encoder, average-pooled over patches, with a linear probe (Assran et al., 2023,
Sec. 5). This module does the same on any `VisionTransformer` and any loader of (images, labels), and always
puts two baselines beside it, run through the same code: raw pixels and a randomly initialised encoder of the
same architecture. A self-supervised encoder that does not beat the random one has learned nothing useful.

Read top to bottom:

1. features: `extract_features` (any encoder, any loader), `features_for` (a model and its config's data),
   `raw_pixel_features`;
2. probes: `linear_probe` (logistic regression, C chosen on held-out *training* images; solved in torch by
   preconditioned L-BFGS, scikit-learn kept as the reference backend) and `knn_classifier` (DINO's weighted
   kNN); raw pixels stay uint8 and both probes multiply them as exact int8 products;
3. collapse metrics: `feature_std`, `rankme`, `collapse_metrics`;
4. prediction metrics: how well the predictor predicts the target patches, against predicting their mean;
5. `evaluate` (what `ijepa-viz eval` runs), `format_table` and `format_timings` (seconds per phase).

    from ijepa_viz.evaluate import evaluate, format_table
    print(format_table(evaluate("runs/default/checkpoint.pt", limit_train=5000)))
"""
from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ijepa_viz.config import Config
from ijepa_viz.data import UInt8Cache, augment_batch, build_loader, dataset_stats, load_uint8
from ijepa_viz.masks import MaskCollator, Masks
from ijepa_viz.model import IJEPA, feature_std, rankme  # noqa: F401  (public here too; defined in model.py)
from ijepa_viz.train import load_model, resolve_device, resolve_precision

__all__ = [
    "extract_features", "features_for", "raw_pixel_features", "linear_probe", "knn_classifier", "feature_std",
    "rankme", "collapse_metrics", "prediction_metrics", "prediction_metrics_on", "evaluate", "format_table",
    "format_timings", "PROBES", "LINEAR_BACKENDS",
]

PROBES = ("linear", "knn")
RAW_PIXEL_MAX_SIZE = 32  # the raw-pixel baseline sees images of at most 32x32 (3,072 numbers), as CIFAR
PATCH_METRIC_IMAGES = 256  # patch-level collapse metrics use the patches of this many test images
EVAL_BATCH_TOKENS = 32768  # feature batches hold about this many patches (512 images of 64 patches)


def _as_tensor(x) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))


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
# 2. Probes
# =============================================================================================

def _check_xy(name: str, x: np.ndarray, y: np.ndarray) -> None:
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"{name}: need features (N, D) and labels (N,) with N > 0, got {x.shape} and {y.shape}")


def _holdout_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of range(len(y)) into (fit, val) indices: each class with at least 2 samples
    gives round(fraction * n_c) of them to val (at least 1, never all)."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        if len(idx) >= 2:
            val.append(idx[: min(max(1, round(fraction * len(idx))), len(idx) - 1)])
    val = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(np.arange(len(y)), val), val


LINEAR_BACKENDS = ("torch", "sklearn")
_INT8_SPAN = 131072  # exact int8 products sum at most this many terms: 131072 * 128 * 128 = 2**31
_DIGITS = 3  # base-254 int8 digits per number in the exact integer products: a relative error of about 1e-7
_EIG_SAMPLE = 8192  # training rows that estimate the feature covariance for the probe's preconditioner
_EIG_FULL_MAX = 1024  # up to this many dims the covariance is decomposed exactly; above, its top _EIG_RANK
_EIG_RANK = 256  # eigenvectors (randomised SVD) and one mean eigenvalue for the rest
_FTOL = 1e-6  # a fit also needs its estimated distance to the minimum, -slope / 2, below _FTOL * f
_REFRESH = 10  # iterations between re-estimates of the preconditioner (the curvature changes as a fit converges)
_THREADED_WORK = 1 << 28  # products of this many multiply-adds (about 10 ms on one core) use all threads
_LBFGS_MEMORY = 10  # correction pairs kept by L-BFGS (scipy's default, as scikit-learn uses)


def _logreg(C: float, max_iter: int, warm_start: bool = False):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, warm_start=warm_start)


def _standardised(fit_on: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Standardise arrays with the mean and std of `fit_on` alone: [fit_on, *others], float32."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(fit_on)
    return [scaler.transform(a).astype(np.float32) for a in (fit_on, *others)]


@contextmanager
def _torch_threads(n: int):
    """Run torch (and MKL) on n threads inside the block."""
    old = torch.get_num_threads()
    if n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != old:
            torch.set_num_threads(old)


# -- exact int8 products for uint8 features (raw pixels) ----------------------------------------------------

_INT_MM: Optional[bool] = None


def _has_int_mm() -> bool:
    """Whether torch._int_mm (int8 x int8 -> int32, VNNI kernels on CPUs that have them) works here."""
    global _INT_MM
    if _INT_MM is None:
        try:
            a = torch.arange(-64, 64, dtype=torch.int8).reshape(32, 4)
            _INT_MM = bool((torch._int_mm(a, a.T.contiguous()) == a.int() @ a.int().T).all())
        except (AttributeError, RuntimeError, NotImplementedError):
            _INT_MM = False
    return _INT_MM


def _int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, S) @ b (S, N), both int8 with S <= _INT8_SPAN: the exact product, int32."""
    return torch._int_mm(a.contiguous(), b.contiguous())


def _digits(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float (R, K) -> int8 digits (R, _DIGITS * K) and column scales (K,) with
    m[:, k] = scale[k] * sum_i digits[:, i * K + k] / 254**i, to float32 precision (the last digit is worth
    0.5 / 254**2 of the column's largest entry, which maps to 127). Worked in float32 in place: for 200
    classes these (N, K) passes cost as much as the int8 products."""
    scale = m.abs().amax(dim=0) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    k = m.shape[1]
    r = m / scale
    digits = torch.empty((m.shape[0], _DIGITS * k), dtype=torch.int8)
    for i in range(_DIGITS):
        q = r.round()
        digits[:, i * k:(i + 1) * k] = q
        if i + 1 < _DIGITS:
            r.sub_(q).mul_(254)  # in [-127, 127]
    return digits, scale


def _undigit(products: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Exact products with the digits of `_digits` (R, _DIGITS * K), int32 or float -> float32 (R, K)."""
    k = products.shape[1] // _DIGITS
    out = products[:, (_DIGITS - 1) * k:].float()
    for i in range(_DIGITS - 2, -1, -1):  # Horner: small digits first
        out.div_(254).add_(products[:, i * k:(i + 1) * k])
    return out.mul_(scale)


class _Design:
    """A probe's feature matrix x (N, D), stored for fast products x @ m (D, K) and x.T @ g (N, K).

    Float features are kept as float32. uint8 features (the raw-pixel baseline) are kept as int8 x - 128 (exact)
    and multiplied in integers: the float operand is split into three int8 digits per entry and torch._int_mm
    sums exactly in int32, so the product is as accurate as a float32 one and, on a CPU with int8 dot-product
    instructions (VNNI), about 5x faster than float32 (measured 0.04 s against 0.22 s for (45,000 x 3,072) @
    (3,072 x 10) on one core of the development machine). `offset` (128 or 0) is what was subtracted.
    """

    def __init__(self, x: torch.Tensor, threads: int = 1):
        self.int8 = x.dtype == torch.uint8 and x.shape[1] <= _INT8_SPAN and _has_int_mm()
        if self.int8:
            self.x, self.offset = (x.to(torch.int16) - 128).to(torch.int8).contiguous(), 128.0
        else:
            self.x, self.offset = x.float().contiguous(), 0.0
        self._threads = threads

    def threads(self, k: int) -> int:
        """Threads for a product with k columns: only products of at least _THREADED_WORK multiply-adds run on
        all of them. Smaller ones take a few ms, where each thread's wait for the other costs more than it
        saves on a busy machine (two threads made the probe of 10,000 x 192 features 17x slower there)."""
        return self._threads if self.x.numel() * k >= _THREADED_WORK else 1

    def __len__(self) -> int:
        return len(self.x)

    def mm(self, m: torch.Tensor) -> torch.Tensor:
        """(x - offset) @ m: (N, D) @ (D, K) -> float32 (N, K)."""
        if not self.int8:
            with _torch_threads(self.threads(m.shape[1])):
                return (m.T @ self.x.T).T  # computed as (K, D) @ (D, N): 2x faster than x @ m with MKL here
        q, scale = _digits(m)
        with _torch_threads(self.threads(q.shape[1])):
            products = _int8_mm(self.x, q)
        return _undigit(products, scale)

    def tmm(self, g: torch.Tensor) -> torch.Tensor:
        """(x - offset).T @ g: (D, N) @ (N, K) -> float32 (D, K)."""
        if not self.int8:
            with _torch_threads(self.threads(g.shape[1])):
                return (g.T @ self.x).T  # (K, N) @ (N, D): the fast layout here (MKL's x.T @ g is 5-10x slower)
        q, scale = _digits(g)
        qt = q.T.contiguous()  # (3K, N)
        acc = None
        for i in range(0, len(self.x), _INT8_SPAN):  # int32 sums of at most _INT8_SPAN terms cannot overflow
            with _torch_threads(self.threads(qt.shape[0])):
                part = _int8_mm(qt[:, i:i + _INT8_SPAN], self.x[i:i + _INT8_SPAN]).double()
            acc = part if acc is None else acc + part
        return _undigit(acc.T, scale)

    def moments(self, idx: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std (ddof 0) of rows `idx` (all rows if None), float32 (D,); zero stds become 1, as
        scikit-learn's StandardScaler does. One pass over cache-sized chunks, about a rough centre (the first
        rows' mean) so that E[(x - c)^2] - (mean - c)^2 does not cancel; chunk sums are added in float64."""
        weight = torch.ones(len(self.x)) if idx is None else torch.zeros(len(self.x)).index_fill_(0, idx, 1)
        centre = self.x[:256].float().mean(dim=0)
        s1 = torch.zeros(self.x.shape[1], dtype=torch.float64)
        s2 = torch.zeros_like(s1)
        for i in range(0, len(self.x), 256):  # 256 rows stay in cache between the steps
            x, w = self.x[i:i + 256] - centre, weight[i:i + 256]  # a new float32 tensor
            s1 += w @ x
            s2 += w @ x.square_()
        n = float(weight.sum())
        shift = s1 / n  # mean - centre
        std = (s2 / n - shift.square()).clamp_min(0).sqrt()
        std = torch.where(std < 10 * torch.finfo(torch.float32).eps, torch.ones_like(std), std)
        return (centre.double() + shift + self.offset).float(), std.float()


# -- multinomial logistic regression by preconditioned L-BFGS -----------------------------------------------

def _objective(X: _Design, y: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor,
               lam: float, W: torch.Tensor, b: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sum_n w_n CE(softmax(z_n), y_n) + lam/2 ||W||^2 with logits z = ((x - mean) * inv_std) @ W + b, its
    gradient in closed form (no autograd), and the logits of every row (rows with w_n = 0 included).

    The standardisation is folded into the weights, so x is never copied: z = x @ (inv_std * W) + const.
    Returns (f, grad_W (D, K), grad_b (K,), z (N, K)); f is summed in float64.
    """
    m = W * inv_std[:, None]  # (D, K): weights on the unstandardised features
    z = X.mm(m) + (b + (X.offset - mean) @ m)  # (N, K)
    # The cross-entropy from the margins d = z - z_y, so that it keeps its relative precision when it is tiny
    # (nearly separable classes): nll = log(sum_k exp(d_k)) = top + log1p(expm1(-top) + sum_{k != y} exp(d_k - top)).
    label = y[:, None]
    e = z - z.gather(1, label)  # (N, K): d, 0 at the label
    top = e.amax(dim=1).clamp_min_(0)  # (N,)
    e.sub_(top[:, None]).exp_().scatter_(1, label, 0)  # exp(d - top) of the wrong classes
    rest = e.sum(dim=1)  # (N,)
    nll = top + torch.log1p(torch.expm1(-top) + rest)  # (N,)
    f = float(w.double() @ nll.double()) + 0.5 * lam * float(W.double().pow(2).sum())
    scale = torch.exp(top - nll) * w  # (N,): exp(d_k - nll) = softmax p_k, times the row's weight
    g = e.mul_(scale[:, None])  # (N, K): dF/dz = w (p - onehot(y)); p_y - 1 is minus the sum of the others,
    g.scatter_(1, label, -(rest * scale)[:, None])  # without the cancellation of 1 - p_y
    grad_b = g.sum(dim=0)
    grad_W = (X.tmm(g) + torch.outer(X.offset - mean, grad_b)) * inv_std[:, None] + lam * W
    return f, grad_W, grad_b, z


class _Covariance:
    """The second moments of the standardised features, for the preconditioner: rows `idx` (up to _EIG_SAMPLE of
    them, spread evenly) standardised with (mean, std), and `eigs` of their (optionally weighted) covariance."""

    def __init__(self, X: _Design, idx: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        self.idx = idx[torch.linspace(0, len(idx) - 1, min(len(idx), _EIG_SAMPLE)).round().long().unique()]
        self.xs = (X.x[self.idx].float() - (mean - X.offset)) / std  # (m, D)
        self.full = self.xs.shape[1] <= _EIG_FULL_MAX
        self._uniform = None

    def eigs(self, weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, Optional[float]]:
        """Eigenvectors V (D, r), eigenvalues s (r,) and the eigenvalue assumed outside V (None: V is complete).

        Up to _EIG_FULL_MAX dims: all of them, of the covariance weighted by `weight` (m,) if given. Above: the
        top _EIG_RANK of the unweighted covariance by randomised SVD (computed once), the rest their mean."""
        xs = self.xs
        m, d = xs.shape
        if self.full:
            if weight is None:
                s, v = torch.linalg.eigh(xs.T @ xs / m)
            else:
                s, v = torch.linalg.eigh((xs * (weight / weight.sum().clamp_min(1e-30))[:, None]).T @ xs)
            return v, s.clamp_min(0), None
        if self._uniform is None:
            _, sv, v = torch.svd_lowrank(xs, q=min(_EIG_RANK, m, d), niter=2)
            s = sv.square() / m
            rest = float((xs.square().sum() / m - s.sum()) / (d - len(s)))
            self._uniform = (v.contiguous(), s, max(rest, 0.0))
        return self._uniform


class _Preconditioner:
    """An approximate inverse Hessian of `_objective`, used as L-BFGS's initial matrix.

    The Hessian of the CE term is sum_n w_n A_n (x) x_n x_n^T with A_n = diag(p_n) - p_n p_n^T. It is
    approximated by B (x) S (as K-FAC does): B = sum_n w_n A_n, and S the covariance of the standardised
    features (of a sample of rows, weighted by their curvature trace(A_n) when all D dims are decomposed),
    plus lam for W; the bias block is B alone (the features are centred). Both factors come diagonalised, so
    applying the inverse costs a few (D, K) products; `_lbfgs` re-makes it every _REFRESH iterations.
    """

    def __init__(self, eigs: tuple, B: torch.Tensor, lam: float):
        self.V, s, rest = eigs
        beta, self.U = torch.linalg.eigh(B.double())
        beta, self.U = beta.clamp_min(0).float(), self.U.float()
        self.inv = 1 / (s[:, None] * beta[None, :] + lam)  # (r, K)
        self.inv_rest = None if rest is None else 1 / (rest * beta + lam)  # (K,)
        self.inv_b = 1 / (beta + max(1e-6 * float(beta.max()), 1e-12))  # the 1-vector is B's null direction

    def __call__(self, gW: torch.Tensor, gb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (D, r) x (r, K) products are written as (K, r) x (r, D), the fast layout for MKL here
        r = gW.T @ self.V  # (K, r) = (V^T gW)^T
        pW = (self.U @ (self.inv.T * (self.U.T @ r))) @ self.V.T  # (K, D)
        if self.inv_rest is not None:
            pW += self.U @ (self.inv_rest[:, None] * (self.U.T @ (gW.T - r @ self.V.T)))
        return pW.T, ((gb @ self.U) * self.inv_b) @ self.U.T


def _curvature(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """B = sum_n w_n (diag(p_n) - p_n p_n^T) (K, K) for the logits z (N, K)."""
    p = torch.softmax(z, dim=1)
    wp = p * w[:, None]
    return torch.diag(wp.sum(dim=0)) - wp.T @ p


def _dot(a: tuple, b: tuple) -> float:
    """The inner product of two (W, b) pairs."""
    return float((a[0] * b[0]).sum()) + float((a[1] * b[1]).sum())


def _lbfgs(fun, W: torch.Tensor, b: torch.Tensor, preconditioner, tol: float, max_iter: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Minimise fun(W, b) -> (f, grad_W, grad_b, z) by L-BFGS (Nocedal & Wright, 2006, Alg. 7.4) whose initial
    inverse Hessian is `preconditioner(z)` (re-made every _REFRESH iterations from the current logits), scaled
    by s.y / y.Py after each step, with a backtracking (Armijo) line search from the unit step.

    Stops when every gradient entry is at most `tol` (scipy's `gtol`, which scikit-learn's lbfgs solver sets to
    its `tol`) and the estimated distance to the minimum, -slope / 2, is at most _FTOL * f (gradients are tiny
    long before the minimum when classes are nearly separable); or when no step lowers f measurably (float32
    precision reached); or after `max_iter` iterations. Returns (W, b, z at the solution, iterations)."""
    f, gW, gb, z = fun(W, b)
    history: list[tuple] = []  # (s, y, 1 / s.y), s and y as (W, b) pairs
    gamma, it = 1.0, 0
    while it < max_iter:
        if it % _REFRESH == 0:
            precondition = preconditioner(z)
        q, alphas = [gW.clone(), gb.clone()], []
        for s_, y_, rho in reversed(history):  # the two-loop recursion
            a = rho * _dot(s_, q)
            q[0] -= a * y_[0]
            q[1] -= a * y_[1]
            alphas.append(a)
        d = [gamma * t for t in precondition(*q)]
        for (s_, y_, rho), a in zip(history, reversed(alphas)):
            beta = rho * _dot(y_, d)
            d[0] += (a - beta) * s_[0]
            d[1] += (a - beta) * s_[1]
        d = [-d[0], -d[1]]
        slope = _dot((gW, gb), d)
        if slope >= 0:  # not a descent direction: restart from the preconditioned gradient
            history.clear()
            gamma = 1.0
            d = [-t for t in precondition(gW, gb)]
            slope = _dot((gW, gb), d)
        small_gradient = max(float(gW.abs().max()), float(gb.abs().max())) <= tol
        if small_gradient and -slope <= 2 * _FTOL * abs(f):
            break
        step, decreased = 1.0, False
        for _ in range(8):
            new = fun(W + step * d[0], b + step * d[1])
            if new[0] <= f + 1e-4 * step * slope:
                decreased = True
                break
            # the minimum of the parabola through f, the slope and the new value, within [0.1, 0.5] of the step
            curv = new[0] - f - slope * step
            step *= min(0.5, max(0.1, -slope * step / (2 * curv))) if curv > 0 else 0.1
        if not decreased or step < 1e-3:  # a poor direction: its history goes (float32 noise can spoil it)
            restart = bool(history)
            history.clear()
            gamma = 1.0
            if not decreased:
                if restart:
                    continue  # again from the preconditioned gradient
                break  # no decrease along the preconditioned gradient: float32 precision reached
        it += 1
        s_, y_ = (step * d[0], step * d[1]), (new[1] - gW, new[2] - gb)
        sy = _dot(s_, y_)
        if step >= 1e-3 and sy > 1e-12:
            history.append((s_, y_, 1 / sy))
            del history[:-_LBFGS_MEMORY]
            gamma = sy / _dot(y_, precondition(*y_))  # rescale the preconditioner to the curvature just seen
        W, b = W + s_[0], b + s_[1]
        f, gW, gb, z = new
    return W, b, z, it


def _linear_probe_torch(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray,
                        Cs: Sequence[float], val_fraction: float, seed: int, patience: Optional[int],
                        max_iter: int, threads: int = 1, tol: float = 1e-4) -> dict:
    classes, y_np = np.unique(train_y, return_inverse=True)
    y = torch.from_numpy(y_np.astype(np.int64))
    n, k = len(y), len(classes)
    X = _Design(train_x, threads)
    W, b = torch.zeros(X.x.shape[1], k), torch.zeros(k)
    best_C, best_val, cov = float(Cs[0]), None, None

    def fit(C: float, rows: torch.Tensor, mean, std, W, b):
        w = torch.zeros(n)
        w[rows] = 1 / len(rows)  # the mean over the fit rows; held-out rows weigh nothing
        lam = 1 / (C * len(rows))  # scikit-learn's C: sum of CE + ||W||^2 / (2C), divided by the row count
        fun = partial(_objective, X, y, w, mean, 1 / std, lam)

        def preconditioner(z: torch.Tensor) -> _Preconditioner:
            p = torch.softmax(z[cov.idx], dim=1)
            eigs = cov.eigs(1 - p.square().sum(dim=1))  # the sample rows weighted by their curvature, trace(A_n)
            return _Preconditioner(eigs, _curvature(z, w), lam)

        return _lbfgs(fun, W, b, preconditioner, tol, max_iter)

    if len(Cs) > 1:
        fit_rows, val_rows = _holdout_split(y_np, val_fraction, seed)
        if len(val_rows) == 0 or len(np.unique(y_np[fit_rows])) < 2:
            raise ValueError(f"the {n} training images are too few to hold out a validation split "
                             f"for choosing C; use more training images or pass a single C in Cs")
        fit_rows, val_rows = torch.from_numpy(fit_rows), torch.from_numpy(val_rows)
        mean, std = X.moments(fit_rows)
        cov = _Covariance(X, fit_rows, mean, std)
        best, worse = None, 0  # Cs in a row that did not beat the best
        for C in sorted(Cs):  # each C starts from the previous C's solution
            W, b, z, _ = fit(C, fit_rows, mean, std, W, b)
            acc = float((z[val_rows].argmax(dim=1) == y[val_rows]).double().mean())
            if best_val is None or acc > best_val:
                best_C, best_val, best, worse = float(C), acc, (W, b), 0
            else:
                worse += 1
                if patience is not None and worse >= patience:
                    break
        # Start the refit from the best C's solution, re-expressed for the whole set's standardisation.
        W, b = best
        all_mean, all_std = X.moments()
        b = b + ((all_mean - mean) / std) @ W
        W = W * (all_std / std)[:, None]
        mean, std = all_mean, all_std
    else:
        mean, std = X.moments()
        cov = _Covariance(X, torch.arange(n), mean, std)
    W, b, _, _ = fit(best_C, torch.arange(n), mean, std, W, b)

    m = W / std[:, None]
    test = _Design(test_x, threads)
    z = test.mm(m) + (b + (test.offset - mean) @ m)
    pred = classes[z.argmax(dim=1).numpy()]
    return {"accuracy": float((pred == test_y).mean()), "C": best_C, "val_accuracy": best_val}


def linear_probe(train_x, train_y, test_x, test_y, *, seed: int = 0,
                 Cs: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0), val_fraction: float = 0.1,
                 patience: Optional[int] = 2, max_iter: int = 300, backend: str = "torch") -> dict:
    """Linear probe: standardised features, multinomial logistic regression, C chosen on training data only.

    1. Split the training set (stratified, seeded) into a fit part and a held-out `val_fraction`.
    2. For each C in `Cs`, smallest first: standardise with the fit part's mean and std, fit the classifier on
       the fit part (starting from the previous C's solution), score the held-out part. Stop once `patience`
       larger Cs in a row have not beaten the best (None: try them all): the held-out accuracy rises then
       falls with C, and the weakly regularised fits are the slow ones.
    3. Refit with the best C (ties go to the smaller C) on the whole training set, standardised with its own
       mean and std, and score the test set, which is touched only here.

    Args: features (N, D) and labels (N,) as tensors or arrays; uint8 features (raw pixels) are used exactly
    as integers. C is scikit-learn's inverse L2 strength: the fit minimises the sum over samples of the
    cross-entropy plus ||W||^2 / (2C), i.e. the mean cross-entropy plus ||W||^2 / (2 C N); the intercept is
    not penalised. max_iter bounds the iterations of each fit.
    backend: 'torch' (the default, below) or 'sklearn' (scikit-learn's `LogisticRegression(solver='lbfgs')` on
    `StandardScaler` features, warm-started along the C path: the reference the torch probe is tested against).

    Returns: {'accuracy': test accuracy, 'C': the chosen C, 'val_accuracy': its held-out accuracy (None when
    only one C was given)}.

    The torch backend minimises the same objective, exactly, with full-batch L-BFGS in float32 and
    closed-form gradients (no autograd). It stops when every gradient entry is below 1e-4 (scikit-learn's tol)
    and its estimate of the distance to the minimum is below 1e-6 of the loss, or after max_iter iterations.
    What makes it fast (`_lbfgs`, `_Preconditioner`): L-BFGS starts each step from a Kronecker-factored
    approximation of the inverse Hessian (the covariance of the standardised features, decomposed once per
    probe, times the K x K softmax curvature, re-estimated every 10 iterations), so a fit takes 10-30
    iterations where plain L-BFGS (what scikit-learn runs) takes hundreds; the held-out rows stay in the one
    feature matrix with zero weight (no copies); matmuls use the layouts that are fast here; uint8 features
    multiply as exact int8 products (`_Design`).

    Measured on one thread (OMP_NUM_THREADS=1) of the busy 2-core development machine, on real CIFAR-10 features
    of a 20-step cpu-tiny checkpoint (C=10 wins) and raw pixels (C=0.001 wins):
    * 50,000 x 192 features: 1.7-1.9 s (85 objective evaluations for all seven fits). With plain L-BFGS (the
      preconditioner off, all else equal) the same probe took 30 s and hit 300 iterations in four of its fits;
    * 10,000 x 192: 0.6 s against 8.1 s for scikit-learn (max_iter=300), whose fits at C >= 0.1 stop at the
      cap short of the minimum: 36.9% test accuracy against 42.3% here; run to convergence (2,386 iterations,
      11 s for the refit alone) scikit-learn gives 42.1%;
    * 10,000 raw pixels (3,072 dims): 4.2 s against 48.6 s, 38.5% in both; 50,000: 14 s.
    Earlier, a torch probe (torch.optim.LBFGS, strong-Wolfe line search, warm-started) was 2-3x slower than
    scikit-learn. Why, measured on one fit (C=10, 10,000 x 192 CIFAR-10 features, from zero): torch.optim.LBFGS
    took 14.9 s for 1,084 evaluations and still stood at a gradient of 1.2e-3 (f = 1.64388); this L-BFGS
    without its preconditioner needs 2,020 evaluations (8.8 s; 4 ms each against 14 ms with autograd and
    x @ W, which MKL computes 2x slower here than (W^T @ x^T)^T); with it, 20 evaluations, 0.14 s, f = 1.63385.
    """
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {', '.join(LINEAR_BACKENDS)}")
    train_x, test_x = _as_tensor(train_x).cpu(), _as_tensor(test_x).cpu()
    train_y, test_y = _as_tensor(train_y).long().cpu().numpy(), _as_tensor(test_y).long().cpu().numpy()
    _check_xy("train", train_x, train_y)
    _check_xy("test", test_x, test_y)
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train features have {train_x.shape[1]} dims but test features {test_x.shape[1]}")
    if len(np.unique(train_y)) < 2:
        raise ValueError("the training labels hold a single class; a linear probe needs at least two")
    if not Cs:
        raise ValueError("Cs must hold at least one value of C")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must lie in (0, 1)")
    if backend == "torch":
        threads = torch.get_num_threads()
        with torch.no_grad(), _torch_threads(1):  # the many small steps on one thread (see `_Design`)
            return _linear_probe_torch(train_x, train_y, test_x, test_y, Cs, val_fraction, seed, patience, max_iter,
                                       threads)

    from sklearn.exceptions import ConvergenceWarning

    train_x, test_x = train_x.float().numpy(), test_x.float().numpy()
    best_C, best_val = float(Cs[0]), None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter bounds the time (and can stop short)
        if len(Cs) > 1:
            fit, val = _holdout_split(train_y, val_fraction, seed)
            if len(val) == 0 or len(np.unique(train_y[fit])) < 2:
                raise ValueError(f"the {len(train_y)} training images are too few to hold out a validation split "
                                 f"for choosing C; use more training images or pass a single C in Cs")
            x_fit, x_val = _standardised(train_x[fit], train_x[val])
            clf = _logreg(best_C, max_iter, warm_start=True)  # each C starts from the previous C's solution
            worse = 0  # Cs in a row that did not beat the best
            for C in sorted(Cs):
                acc = float(clf.set_params(C=C).fit(x_fit, train_y[fit]).score(x_val, train_y[val]))
                if best_val is None or acc > best_val:
                    best_C, best_val, worse = float(C), acc, 0
                else:
                    worse += 1
                    if patience is not None and worse >= patience:
                        break
        x_train, x_test = _standardised(train_x, test_x)
        clf = _logreg(best_C, max_iter).fit(x_train, train_y)
    return {"accuracy": float(clf.score(x_test, test_y)), "C": best_C, "val_accuracy": best_val}


@torch.no_grad()
def knn_classifier(train_x, train_y, test_x, test_y, *, k: int = 20, temperature: float = 0.07,
                   num_classes: Optional[int] = None, batch_size: int = 1024) -> float:
    """Weighted kNN on cosine similarity, as DINO's evaluation (Caron et al., 2021). Returns test accuracy.

    Features (N, D) are L2-normalised; each test point takes its k most similar training points, which vote
    for their class with weight exp(similarity / temperature); the class with the largest sum wins.
    Test points are processed `batch_size` at a time: one (batch, N_train) similarity matrix (one matmul) and
    one top-k each. uint8 features (raw pixels) take exact int8 dot products (see `_Design`): the same
    accuracy as float32, 2.7x faster (14 s against 39 s for CIFAR-10's 3,072-dim pixels, 10,000 x 50,000 pairs,
    on one busy core), otherwise the slowest kNN of `evaluate`.
    """
    train_x, test_x = _as_tensor(train_x), _as_tensor(test_x)
    train_y, test_y = _as_tensor(train_y).long().to(train_x.device), _as_tensor(test_y).long().to(test_x.device)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"need features (N, D) and (T, D), got {tuple(train_x.shape)} and {tuple(test_x.shape)}")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y) or len(train_x) == 0 or len(test_x) == 0:
        raise ValueError("features and labels must be non-empty and of the same length")
    C = num_classes or int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_x))
    exact_int8 = (train_x.dtype == test_x.dtype == torch.uint8 and train_x.device.type == "cpu"
                  and train_x.shape[1] <= _INT8_SPAN and _has_int_mm())
    if exact_int8:  # x = x8 + 128: a.b = a8.b8 + 128 (sum a8 + sum b8) + 128^2 D, all in integers
        train8 = (train_x.to(torch.int16) - 128).to(torch.int8)
        train8_t = train8.T.contiguous()  # (D, N)
        d = train_x.shape[1]
        train_sum = train8.sum(dim=1, dtype=torch.int64).double()
        train_inv = 1 / train_x.double().square().sum(dim=1).sqrt().clamp_min(1e-12)  # 1 / |b|
        train_u = (128 * train_sum * train_inv).float()  # 128 sum(b8) / |b|
        train_inv = train_inv.float()
    else:
        train_x = F.normalize(train_x.float(), dim=1)  # (N, D)
        test_x = F.normalize(test_x.float(), dim=1)  # (T, D)
    correct = 0
    for i in range(0, len(test_x), batch_size):
        if exact_int8:
            a = test_x[i: i + batch_size]
            a8 = (a.to(torch.int16) - 128).to(torch.int8)
            a_const = 128 * a8.sum(dim=1, dtype=torch.int64).double() + 128 * 128 * d  # (b,)
            a_inv = 1 / a.double().square().sum(dim=1).sqrt().clamp_min(1e-12)
            sim = _int8_mm(a8, train8_t).float()  # (b, N): a8.b8, exact (|a8.b8| < 2**31)
            sim.add_(a_const.float()[:, None])
            sim.mul_(train_inv).add_(train_u)  # (a.b) / |b|
            sim.mul_(a_inv.float()[:, None])  # cosine similarities
        else:
            sim = test_x[i: i + batch_size] @ train_x.T  # (b, N): cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # (b, k)
        weights = (top_sim / temperature).exp()  # (b, k)
        votes = sim.new_zeros(len(sim), C).scatter_add_(1, train_y[top_idx], weights)  # (b, C)
        correct += int((votes.argmax(dim=1) == test_y[i: i + batch_size]).sum())
    return correct / len(test_x)


# =============================================================================================
# 3. Collapse metrics
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
# 4. Prediction metrics
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
# 5. The evaluation table
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
        from ijepa_viz.data import _fits_in_memory
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
             progress: bool = True, linear_backend: str = "torch") -> dict:
    """Probe a model's average-pooled target encoder beside two baselines run the same way.

    Args:
        checkpoint: a training checkpoint (`load_model`); or pass `model` (and `cfg`) directly.
        cfg: the config whose data section is evaluated on (default: the checkpoint's).
        probes: any of 'linear' (`linear_probe`) and 'knn' (`knn_classifier`).
        limit_train, limit_test: at most this many images of each split, spread evenly over it.
        device: where the encoders run; seed: seeds the random-init encoder and the probe's held-out split.
        linear_backend: `linear_probe`'s backend, 'torch' (default) or 'sklearn' (the slower reference).

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
    in batches of about EVAL_BATCH_TOKENS patches: the pooled features and the 256 images' patches come from
    the same forward pass.

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
    batch = max(cfg.data.batch_size, EVAL_BATCH_TOKENS // cfg.grid_size ** 2)
    stats = dataset_stats(cfg.data.name)

    def loader(split: str, limit: Optional[int]) -> Iterable:
        if images[split] is None:
            return build_loader(replace(cfg.data, batch_size=batch), split, cfg.model.img_size, train=False, seed=0)
        return _EvalBatches(*images[split], batch, cfg.model.img_size, stats)

    n_test = len(images["test"][0]) if images["test"] is not None else None
    n_patch = min(PATCH_METRIC_IMAGES, n_test or limit_test or PATCH_METRIC_IMAGES)
    keep = None if n_test is None else np.unique(np.linspace(0, n_test - 1, n_patch).round().astype(np.int64))

    rows, n_train = [], None
    encoders = [("ijepa (target encoder)", model.target_network),
                ("random init", _random_init(cfg, seed).target_network)]
    for name, encoder in encoders:
        tic = time.perf_counter()
        kw = dict(device=device, progress=progress)
        train_x, train_y, _ = _extract(encoder, loader("train", limit_train), **kw)
        test_x, test_y, patches = _extract(encoder, loader("test", limit_test), keep_patches=keep, **kw)
        if patches is None:  # a streamed test set: the patches of n_patch images spread over it, separately
            patches, _ = extract_features(encoder, _eval_loader(cfg, "test", n_patch), pool="none", **kw)
        timings[f"features: {name}"] = time.perf_counter() - tic
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
            "seconds": seconds, "timings": timings}


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
