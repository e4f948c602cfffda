"""I-JEPA: context encoder, EMA target encoder, narrow predictor with mask tokens, and the loss.

Notation of the paper (Assran et al., 2023, Sec. 3), with the code that computes it:

* image y, split into N non-overlapping patches; the grid is `img_size // patch_size` per side;
* **targets** (Eq. in Sec. 3, "Targets"):  s_y = f_theta_bar(y), the *target encoder* on the full image, then
  layer-normed over the feature dimension, then the M target blocks are selected:
  s_y(i) = {s_y_j : j in B_i}                                                     -> `IJEPA.forward_target`
* **context**: s_x = f_theta(x), the *context encoder* on the kept patches only     -> `IJEPA.forward_context`
* **prediction**: s_hat_y(i) = g_phi(s_x, {m_j}_{j in B_i}), where each mask token m_j is a shared learned
  vector plus the positional embedding of patch j                                    -> `IJEPA.predict`
* **loss** (Eq. 1):  1/M sum_i sum_{j in B_i} || s_hat_y_j - s_y_j ||_2^2            -> `IJEPA.loss`
  (the official code uses smooth-L1 averaged over elements; the paper's L2 is `loss='mse'`)
* **EMA**: theta_bar <- m * theta_bar + (1 - m) * theta after every optimiser step   -> `IJEPA.update_target`
* **optional multi-block targets** (not in the paper, off by default): with `target_layers` K > 1, s_y is the
  mean of the last K blocks' outputs (each through the final norm), then layer-normed, as data2vec builds its
  targets from the top K blocks                                                     -> `IJEPA.forward_target`
* **optional instance-normed targets** (not in the paper, off by default): with `target_norm='instance'`, each
  feature of s_y is first normalised over the image's N tokens, as data2vec does    -> `IJEPA.forward_target`
* **optional regularisers** (not in the paper, off by default):  loss = pred + var_weight * v(Z)
  + cov_weight * c(Z) + sigreg_weight * SIGReg(Z)  (VICReg / C-JEPA and LeJEPA)    -> `IJEPA.regularisers`,
  with the equations in `vicreg_variance`, `vicreg_covariance`, `epps_pulley` and `sigreg`

Parameter names match the official checkpoints (facebookresearch/ijepa, src/models/vision_transformer.py), so a
released state dict loads with `strict=True` once the `module.` prefix is stripped: the encoders use timm's
names (`patch_embed.proj`, `pos_embed`, `blocks.i.*`, `norm`), the predictor `predictor_embed`, `mask_token`,
`predictor_pos_embed`, `predictor_blocks.i.*`, `predictor_norm`, `predictor_proj`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from ijepa_viz.config import ModelConfig
from ijepa_viz.masks import Masks


# -- helpers ------------------------------------------------------------------------------------

def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions, (grid_size**2, dim), in the MAE / I-JEPA layout.

    The first dim/2 channels encode the column (x) and the last dim/2 the row (y); each half is
    [sin(p * w_k), cos(p * w_k)] with w_k = 10000 ** (-k / (dim/4)), k = 0 .. dim/4 - 1.
    (timm's `build_sincos2d_pos_embed` orders the channels differently, so the official checkpoints'
    `pos_embed` would not match it.)
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    pos = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")  # (G, G) each

    def enc(p):  # (G*G,) -> (G*G, dim/2)
        out = p.reshape(-1, 1) * omega  # outer product
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([enc(cols), enc(rows)], dim=1).float()  # (G*G, dim)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Select tokens by patch index: x (B, N, D), idx (B, *S) -> (B, *S, D)."""
    B, D = x.shape[0], x.shape[-1]
    flat = idx.reshape(B, -1)  # (B, K)
    out = torch.gather(x, 1, flat.unsqueeze(-1).expand(-1, -1, D))  # (B, K, D)
    return out.view(*idx.shape, D)


def _init_weights(module: nn.Module, std: float) -> None:
    """Official init: truncated-normal linear/conv weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _rescale_blocks(blocks: nn.ModuleList) -> None:
    """Official `fix_init_weight`: divide each residual branch's output weight by sqrt(2 * layer)."""
    for i, blk in enumerate(blocks, start=1):
        blk.attn.proj.weight.data.div_(math.sqrt(2.0 * i))
        blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * i))


class Attention(TimmAttention):
    """Multi-head self-attention: timm's module and parameters (`qkv`, `proj`), its forward written out.

        q, k, v = split(x W_qkv + b_qkv) into H heads of d = D / H dims each,
        out = concat over heads of softmax(q k^T / sqrt(d)) v,  then the projection `proj`.

    The softmax runs in float32 even under bf16 autocast. Its inputs and the rounding of its output to bf16 are
    those of the bf16 kernel (which also computes in float32 inside), but PyTorch's bf16 softmax on CPU is 3-6x
    slower at these sizes: with its backward it took 5% of a CPU training step, in float32 half that
    (benchmarks/README.md, "Profile of one step").
    `set_attention(model, 'sdpa')` (`fused_attn`) uses F.scaled_dot_product_attention instead. No dropout on the
    attention weights: I-JEPA uses none.
    """

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("I-JEPA's attention has no mask")
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, d)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, d)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N): scale = 1 / sqrt(d)
            attn = attn.softmax(dim=-1, dtype=torch.float32)
            x = attn.to(v.dtype) @ v  # (B, H, N, d)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # heads concatenated: (B, N, D)


def _blocks(dim, depth, heads, mlp_ratio, qkv_bias, drop_path, eps) -> nn.ModuleList:
    dpr = torch.linspace(0, drop_path, depth).tolist()  # stochastic depth decay rule
    norm = partial(nn.LayerNorm, eps=eps)
    return nn.ModuleList(
        Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i], norm_layer=norm,
              attn_layer=Attention)
        for i in range(depth)
    )


# -- encoder ------------------------------------------------------------------------------------

class VisionTransformer(nn.Module):
    """ViT encoder without a CLS token: patchify, add fixed sin-cos positions, keep tokens, blocks, LayerNorm.

    Args mirror `ModelConfig`. `forward(images, keep)` takes images (B, C, H, W) and optional kept patch
    indices (B, K); it returns (B, K, D), or (B, N, D) when `keep` is None.
    """

    def __init__(self, img_size=32, patch_size=4, in_chans=3, embed_dim=192, depth=12, num_heads=3,
                 mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0, norm_eps=1e-6, init_std=0.02):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        pos = sincos_pos_embed_2d(embed_dim, self.grid_size).unsqueeze(0)  # (1, N, D)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)  # fixed, as in the official code
        self.blocks = _blocks(embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_path_rate, norm_eps)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        _init_weights(self, init_std)
        _rescale_blocks(self.blocks)

    def embed(self, images: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Patch embedding plus positions, then (optionally) keep tokens: (B, C, H, W) -> (B, K or N, D)."""
        x = self.patch_embed(images) + self.pos_embed  # (B, N, D): positions added BEFORE masking
        # The conv leaves x as (B, D, N) in memory; one copy to (B, N, D) here spares a copy in every LayerNorm
        # of the full-image (target) forward, and mixed layouts in its residual adds: about 5% of a CPU training
        # step (benchmarks/README.md, "Profile of one step").
        x = x.contiguous()
        return x if keep is None else gather_tokens(x, keep)  # (B, K, D)

    def forward(self, images: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.embed(images, keep)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)  # (B, K or N, D)

    def intermediate_layers(self, images: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Outputs of the last n blocks, each passed through the final norm: n tensors of (B, N, D)."""
        x, outs = self.embed(images), []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - n:
                outs.append(self.norm(x))
        return outs


# -- predictor ----------------------------------------------------------------------------------

class Predictor(nn.Module):
    """The narrow predictor g_phi: a ViT of width Dp over [context tokens, mask tokens].

    1. project the context tokens D -> Dp and add the predictor's positions at the context indices;
    2. one mask token per target patch: the shared learned `mask_token` plus the position at that index;
    3. run the blocks and the norm on the concatenation, one sequence per (image, target block);
    4. keep the mask-token outputs and project them Dp -> D.

    The official code stacks the M target blocks mask-major (row m*B + b); this one stacks them image-major
    (row b*M + m) and returns (B, M, K, D). The rows are the same computations in another order.
    """

    def __init__(self, num_patches, embed_dim=192, pred_embed_dim=96, depth=6, num_heads=3, mlp_ratio=4.0,
                 qkv_bias=True, drop_path_rate=0.0, norm_eps=1e-6, init_std=0.02):
        super().__init__()
        grid = int(round(num_patches ** 0.5))
        self.predictor_embed = nn.Linear(embed_dim, pred_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pred_embed_dim))
        pos = sincos_pos_embed_2d(pred_embed_dim, grid).unsqueeze(0)  # (1, N, Dp)
        self.predictor_pos_embed = nn.Parameter(pos, requires_grad=False)
        self.predictor_blocks = _blocks(pred_embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_path_rate,
                                        norm_eps)
        self.predictor_norm = nn.LayerNorm(pred_embed_dim, eps=norm_eps)
        self.predictor_proj = nn.Linear(pred_embed_dim, embed_dim)
        _init_weights(self, init_std)
        nn.init.trunc_normal_(self.mask_token, std=init_std)
        _rescale_blocks(self.predictor_blocks)

    def forward(self, z: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        """z (B, Nc, D) context features; context_idx (B, Nc); target_idx (B, M, K) -> (B, M, K, D)."""
        B, M, K = target_idx.shape
        Nc = z.shape[1]
        pos = self.predictor_pos_embed[0]  # (N, Dp)
        x = self.predictor_embed(z) + pos[context_idx]  # (B, Nc, Dp)
        x = x.repeat_interleave(M, dim=0)  # (B*M, Nc, Dp): one sequence per target block
        m = self.mask_token + pos[target_idx.reshape(B * M, K)]  # (B*M, K, Dp): mask tokens
        x = torch.cat([x, m], dim=1)  # (B*M, Nc+K, Dp)
        for blk in self.predictor_blocks:
            x = blk(x)
        x = self.predictor_norm(x)
        x = self.predictor_proj(x[:, Nc:])  # (B*M, K, D): the mask-token outputs only
        return x.view(B, M, K, -1)


# -- optional anti-collapse regularisers (not in I-JEPA; every weight defaults to 0) --------------
# Each takes features Z of shape (N, D): N samples (images or tokens, see `IJEPA.regularised_features`), D dims.
# They run in float32 with autocast off: a covariance or a characteristic function in bf16 is mostly rounding.

VICREG_GAMMA = 1.0  # target std of every dimension (VICReg's gamma)
VICREG_EPS = 1e-4  # inside the square root, so that the std has a gradient at 0 (VICReg's epsilon)
SIGREG_T_MAX = 3.0  # Epps-Pulley integrates over t in [-t_max, t_max] (LeJEPA: 3) ...
SIGREG_KNOTS = 17  # ... with the trapezoid rule on this many knots of [0, t_max] (LeJEPA: 17)


def _float32(z: torch.Tensor):
    """(z as float32, a context that turns autocast off on z's device)."""
    return z.float(), torch.autocast(device_type=z.device.type, enabled=False)


def vicreg_variance(z: torch.Tensor, gamma: float = VICREG_GAMMA, eps: float = VICREG_EPS) -> torch.Tensor:
    """VICReg's variance hinge (Bardes et al., 2022, arXiv 2105.04906, Eq. 1), used by C-JEPA (arXiv 2410.19560):

        v(Z) = 1/D * sum_j max(0, gamma - sqrt(Var(z^j) + eps)),   gamma = 1, eps = 1e-4,

    where z^j is dimension j over the N samples and Var is the unbiased (N - 1) variance. 0 when every dimension
    has a std of at least gamma; gamma (about 1) when the samples collapse onto one point. z (N, D) -> scalar.
    """
    if z.shape[0] < 2:
        raise ValueError(f"the variance term needs at least 2 samples, got {z.shape[0]}; use a larger batch")
    z, no_autocast = _float32(z)
    with no_autocast:
        std = torch.sqrt(z.var(dim=0) + eps)  # (D,)
        return F.relu(gamma - std).mean()


def vicreg_covariance(z: torch.Tensor) -> torch.Tensor:
    """VICReg's covariance penalty (Bardes et al., 2022, arXiv 2105.04906, Eq. 3-4), used by C-JEPA:

        C(Z) = (Z - mean(Z))^T (Z - mean(Z)) / (N - 1),     c(Z) = 1/D * sum_{i != j} C(Z)_ij^2.

    0 when the dimensions are decorrelated; it does not constrain the variances on the diagonal (that is the
    variance term's job). z (N, D) -> scalar.
    """
    if z.shape[0] < 2:
        raise ValueError(f"the covariance term needs at least 2 samples, got {z.shape[0]}; use a larger batch")
    z, no_autocast = _float32(z)
    with no_autocast:
        N, D = z.shape
        zc = z - z.mean(dim=0)
        cov = zc.T @ zc / (N - 1)  # (D, D)
        off = cov - torch.diag_embed(cov.diagonal())
        return off.square().sum() / D


def epps_pulley(x: torch.Tensor, t_max: float = SIGREG_T_MAX, knots: int = SIGREG_KNOTS) -> torch.Tensor:
    """Epps-Pulley statistic of each column of x (N, K) against a standard normal, as LeJEPA uses it:

        EP(x) = N * integral_{-t_max}^{t_max} |phi_N(t) - exp(-t^2/2)|^2 * exp(-t^2/2) dt,
        phi_N(t) = 1/N sum_n exp(i t x_n)   (the empirical characteristic function),
        |phi_N(t) - exp(-t^2/2)|^2 = (1/N sum_n cos(t x_n) - exp(-t^2/2))^2 + (1/N sum_n sin(t x_n))^2.

    The integrand is even in t, so it is integrated over [0, t_max] with the trapezoid rule on `knots` points and
    doubled. For N standard-normal samples the expected value is about 1.06 whatever N (integral of
    (1 - exp(-t^2)) exp(-t^2/2)); for N equal samples it is about 0.41 * N. -> (K,)
    """
    x, no_autocast = _float32(x)
    with no_autocast:
        N = x.shape[0]
        t = torch.linspace(0.0, t_max, knots, device=x.device)  # (T,)
        gauss = torch.exp(-0.5 * t.square())  # the N(0, 1) characteristic function, also the weight w(t)
        trap = torch.full_like(t, t_max / (knots - 1))
        trap[0] = trap[-1] = 0.5 * t_max / (knots - 1)  # trapezoid weights on [0, t_max]
        weight = 2.0 * trap * gauss  # x2: the half line [-t_max, 0] by symmetry
        xt = x.unsqueeze(-1) * t  # (N, K, T)
        re = torch.cos(xt).mean(dim=0) - gauss  # (K, T)
        im = torch.sin(xt).mean(dim=0)
        return N * (re.square() + im.square()) @ weight  # (K,)


def sigreg(z: torch.Tensor, num_projections: int = 256, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """LeJEPA's Sketched Isotropic Gaussian Regularisation (Balestriero & LeCun, 2025, arXiv 2511.08544):

        SIGReg(Z) = 1/K * sum_k EP(Z a_k),   a_k = g_k / ||g_k||,  g_k ~ N(0, I_D),  k = 1..K,

    the mean Epps-Pulley statistic (`epps_pulley`) of the N samples projected on K random unit directions. By
    Cramer-Wold, every 1-D projection of Z is N(0, 1) exactly when Z is an isotropic Gaussian N(0, I), so this
    pulls the features towards one; it is small (about 1.06) for such features and grows like N for collapsed
    ones. The directions are drawn afresh at every call, on the CPU, from `generator` or else torch's global
    generator (which checkpoints save, so a resumed run draws the same ones). z (N, D) -> scalar.
    """
    if z.shape[0] < 2:
        raise ValueError(f"SIGReg needs at least 2 samples, got {z.shape[0]}; use a larger batch")
    g = torch.randn(z.shape[-1], num_projections, generator=generator)  # (D, K) on the CPU
    a = (g / g.norm(dim=0, keepdim=True)).to(z.device)
    z, no_autocast = _float32(z)
    with no_autocast:
        return epps_pulley(z @ a).mean()


class Expander(nn.Module):
    """VICReg's expander (Bardes et al., 2022, Sec. 4.2): the variance and covariance terms act on
    h = expander(y) rather than on the representation y itself, through an MLP of three linear layers, the first
    two followed by batch norm and ReLU (VICReg: 8192 wide). Downstream tasks use y, not h. Whitening h leaves y
    free to keep most of its variance in a few directions (VICReg reports y better than h for linear probes);
    the terms on y itself spread its variance over every dimension.

    (N, D) -> (N, width). Used only through `IJEPA.regularisers` (`model.reg_expander`, off by default).
    """

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                                 nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                                 nn.Linear(width, width))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=y.device.type, enabled=False):
            return self.net(y.float())


# -- I-JEPA -------------------------------------------------------------------------------------

@dataclass
class IJEPAOutput:
    """Everything one forward pass computed, so that notebooks need no hooks.

    loss:    scalar
    pred:    (B, M, K, D) predicted target features (or (B, M, K, p*p*C) normalised pixels)
    target:  (B, M, K, D) target features s_y(i), no grad
    context: (B, Nc, D) context-encoder features s_x
    masks:   the `Masks` used
    loss_terms: the unweighted parts of `loss`, for logging: always 'pred' (the prediction loss), plus 'var',
             'cov' and 'sigreg' for each regulariser whose weight is > 0 (loss = pred + sum of weight * term)
    """

    loss: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    context: torch.Tensor
    masks: Masks
    loss_terms: dict = field(default_factory=dict)


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in raster order, pixels (row, col, channel) inside a patch."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


class IJEPA(nn.Module):
    """Context encoder f_theta, target encoder f_theta_bar (EMA copy, no gradients) and predictor g_phi.

    Args:
        cfg: `ModelConfig`; `cfg.target='pixels'` predicts per-patch normalised pixels (MAE-style) through a
            linear `pixel_head` instead of target-encoder features (paper Table 7 ablation).
        ema: keep an EMA target encoder (paper). False: the target is the context encoder under stop-grad.
    """

    def __init__(self, cfg: ModelConfig, ema: bool = True):
        super().__init__()
        self.cfg = cfg
        enc_kwargs = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                          embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                          mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, drop_path_rate=cfg.drop_path_rate,
                          norm_eps=cfg.norm_eps, init_std=cfg.init_std)
        self.encoder = VisionTransformer(**enc_kwargs)
        self.predictor = Predictor(self.encoder.num_patches, cfg.embed_dim, cfg.pred_embed_dim, cfg.pred_depth,
                                   cfg.pred_num_heads or cfg.num_heads, cfg.pred_mlp_ratio or cfg.mlp_ratio,
                                   cfg.qkv_bias,
                                   cfg.drop_path_rate, cfg.norm_eps, cfg.init_std)
        self.target_encoder = None
        if ema:
            self.target_encoder = copy.deepcopy(self.encoder)  # starts equal to the context encoder
            self.target_encoder.requires_grad_(False)
        self.expander = None  # VICReg's expander: used by the optional regularisers only, never evaluated
        if cfg.reg_expander > 0 and (cfg.var_weight > 0 or cfg.cov_weight > 0 or cfg.sigreg_weight > 0):
            self.expander = Expander(cfg.embed_dim, cfg.reg_expander)
        if cfg.reg_dims > 0:  # a fixed random orthonormal (D, k) basis, the same for every seed; not learned
            q, _ = torch.linalg.qr(torch.randn(cfg.embed_dim, cfg.reg_dims, generator=torch.Generator().manual_seed(0)))
            self.register_buffer("reg_basis", q, persistent=False)  # (D, k)
        self.pixel_head = None
        if cfg.target == "pixels":
            self.pixel_head = nn.Linear(cfg.embed_dim, cfg.patch_size ** 2 * cfg.in_chans)
            _init_weights(self.pixel_head, cfg.init_std)

    @property
    def target_network(self) -> VisionTransformer:
        """The network that makes targets and is evaluated: the EMA encoder, or the context encoder."""
        return self.target_encoder if self.target_encoder is not None else self.encoder

    # -- the stages of the paper ---------------------------------------------------------------
    @torch.no_grad()
    def forward_target(self, images: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        """s_y(i): encode the FULL image, layer-norm (no affine), then select the targets.

        images (B, C, H, W), target_idx (B, M, K) -> (B, M, K, D). No gradient flows.
        """
        if self.cfg.target == "pixels":
            pix = patchify(images, self.cfg.patch_size)  # (B, N, p*p*C)
            pix = F.layer_norm(pix.float(), pix.shape[-1:], eps=1e-6)  # per-patch normalised pixels, as MAE
            return gather_tokens(pix, target_idx)
        if self.cfg.target_layers == 1:
            h = self.target_network(images)  # (B, N, D): all patches
        else:  # option, not the paper: the mean of the last K blocks' normed outputs, as data2vec averages them
            h = torch.stack(self.target_network.intermediate_layers(images, self.cfg.target_layers)).mean(0)
        h = h.float()
        if self.cfg.target_norm == "instance":  # option, not the paper: each feature over the image's N tokens,
            h = F.instance_norm(h.transpose(1, 2)).transpose(1, 2)  # so what all patches share is taken out
        h = F.layer_norm(h, h.shape[-1:])  # over the features, no learned affine
        return gather_tokens(h, target_idx)  # masking is applied to the output, not the input

    def forward_context(self, images: torch.Tensor, context_idx: torch.Tensor) -> torch.Tensor:
        """s_x: the context encoder on the kept patches only. (B, C, H, W), (B, Nc) -> (B, Nc, D)."""
        return self.encoder(images, keep=context_idx)

    def predict(self, z: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        """s_hat_y(i) = g_phi(s_x, mask tokens at B_i): (B, Nc, D) -> (B, M, K, D)."""
        pred = self.predictor(z, context_idx, target_idx)
        return self.pixel_head(pred) if self.pixel_head is not None else pred

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean smooth-L1 (official code) or mean squared error (the paper's L2) over all elements."""
        fn = F.smooth_l1_loss if self.cfg.loss == "smooth_l1" else F.mse_loss
        return fn(pred.float(), target.float())

    def regularised_features(self, z: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """The samples (N, D) that the optional regularisers see, chosen by `cfg.reg_features`:

        * 'context': the per-image mean of the context encoder's tokens, (B, Nc, D) -> (B, D). One sample per
          image, as VICReg and LeJEPA regularise one embedding per image and view, and as C-JEPA regularises
          "the mean of patch representations"; gradients reach the context encoder only.
        * 'predictor': every predicted target token, (B, M, K, D) -> (B*M*K, D); gradients reach the predictor
          and, through it, the context encoder.

        With `cfg.reg_expander` > 0 these samples go through VICReg's `Expander` first: (N, D) -> (N, width).
        With `cfg.reg_dims` = k > 0 they are projected on a fixed random k-dim subspace: (N, D) -> (N, k), so the
        terms ask for k spread directions, not D.
        """
        if self.cfg.reg_features == "predictor":
            feats = pred.reshape(-1, pred.shape[-1])
        else:
            feats = z.float().mean(dim=1)
        if self.cfg.reg_dims > 0:
            feats = feats.float() @ self.reg_basis  # (N, D) @ (D, k) -> (N, k)
        return feats if self.expander is None else self.expander(feats)

    def regularisers(self, z: torch.Tensor, pred: torch.Tensor) -> dict:
        """The unweighted optional terms whose weight in `cfg` is > 0: {'var': v(Z), 'cov': c(Z),
        'sigreg': SIGReg(Z)} on Z = `regularised_features(z, pred)` (equations in `vicreg_variance`,
        `vicreg_covariance`, `sigreg`). Empty with the defaults, so the paper's loss is untouched.

        C-JEPA (arXiv 2410.19560) also adds VICReg's invariance term between two augmented views of an image;
        this pipeline encodes one view per image, so only the variance and covariance terms are offered.
        Under DDP each process regularises its own share of the batch.
        """
        c, terms = self.cfg, {}
        if not (c.var_weight > 0 or c.cov_weight > 0 or c.sigreg_weight > 0):
            return terms
        feats = self.regularised_features(z, pred)
        if c.var_weight > 0:
            terms["var"] = vicreg_variance(feats, gamma=c.var_gamma)
        if c.cov_weight > 0:
            terms["cov"] = vicreg_covariance(feats)
        if c.sigreg_weight > 0:
            terms["sigreg"] = sigreg(feats, c.sigreg_projections)
        return terms

    def forward(self, images: torch.Tensor, masks: Masks) -> IJEPAOutput:
        """One I-JEPA step's forward: targets, context, predictions and loss (plus any optional regulariser:
        loss = pred + var_weight * v(Z) + cov_weight * c(Z) + sigreg_weight * SIGReg(Z), see `regularisers`)."""
        target = self.forward_target(images, masks.targets)  # (B, M, K, D)
        z = self.forward_context(images, masks.context)  # (B, Nc, D)
        pred = self.predict(z, masks.context, masks.targets)  # (B, M, K, D)
        loss = self.loss(pred, target)
        terms = {"pred": loss}
        for name, value in self.regularisers(z, pred).items():
            loss = loss + getattr(self.cfg, f"{name}_weight") * value
            terms[name] = value
        return IJEPAOutput(loss, pred, target, z, masks, terms)

    # -- EMA ------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """theta_bar <- momentum * theta_bar + (1 - momentum) * theta, on every parameter of the encoder.

        Written here rather than with timm's ModelEma because I-JEPA's momentum follows its own per-step
        schedule and the target must stay a plain module named `target_encoder`, as in the checkpoints.
        That schedule (`schedules.schedule`) is m(s) = ema_start + (ema_end - ema_start) * min(s / total, 1); with the
        optional EMA warmup (optim.ema_warmup_epochs > 0, W steps) it is instead
        m(s) = ema_warmup_start + (m(W) - ema_warmup_start) * s / W for s < W: a faster-moving target early on.
        """
        if self.target_encoder is None:
            return
        tgt = [p for p in self.target_encoder.parameters()]
        src = [p.detach() for p in self.encoder.parameters()]
        torch._foreach_lerp_(tgt, src, 1.0 - momentum)  # t + (1-m)(s - t) = m t + (1-m) s


def set_attention(model: nn.Module, impl: str) -> nn.Module:
    """Choose how timm's attention layers compute softmax(q k^T / sqrt(d)) v: 'sdpa' (fused
    F.scaled_dot_product_attention) or 'math' (explicit matmuls). Same result up to rounding; which is faster
    depends on the device and dtype (see `ijepa-viz bench`)."""
    if impl not in ("sdpa", "math"):
        raise ValueError(f"attention implementation {impl!r} must be 'sdpa' or 'math'")
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = impl == "sdpa"
    return model


def build_model(cfg: ModelConfig, ema: bool = True) -> IJEPA:
    """An `IJEPA` built from a `ModelConfig`."""
    return IJEPA(cfg, ema=ema)


# -- collapse metrics -------------------------------------------------------------------------------
# Here rather than in evaluate.py so that the Trainer can watch for collapse without importing the evaluation
# layer (evaluate imports train); `ijepa_viz.evaluate` re-exports both.

def feature_std(x) -> float:
    """Mean over dimensions of the per-dimension std of the L2-normalised features x (N, D) (or (..., D)).

    0 when every feature vector points the same way (collapse); about 1/sqrt(D) when they spread evenly over
    the sphere (SimSiam's collapse monitor, Chen & He, 2021).
    """
    x = torch.as_tensor(x)
    x = F.normalize(x.float().reshape(-1, x.shape[-1]), dim=1)  # (N, D)
    return float(x.std(dim=0, correction=0).mean())


def rankme(x, eps: float = 1e-7) -> float:
    """Effective rank of features x (N, D) (RankMe, Garrido et al., 2023): exp(-sum_k p_k log p_k) with
    p_k = s_k / sum(s) + eps over the singular values s_k. Between 1 (collapse to a line) and min(N, D)."""
    x = torch.as_tensor(x)
    x = x.float().reshape(-1, x.shape[-1])  # (N, D)
    s = torch.linalg.svdvals(x)  # (min(N, D),)
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))
