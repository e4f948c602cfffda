"""An independent, functional re-statement of the official I-JEPA computations, for tests only.

Everything here is written from the *description* of facebookresearch/ijepa (vision_transformer.py, masks/utils.py,
utils/tensors.py, train.py) with plain torch ops on a state dict whose keys follow the official checkpoint names.
It shares no code with `ijepa_viz.model`, so agreement between the two is evidence that the package computes what
the official code computes:

* attention: explicit qkv reshape to (3, B, heads, N, head_dim), q @ k^T * head_dim**-0.5, softmax, @ v, proj;
* pre-norm blocks with LayerNorm eps 1e-6 and exact-erf GELU in the MLP;
* 2-D sin-cos positions computed with numpy in the MAE layout: the first half of the channels encodes the column
  coordinate, the second half the row coordinate, each half [sin | cos] of pos * 10000**(-k/(D/4));
* masks as the official code passes them: a *list* of (B, K) index tensors, gathered one by one and concatenated
  along the batch, so rows are mask-major (row m*B + b);
* the predictor in the official order: embed D -> Dp, add positions at the context indices, one mask token per
  target patch (shared vector + position), context repeated mask-major, concat, blocks, norm, keep the last
  tokens, project Dp -> D;
* targets: encoder on the full image, layer_norm over features (no affine, torch's default eps), then gather.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

LN_EPS = 1e-6  # the official blocks and final norms use LayerNorm(eps=1e-6)


# -- positions ----------------------------------------------------------------------------------

def ref_sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(P,) positions -> (P, dim): [sin(p * w_k) for k] ++ [cos(p * w_k) for k], w_k = 1 / 10000**(k / (dim/2))."""
    assert dim % 2 == 0
    half = dim // 2
    freqs = np.array([1.0 / (10000.0 ** (k / (dim / 2.0))) for k in range(half)], dtype=np.float64)
    p = np.asarray(positions, dtype=np.float64).reshape(-1)
    angles = p[:, None] * freqs[None, :]  # (P, dim/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def ref_sincos_2d(dim: int, grid: int) -> np.ndarray:
    """(grid*grid, dim) float64. Patch n = row * grid + col. Channels [0, dim/2) encode the column (the official
    code builds its meshgrid with the width coordinate first and encodes that component first), channels
    [dim/2, dim) encode the row."""
    assert dim % 4 == 0
    rows = np.repeat(np.arange(grid), grid)  # row of patch n
    cols = np.tile(np.arange(grid), grid)  # column of patch n
    return np.concatenate([ref_sincos_1d(dim // 2, cols), ref_sincos_1d(dim // 2, rows)], axis=1)


# -- masks --------------------------------------------------------------------------------------

def ref_apply_masks(x: torch.Tensor, masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """x (B, N, D), masks: list of (B, K) index tensors -> (len(masks) * B, K, D), mask-major."""
    out = []
    for idx in masks:
        rows = []
        for b in range(x.shape[0]):
            rows.append(x[b, idx[b]])  # (K, D): plain advanced indexing, no gather
        out.append(torch.stack(rows))
    return torch.cat(out, dim=0)


def ref_repeat_interleave_batch(x: torch.Tensor, B: int, repeat: int) -> torch.Tensor:
    """Rows are groups of B; repeat each group `repeat` times in place: [g0 g0 g1 g1 ...] for repeat=2."""
    groups = [x[i * B:(i + 1) * B] for i in range(len(x) // B)]
    return torch.cat([g for g in groups for _ in range(repeat)], dim=0)


# -- layers -------------------------------------------------------------------------------------

def _ln(x, sd, key, eps=LN_EPS):
    return F.layer_norm(x, (x.shape[-1],), sd[key + ".weight"], sd[key + ".bias"], eps)


def _linear(x, sd, key):
    w = sd[key + ".weight"]
    b = sd.get(key + ".bias")
    y = x @ w.t()
    return y + b if b is not None else y


def ref_attention(x: torch.Tensor, sd: dict, key: str, num_heads: int) -> torch.Tensor:
    B, N, C = x.shape
    hd = C // num_heads
    qkv = _linear(x, sd, key + ".qkv")  # (B, N, 3C)
    qkv = qkv.reshape(B, N, 3, num_heads, hd).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q @ k.transpose(-2, -1)) * (hd ** -0.5)  # (B, h, N, N)
    weights = torch.softmax(logits, dim=-1)
    y = (weights @ v).transpose(1, 2).reshape(B, N, C)
    return _linear(y, sd, key + ".proj")


def ref_mlp(x: torch.Tensor, sd: dict, key: str) -> torch.Tensor:
    return _linear(F.gelu(_linear(x, sd, key + ".fc1")), sd, key + ".fc2")


def ref_block(x: torch.Tensor, sd: dict, key: str, num_heads: int) -> torch.Tensor:
    x = x + ref_attention(_ln(x, sd, key + ".norm1"), sd, key + ".attn", num_heads)
    x = x + ref_mlp(_ln(x, sd, key + ".norm2"), sd, key + ".mlp")
    return x


def _depth(sd: dict, blocks_key: str) -> int:
    ids = {int(k[len(blocks_key) + 1:].split(".")[0]) for k in sd if k.startswith(blocks_key + ".")}
    return max(ids) + 1 if ids else 0


# -- networks -----------------------------------------------------------------------------------

def ref_patch_embed(sd: dict, prefix: str, images: torch.Tensor) -> torch.Tensor:
    """Non-overlapping patches through the conv weights, written as unfold + matmul: (B, C, H, W) -> (B, N, D)."""
    w = sd[prefix + "patch_embed.proj.weight"]  # (D, C, p, p)
    b = sd[prefix + "patch_embed.proj.bias"]
    D, C, p, _ = w.shape
    B, _, H, W = images.shape
    cols = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p)
    cols = cols.reshape(B, (H // p) * (W // p), C * p * p)
    return cols @ w.reshape(D, C * p * p).t() + b


def ref_encoder(sd: dict, prefix: str, images: torch.Tensor, masks_list: Optional[list] = None,
                num_heads: int = 1) -> torch.Tensor:
    """Official encoder forward: patches + positions, then apply_masks (mask-major), blocks, final norm."""
    x = ref_patch_embed(sd, prefix, images) + sd[prefix + "pos_embed"]
    if masks_list is not None:
        x = ref_apply_masks(x, masks_list)
    for i in range(_depth(sd, prefix + "blocks")):
        x = ref_block(x, sd, f"{prefix}blocks.{i}", num_heads)
    return _ln(x, sd, prefix + "norm")


def ref_predictor(sd: dict, prefix: str, z: torch.Tensor, masks_x: list, masks: list,
                  num_heads: int = 1) -> torch.Tensor:
    """Official predictor forward. z: (len(masks_x) * B, Nc, D). Returns (len(masks) * len(masks_x) * B, K, D),
    row m*B + b for one context mask."""
    B = z.shape[0] // len(masks_x)
    pos = sd[prefix + "predictor_pos_embed"]  # (1, N, Dp)
    x = _linear(z, sd, prefix + "predictor_embed")
    x = x + ref_apply_masks(pos.expand(B, -1, -1), masks_x)
    n_ctx = x.shape[1]
    tgt_pos = ref_apply_masks(pos.expand(B, -1, -1), masks)  # (M*B, K, Dp)
    tgt_pos = ref_repeat_interleave_batch(tgt_pos, B, repeat=len(masks_x))
    tokens = sd[prefix + "mask_token"] + tgt_pos  # shared vector + position at each target index
    x = torch.cat([x.repeat(len(masks), 1, 1), tokens], dim=1)  # context repeated mask-major
    for i in range(_depth(sd, prefix + "predictor_blocks")):
        x = ref_block(x, sd, f"{prefix}predictor_blocks.{i}", num_heads)
    x = _ln(x, sd, prefix + "predictor_norm")
    return _linear(x[:, n_ctx:], sd, prefix + "predictor_proj")


def ref_forward_target(sd: dict, prefix: str, images: torch.Tensor, masks_pred: list, num_heads: int = 1,
                       n_context_masks: int = 1) -> torch.Tensor:
    """Official targets: full image through the target encoder, layer_norm over features (default eps, no
    affine), then apply_masks: (M*B, K, D)."""
    h = ref_encoder(sd, prefix, images, None, num_heads)
    h = F.layer_norm(h, (h.shape[-1],))
    B = h.shape[0]
    h = ref_apply_masks(h, masks_pred)
    return ref_repeat_interleave_batch(h, B, repeat=n_context_masks)


# -- official-format weights ------------------------------------------------------------------

def _block_shapes(prefix: str, dim: int, hidden: int) -> dict:
    return {
        prefix + ".norm1.weight": (dim,), prefix + ".norm1.bias": (dim,),
        prefix + ".attn.qkv.weight": (3 * dim, dim), prefix + ".attn.qkv.bias": (3 * dim,),
        prefix + ".attn.proj.weight": (dim, dim), prefix + ".attn.proj.bias": (dim,),
        prefix + ".norm2.weight": (dim,), prefix + ".norm2.bias": (dim,),
        prefix + ".mlp.fc1.weight": (hidden, dim), prefix + ".mlp.fc1.bias": (hidden,),
        prefix + ".mlp.fc2.weight": (dim, hidden), prefix + ".mlp.fc2.bias": (dim,),
    }


def official_encoder_shapes(img_size, patch_size, in_chans, embed_dim, depth, mlp_ratio=4.0) -> dict:
    """Key -> shape of an official encoder state dict (no `module.` prefix)."""
    n = (img_size // patch_size) ** 2
    shapes = {"pos_embed": (1, n, embed_dim),
              "patch_embed.proj.weight": (embed_dim, in_chans, patch_size, patch_size),
              "patch_embed.proj.bias": (embed_dim,)}
    for i in range(depth):
        shapes.update(_block_shapes(f"blocks.{i}", embed_dim, int(embed_dim * mlp_ratio)))
    shapes.update({"norm.weight": (embed_dim,), "norm.bias": (embed_dim,)})
    return shapes


def official_predictor_shapes(num_patches, embed_dim, pred_dim, depth, mlp_ratio=4.0) -> dict:
    """Key -> shape of an official predictor state dict (no `module.` prefix)."""
    shapes = {"mask_token": (1, 1, pred_dim), "predictor_pos_embed": (1, num_patches, pred_dim),
              "predictor_embed.weight": (pred_dim, embed_dim), "predictor_embed.bias": (pred_dim,)}
    for i in range(depth):
        shapes.update(_block_shapes(f"predictor_blocks.{i}", pred_dim, int(pred_dim * mlp_ratio)))
    shapes.update({"predictor_norm.weight": (pred_dim,), "predictor_norm.bias": (pred_dim,),
                   "predictor_proj.weight": (embed_dim, pred_dim), "predictor_proj.bias": (embed_dim,)})
    return shapes


def _random_weights(shapes: dict, gen: torch.Generator, pos_keys: dict) -> dict:
    out = {}
    for key, shape in shapes.items():
        if key in pos_keys:
            out[key] = pos_keys[key]
        elif "norm" in key and key.endswith(".weight"):
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)  # non-trivial affine
        elif key.endswith(".bias"):
            out[key] = 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            out[key] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    return out


def fake_official_checkpoint(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, pred_dim=16,
                             pred_depth=1, mlp_ratio=4.0, seed=0) -> dict:
    """A checkpoint dict in the official format (`module.`-prefixed weights, the official keys), random
    weights and fixed sin-cos positions from `ref_sincos_2d`."""
    g = torch.Generator().manual_seed(seed)
    grid = img_size // patch_size
    enc_shapes = official_encoder_shapes(img_size, patch_size, in_chans, embed_dim, depth, mlp_ratio)
    pred_shapes = official_predictor_shapes(grid * grid, embed_dim, pred_dim, pred_depth, mlp_ratio)
    enc_pos = {"pos_embed": torch.from_numpy(ref_sincos_2d(embed_dim, grid)).float().unsqueeze(0)}
    pred_pos = {"predictor_pos_embed": torch.from_numpy(ref_sincos_2d(pred_dim, grid)).float().unsqueeze(0)}
    encoder = _random_weights(enc_shapes, g, enc_pos)
    target = _random_weights(enc_shapes, g, enc_pos)
    predictor = _random_weights(pred_shapes, g, pred_pos)

    def mod(sd):
        return {"module." + k: v for k, v in sd.items()}

    return {"encoder": mod(encoder), "predictor": mod(predictor), "target_encoder": mod(target),
            "opt": None, "scaler": None, "epoch": 1, "loss": 0.0, "batch_size": 8, "world_size": 1, "lr": 1e-3}


def strip_module(sd: dict) -> dict:
    """Drop a leading `module.` from every key (DDP checkpoints)."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
