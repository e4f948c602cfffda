"""Probes on frozen features: a linear probe (logistic regression) and a weighted kNN.

Both take features (N, D) and labels (N,) as tensors or arrays, whatever produced them: `ijepa_viz.evaluate`
feeds them the encoders' pooled features and the raw-pixel baseline. Read top to bottom:

1. `linear_probe`: standardised features, multinomial logistic regression, C chosen on held-out *training*
   images. Solved in torch by preconditioned L-BFGS (`_lbfgs`, `_Preconditioner`), with scikit-learn's
   `LogisticRegression` kept as the reference backend (`LINEAR_BACKENDS`).
2. `knn_classifier`: DINO's weighted kNN on cosine similarity.

Raw pixels stay uint8 and both probes multiply them as exact int8 products (`_Design`, `_int8_mm`).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from functools import partial
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["linear_probe", "knn_classifier", "LINEAR_BACKENDS"]


def _as_tensor(x) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))


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
    """Whether torch._int_mm (int8 x int8 -> int32) works here and is fast: only CPUs with int8 dot-product
    instructions (AVX512-VNNI, AMX) have kernels for it. Without them it falls back to a plain loop, measured 50x
    slower than a float32 matmul on an AVX2-only CPU (a raw-pixel probe that took seconds took over 10 minutes)."""
    global _INT_MM
    if _INT_MM is None:
        vnni, amx = (getattr(torch.cpu, name, None) for name in ("_is_vnni_supported", "_is_amx_tile_supported"))
        if not ((vnni and vnni()) or (amx and amx())):
            _INT_MM = False
            return _INT_MM
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


class _PathStop:
    """When to stop walking up the C path: once `patience` Cs in a row have not beaten the best held-out
    accuracy, counted only on the falling side of the curve: after some C has beaten the first (smallest) one,
    or has fallen below it by more than twice the held-out accuracy's standard error (`n_val` images).
    A flat start is not the falling side: features whose classes differ along low-variance directions (an
    untrained encoder's) sit at chance under a strong penalty and separate only under a weak one. Counting that
    plateau once stopped the path at C=1e-4 and scored an untrained encoder at 10.8% where C=10 gives 23.8%.
    A clear fall: raw dots pixels held out 24.4, 19.5, 16.0, 14.2, 13.6, 12.9% (the 4 fits now skipped: 24 s)."""

    def __init__(self, patience: Optional[int], n_val: int) -> None:
        self.patience, self.n_val, self.first, self.best, self.worse, self.rose = patience, n_val, None, None, 0, False

    def __call__(self, acc: float) -> bool:
        if self.first is None:
            self.first = self.best = acc
            return False
        noise = 2 * (self.first * (1 - self.first) / max(self.n_val, 1)) ** 0.5
        self.rose = self.rose or acc > self.first or acc < self.first - noise
        if acc > self.best:
            self.best, self.worse = acc, 0
        elif self.rose:
            self.worse += 1
        return self.patience is not None and self.worse >= self.patience


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
        best, stop = None, _PathStop(patience, len(val_rows))
        for C in sorted(Cs):  # each C starts from the previous C's solution
            W, b, z, _ = fit(C, fit_rows, mean, std, W, b)
            acc = float((z[val_rows].argmax(dim=1) == y[val_rows]).double().mean())
            if best_val is None or acc > best_val:
                best_C, best_val, best = float(C), acc, (W, b)
            if stop(acc):
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
       falls with C, and the weakly regularised fits are the slow ones. Cs that sit on a flat start (no C yet
       above the smallest C's accuracy, and none clearly below it) do not count towards `patience` (`_PathStop`).
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
    torch.optim.LBFGS (autograd, strong-Wolfe line search, warm-started) was 2-3x slower than scikit-learn:
    1,084 evaluations for one C=10 fit on 10,000 x 192 features, against 20 (0.14 s) with the preconditioner.
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
            stop = _PathStop(patience, len(val))
            for C in sorted(Cs):
                acc = float(clf.set_params(C=C).fit(x_fit, train_y[fit]).score(x_val, train_y[val]))
                if best_val is None or acc > best_val:
                    best_C, best_val = float(C), acc
                if stop(acc):
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
