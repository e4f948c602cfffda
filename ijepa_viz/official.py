"""Interop with the official I-JEPA: its checkpoints, the released weights by name, and safetensors / timm export.

Read top to bottom:

1. **Official checkpoints** (facebookresearch/ijepa `.pth.tar`): `load_official` reads one without running any
   pickled code, infers the architecture from the tensor shapes (`infer_model_config`) and loads the context
   encoder, the EMA target encoder AND the predictor with `strict=True`.
2. **Export**: `export_safetensors` / `import_safetensors` (weights + `config.json`, exact round trip), and
   `export_timm_encoder`, a state dict that timm's `VisionTransformer(class_token=False, global_pool='avg')`
   loads with `strict=True`.
3. **Hub**: `load_pretrained(name)` downloads a released checkpoint by its official name (full model) or builds
   a timm model such as `vit_huge_patch14_gap_224.in1k_ijepa` (encoder only).

The command line: `ijepa-viz convert --official FILE.pth.tar --out DIR [--timm]` (or `--checkpoint
run/checkpoint.pt`), in `ijepa_viz.cli`. Atomic writes, safe loads and `load_weights` come from
`ijepa_viz.checkpoint`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
import uuid
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from ijepa_viz.checkpoint import (CheckpointError, _atomic_text, _check_file, _is_code_refusal, _refused,
                                  _try_meta_build, _unreadable, atomic_save, atomic_write, build_for, load_weights)
from ijepa_viz.config import Config, ConfigError, ModelConfig, get_preset

EXPORT_FORMAT_VERSION = 1  # bump when the layout of model.safetensors + config.json changes
_OFFICIAL_FIX = "Pass an official I-JEPA .pth.tar (download it again if it was cut off)"


# =============================================================================================
# 1. Official checkpoints (facebookresearch/ijepa)
# =============================================================================================

# Attention heads of the official widths (src/models/vision_transformer.py: vit_tiny ... vit_giant). Heads
# cannot be read off the weights (the qkv matrix is the same for any split), so unknown widths need num_heads.
KNOWN_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}

# The released checkpoints: name -> (url, what it is). timm's names for the same files in TIMM_NAMES.
RELEASES = {
    "IN1K-vit.h.14-300e": ("https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.14-300e.pth.tar",
                           "ViT-H/14, 224 px, ImageNet-1k, 300 epochs"),
    "IN1K-vit.h.16-448px-300e": ("https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.16-448px-300e.pth.tar",
                                 "ViT-H/16, 448 px, ImageNet-1k, 300 epochs"),
    "IN22K-vit.h.14-900e": ("https://dl.fbaipublicfiles.com/ijepa/IN22K-vit.h.14-900e.pth.tar",
                            "ViT-H/14, 224 px, ImageNet-22k, 900 epochs"),
    "IN22K-vit.g.16-600e": ("https://dl.fbaipublicfiles.com/ijepa/IN22K-vit.g.16-600e.pth.tar",
                            "ViT-g/16, 224 px, ImageNet-22k, 600 epochs"),
}
TIMM_NAMES = {
    "vit_huge_patch14_gap_224.in1k_ijepa": "IN1K-vit.h.14-300e",
    "vit_huge_patch16_gap_448.in1k_ijepa": "IN1K-vit.h.16-448px-300e",
    "vit_huge_patch14_gap_224.in22k_ijepa": "IN22K-vit.h.14-900e",
    "vit_giant_patch16_gap_224.in22k_ijepa": "IN22K-vit.g.16-600e",
}
_OFFICIAL_WEIGHTS = ("encoder", "predictor", "target_encoder")

# Modules whose names in a pickle mean it wants to run code: such a file is refused outright.
_CODE_MODULES = {"builtins", "__builtin__", "os", "posix", "nt", "sys", "subprocess", "shutil", "importlib",
                 "runpy", "code", "codeop", "pickle", "_pickle", "marshal", "types", "ctypes", "socket", "pty",
                 "webbrowser", "functools", "operator", "io", "pathlib", "tempfile", "multiprocessing",
                 "threading", "signal", "timeit", "pdb", "bdb", "torch", "numpy", "_codecs", "codecs"}


class _Inert:
    """Stands in for a class or function a pickle names that `weights_only` does not allow (e.g. an exotic
    optimiser entry). Creating, filling or building one only stores its arguments: nothing is ever called."""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state, obj.items = args, None, []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items.append((key, value))

    def append(self, item):
        self.items.append(item)

    def extend(self, items):
        self.items.extend(items)


def _contains_inert(obj: Any, depth: int = 0) -> bool:
    if isinstance(obj, _Inert):
        return True
    if depth > 50:
        return False
    if isinstance(obj, dict):
        return any(_contains_inert(k, depth + 1) or _contains_inert(v, depth + 1) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set)):
        return any(_contains_inert(v, depth + 1) for v in obj)
    return False


def _torch_load_weights_only(path: Path) -> Any:
    """torch.load(weights_only=True), memory-mapped when the file allows it (a ViT-H file is 2.5 GB)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zip" not in str(e).lower():
            raise
    return torch.load(path, map_location="cpu", weights_only=True)


_UNSUPPORTED = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")


def _load_untrusted(path: Path) -> Any:
    """Load a checkpoint we did not write, running none of its pickled code.

    First a plain `weights_only=True` load. If that refuses a global that is not a code module (say, an
    optimiser-state class of some library), the load is retried with that name mapped to `_Inert`, a
    placeholder that stores its arguments and runs nothing; entries holding placeholders are dropped later.
    Names from code modules (os, subprocess, builtins, ...) are refused outright.
    """
    _check_file(path)
    stubbed: list[str] = []
    for _ in range(64):
        try:
            with torch.serialization.safe_globals([(_Inert, name) for name in stubbed]):
                return _torch_load_weights_only(path)
        except pickle.UnpicklingError as e:
            if not _is_code_refusal(str(e)):
                raise _unreadable(path, e, _OFFICIAL_FIX) from None
            found = _UNSUPPORTED.search(str(e))
            name = found.group(1) if found else None
            if name is None or "." not in name or name.split(".")[0] in _CODE_MODULES or name in stubbed:
                raise _refused(path) from None
            stubbed.append(name)
        except Exception as e:  # noqa: BLE001 - truncated zip, text, random bytes: torch raises many kinds
            raise _unreadable(path, e, _OFFICIAL_FIX) from None
    raise _refused(path)


def strip_prefix(sd: dict, prefix: str = "module.") -> dict:
    """Drop a leading `prefix` (DDP's `module.`) from every key that has it."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


def _block_ids(sd: dict, key: str, what: str) -> int:
    """Number of blocks `key.0 ... key.(n-1)` in `sd`; a gap in the numbering is an error."""
    ids = sorted({int(m.group(1)) for k in sd for m in [re.match(rf"{re.escape(key)}\.(\d+)\.", k)] if m})
    if ids != list(range(len(ids))):
        raise CheckpointError(f"{what}: the {key}.N entries are numbered {ids[:8]}..., not 0..{len(ids) - 1}; "
                              f"the state dict is incomplete")
    return len(ids)


def _mlp_ratio(hidden: int, dim: int) -> float:
    """hidden / dim, as the float whose `int(dim * ratio)` gives back `hidden` (timm's Mlp rounds down)."""
    ratio = hidden / dim
    while int(dim * ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _need(sd: dict, keys: tuple, what: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        found = ", ".join(list(sd)[:4]) or "nothing"
        raise CheckpointError(f"{what} has no {', '.join(missing)} (found e.g. {found}); "
                              f"it is not an I-JEPA ViT in the official layout")


def infer_encoder_config(sd: dict, *, num_heads: Optional[int] = None, what: str = "the encoder") -> dict:
    """Architecture of a ViT encoder state dict (official / timm names), from tensor shapes alone.

    Returns a dict of `ModelConfig` fields: img_size, patch_size, in_chans, embed_dim, depth, num_heads,
    mlp_ratio, qkv_bias. Works on meta tensors (shapes only).
    """
    _need(sd, ("pos_embed", "patch_embed.proj.weight", "norm.weight"), what)
    w = sd["patch_embed.proj.weight"]  # (D, C, p, p)
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise CheckpointError(f"{what}: patch_embed.proj.weight has shape {tuple(w.shape)}, not (D, C, p, p) "
                              f"with square patches")
    dim, chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    pos = sd["pos_embed"]  # (1, N, D)
    if pos.ndim != 3 or pos.shape[-1] != dim:
        raise CheckpointError(f"{what}: pos_embed has shape {tuple(pos.shape)}, which does not fit the patch "
                              f"embedding's width {dim} (expected (1, N, {dim}))")
    n = int(pos.shape[1])
    grid = math.isqrt(n)
    if grid * grid != n:
        extra = " (one more than a square: it has a class token, which I-JEPA encoders do not)" \
            if math.isqrt(n - 1) ** 2 == n - 1 else ""
        raise CheckpointError(f"{what}: pos_embed holds {n} positions, not a square grid{extra}")
    depth = _block_ids(sd, "blocks", what)
    if depth == 0:
        raise CheckpointError(f"{what} has no blocks.0.* weights; it is not a ViT encoder")
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    if fc1 is None or fc1.ndim != 2 or fc1.shape[1] != dim:
        raise CheckpointError(f"{what}: blocks.0.mlp.fc1.weight is missing or does not take width {dim}")
    heads = num_heads if num_heads is not None else KNOWN_HEADS.get(dim)
    if heads is None:
        raise CheckpointError(f"{what} is {dim} wide, not one of the official widths "
                              f"({', '.join(f'{d}: {h} heads' for d, h in KNOWN_HEADS.items())}); attention heads "
                              f"cannot be read from the weights: pass num_heads= (CLI: --num-heads N)")
    if dim % heads:
        raise CheckpointError(f"{what}: width {dim} is not divisible by {heads} heads; pass the right num_heads")
    return dict(img_size=grid * patch, patch_size=patch, in_chans=chans, embed_dim=dim, depth=depth,
                num_heads=int(heads), mlp_ratio=_mlp_ratio(int(fc1.shape[0]), dim),
                qkv_bias="blocks.0.attn.qkv.bias" in sd)


def infer_predictor_config(sd: dict, embed_dim: int, num_patches: int, what: str = "the predictor") -> dict:
    """Predictor width, depth and MLP ratio from an official predictor state dict (shapes only).

    Returns {'pred_embed_dim', 'pred_depth', 'pred_mlp_ratio'}; checks that it fits an encoder of width
    `embed_dim` with `num_patches` patches.
    """
    _need(sd, ("predictor_embed.weight", "mask_token", "predictor_pos_embed", "predictor_proj.weight"), what)
    emb = sd["predictor_embed.weight"]  # (Dp, D)
    pdim = int(emb.shape[0])
    if emb.shape[1] != embed_dim:
        raise CheckpointError(f"{what}: predictor_embed takes width {emb.shape[1]}, but the encoder is "
                              f"{embed_dim} wide; the predictor and encoder come from different models")
    if sd["predictor_proj.weight"].shape[0] != embed_dim:
        raise CheckpointError(f"{what}: predictor_proj maps to width {sd['predictor_proj.weight'].shape[0]}, "
                              f"but the encoder is {embed_dim} wide")
    pos = sd["predictor_pos_embed"]
    if tuple(pos.shape) != (1, num_patches, pdim):
        raise CheckpointError(f"{what}: predictor_pos_embed has shape {tuple(pos.shape)}, but the encoder has "
                              f"{num_patches} patches and the predictor is {pdim} wide "
                              f"(expected (1, {num_patches}, {pdim}))")
    depth = _block_ids(sd, "predictor_blocks", what)
    if depth == 0:
        raise CheckpointError(f"{what} has no predictor_blocks.0.* weights")
    fc1 = sd["predictor_blocks.0.mlp.fc1.weight"]
    return dict(pred_embed_dim=pdim, pred_depth=depth, pred_mlp_ratio=_mlp_ratio(int(fc1.shape[0]), pdim))


def infer_model_config(encoder_sd: dict, predictor_sd: dict, *,
                       num_heads: Optional[int] = None) -> tuple[ModelConfig, float]:
    """(ModelConfig, predictor MLP ratio) of official encoder + predictor state dicts (no `module.` prefix).

    Predictor heads = encoder heads, as the official `init_model`. The official predictor always has
    mlp_ratio 4 while ViT-g's encoder has 48/11: that lands in `ModelConfig.pred_mlp_ratio`.
    """
    enc = infer_encoder_config(encoder_sd, num_heads=num_heads)
    pred = infer_predictor_config(predictor_sd, enc["embed_dim"], (enc["img_size"] // enc["patch_size"]) ** 2)
    pred_ratio = pred.pop("pred_mlp_ratio")
    mcfg = ModelConfig(**enc, **pred, pred_num_heads=None, norm_eps=1e-6,
                       pred_mlp_ratio=None if pred_ratio == enc["mlp_ratio"] else pred_ratio)
    if mcfg.pred_embed_dim % mcfg.num_heads:
        raise CheckpointError(f"the predictor is {mcfg.pred_embed_dim} wide, not divisible by the encoder's "
                              f"{mcfg.num_heads} heads; pass the right num_heads")
    return mcfg, pred_ratio


def _unshare(*sds: dict) -> list[dict]:
    """Copies of the state dicts in which no two tensors share memory (a file may store one tensor under two
    names, e.g. the fixed pos_embed of both encoders; loaded with assign=True they would stay tied)."""
    seen, out = set(), []
    for sd in sds:
        fresh = {}
        for k, v in sd.items():
            ptr = v.untyped_storage().data_ptr() if v.device.type != "meta" else None
            fresh[k] = v.clone() if ptr is not None and ptr in seen else v
            if ptr is not None:
                seen.add(ptr)
        out.append(fresh)
    return out


def _check_tensors(sd: Any, what: str) -> dict:
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"the {what!r} entry is {type(sd).__name__}, not a state dict of tensors")
    bad = [k for k, v in sd.items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"the {what!r} entry holds non-tensor values ({', '.join(map(str, bad[:3]))}); "
                              f"it is not a state dict")
    return sd


def from_official(ckpt: dict, *, num_heads: Optional[int] = None,
                  source: str = "the checkpoint") -> tuple[nn.Module, Config]:
    """Build an `IJEPA` (eval mode) and its `Config` from an official checkpoint dict already in memory.

    `ckpt` has the keys `encoder`, `predictor`, `target_encoder` (weights, optionally `module.`-prefixed) and
    optionally `batch_size`, `world_size`, `lr`, ... (used to fill the config). See `load_official`.
    """
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{source} holds a {type(ckpt).__name__}, not an official I-JEPA checkpoint dict "
                              f"(keys encoder, predictor, target_encoder, ...)")
    if "model" in ckpt and "format_version" in ckpt:
        raise CheckpointError(f"{source} is an ijepa_viz training checkpoint, not an official one; load it with "
                              f"ijepa_viz.train.load_model (CLI: `ijepa-viz convert --checkpoint PATH`)")
    missing = [k for k in _OFFICIAL_WEIGHTS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{source} has no {', '.join(missing)} entr{'y' if len(missing) == 1 else 'ies'} "
                              f"(found: {', '.join(map(str, list(ckpt)[:8])) or 'nothing'}); an official I-JEPA "
                              f".pth.tar has encoder, predictor and target_encoder")
    enc, pred, tgt = _unshare(*(strip_prefix(_check_tensors(ckpt[k], k)) for k in _OFFICIAL_WEIGHTS))
    mcfg, pred_ratio = infer_model_config(enc, pred, num_heads=num_heads)
    model = build_for(mcfg, ema=True, pred_mlp_ratio=pred_ratio)
    load_weights(model.encoder, enc, f"the encoder of {source}")
    load_weights(model.target_encoder, tgt, f"the target_encoder of {source}")
    load_weights(model.predictor, pred, f"the predictor of {source}")
    cfg = get_preset("vit-h14-paper")  # the recipe the released models were trained with
    cfg.model = mcfg
    bs, ws, lr = ckpt.get("batch_size"), ckpt.get("world_size"), ckpt.get("lr")
    if isinstance(bs, int) and isinstance(ws, int) and bs > 0 and ws > 0:
        cfg.data.batch_size = bs * ws  # the official batch_size is per GPU; ours is global
    if isinstance(lr, (int, float)) and lr >= 0:
        cfg.optim.lr = float(lr)
    try:
        cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{source}: the inferred architecture is not valid here: {e}") from None
    return model.eval(), cfg


def load_official(path: str | Path, *, map_location="cpu", num_heads: Optional[int] = None) -> tuple[nn.Module, Config]:
    """Load a facebookresearch/ijepa `.pth.tar`: returns (IJEPA in eval mode, its Config).

    The file is read with `weights_only=True` (memory-mapped when possible); no pickled code ever runs. Should
    its optimiser or scaler entries name classes `weights_only` does not allow, those entries are skipped with a
    warning and the weights are still loaded; a file that names code (os.system, eval, ...) is refused. The
    `module.` prefixes are stripped and the architecture is inferred from the shapes (`infer_model_config`):
    width from pos_embed / patch_embed, patch size from the conv kernel, image size from patches x patch,
    depth from the block indices, heads from `KNOWN_HEADS` (or `num_heads`), MLP ratios from fc1. The encoder,
    target encoder and predictor are loaded with strict=True; anything that does not fit is a CheckpointError
    naming the keys. Known releases: see `RELEASES`.
    """
    path = Path(path)
    ckpt = _load_untrusted(path)
    if isinstance(ckpt, dict):
        dropped = [k for k, v in ckpt.items() if _contains_inert(v)]
        if any(k in _OFFICIAL_WEIGHTS for k in dropped):
            raise _refused(path)
        if dropped:
            warnings.warn(f"{str(path)!r}: skipped the entries {', '.join(map(str, dropped))}, which hold objects "
                          f"that cannot be loaded safely (the weights are complete)", stacklevel=2)
            ckpt = {k: v for k, v in ckpt.items() if k not in dropped}
    model, cfg = from_official(ckpt, num_heads=num_heads, source=repr(str(path)))
    if str(map_location) != "cpu":
        model = model.to(map_location)
    return model, cfg


# =============================================================================================
# 2. Export: safetensors + config.json, and timm
# =============================================================================================

WEIGHTS_FILE, CONFIG_FILE, TIMM_FILE = "model.safetensors", "config.json", "encoder_timm.safetensors"


def _pred_mlp_ratio(model: nn.Module) -> float:
    fc1 = model.predictor.predictor_blocks[0].mlp.fc1.weight  # (hidden, Dp)
    return _mlp_ratio(int(fc1.shape[0]), int(fc1.shape[1]))


def _read_safetensors(path: Path, fix: str) -> tuple[dict, dict]:
    """(tensors on the CPU, metadata) of a safetensors file; CheckpointError naming `fix` when unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path), device="cpu"), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({e}); {fix}") from None


def _save_safetensors(tensors: dict, path: Path, metadata: dict) -> Path:
    from safetensors.torch import save_file

    (tensors,) = _unshare({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def timm_kwargs(mcfg: ModelConfig) -> dict:
    """Keyword arguments of `timm.models.vision_transformer.VisionTransformer` (or `timm.create_model`) for the
    encoder of `mcfg` in I-JEPA form: no class token, average pooling, no fc_norm, no head."""
    if mcfg.norm_eps != 1e-6:
        raise CheckpointError(f"model.norm_eps={mcfg.norm_eps}: timm's ViT uses LayerNorm eps 1e-6, so this "
                              f"encoder has no timm equivalent")
    return dict(img_size=mcfg.img_size, patch_size=mcfg.patch_size, in_chans=mcfg.in_chans,
                embed_dim=mcfg.embed_dim, depth=mcfg.depth, num_heads=mcfg.num_heads, mlp_ratio=mcfg.mlp_ratio,
                qkv_bias=mcfg.qkv_bias, class_token=False, global_pool="avg", fc_norm=False, num_classes=0)


def _encoder_of(model: nn.Module, which: str) -> nn.Module:
    if which not in ("target", "context"):
        raise ValueError(f"which={which!r} must be 'target' (the EMA encoder the paper evaluates) or 'context'")
    if hasattr(model, "target_network"):
        return model.target_network if which == "target" else model.encoder
    return model  # already an encoder


def export_timm_encoder(model: nn.Module, path: Optional[str | Path] = None, which: str = "target") -> dict:
    """The encoder's state dict in timm's `VisionTransformer` names (identical to ours: the official code used
    timm's layout), which `VisionTransformer(**timm_kwargs(cfg.model))` loads with strict=True.

    which='target' (default) exports the EMA target encoder, the one the paper evaluates; 'context' the context
    encoder (what timm's own `*_ijepa` weights hold). With `path`, also writes it (safetensors when the name ends
    in .safetensors, else torch.save), atomically, with the timm kwargs in the safetensors metadata.
    """
    enc = _encoder_of(model, which)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in enc.state_dict().items()}
    if path is not None:
        path = Path(path)
        if path.suffix == ".safetensors":
            meta = {"format": "pt", "ijepa_viz.which": which}
            if hasattr(model, "cfg"):
                meta["timm_kwargs"] = json.dumps(timm_kwargs(model.cfg))
            _save_safetensors(sd, path, meta)
        else:
            atomic_save(sd, path)
    return sd


def export_safetensors(model: nn.Module, cfg: Config, out_dir: str | Path, *, timm: bool = False,
                       which: str = "target") -> Path:
    """Write `out_dir/model.safetensors` (every weight of the IJEPA) and `out_dir/config.json`; with timm=True
    also `out_dir/encoder_timm.safetensors` (see `export_timm_encoder`). Each file is written atomically, the
    config last; a shared export id in both files catches a half-updated folder. Returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    export_id = uuid.uuid4().hex
    meta = {"format": "pt", "ijepa_viz.export_id": export_id, "ijepa_viz.format_version": str(EXPORT_FORMAT_VERSION)}
    _save_safetensors(model.state_dict(), out / WEIGHTS_FILE, meta)
    info = {"format": "ijepa_viz", "format_version": EXPORT_FORMAT_VERSION, "export_id": export_id,
            "weights": WEIGHTS_FILE, "ema": model.target_encoder is not None,
            "pred_mlp_ratio": _pred_mlp_ratio(model), "config": cfg.to_dict()}
    if timm:
        export_timm_encoder(model, out / TIMM_FILE, which=which)
        info["timm"] = {"file": TIMM_FILE, "which": which, "kwargs": timm_kwargs(model.cfg),
                        "usage": "timm.models.vision_transformer.VisionTransformer(**kwargs)"
                                 ".load_state_dict(safetensors.torch.load_file(file))"}
    _atomic_text(out / CONFIG_FILE, json.dumps(info, indent=2) + "\n")
    return out


def import_safetensors(out_dir: str | Path, *, map_location="cpu") -> tuple[nn.Module, Config]:
    """Read a folder written by `export_safetensors`: returns (IJEPA in eval mode, Config), weights exact."""
    out = Path(out_dir)
    cfg_path, w_path = out / CONFIG_FILE, out / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise CheckpointError(f"{str(p)!r} does not exist; pass a folder written by `ijepa-viz convert` "
                                  f"(it holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        info = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(cfg_path)!r} is not valid JSON ({e}); re-run the export") from None
    if not isinstance(info, dict) or info.get("format") != "ijepa_viz" or "config" not in info:
        raise CheckpointError(f"{str(cfg_path)!r} is not an ijepa_viz export config; re-run the export")
    if int(info.get("format_version", 0)) > EXPORT_FORMAT_VERSION:
        raise CheckpointError(f"{str(cfg_path)!r} has export format {info['format_version']}, newer than this "
                              f"ijepa_viz reads ({EXPORT_FORMAT_VERSION}); upgrade ijepa_viz")
    tensors, meta = _read_safetensors(w_path, "re-run the export")
    if meta.get("ijepa_viz.export_id") != info.get("export_id"):
        raise CheckpointError(f"{str(w_path)!r} and {str(cfg_path)!r} come from different exports (the export ids "
                              f"differ): the folder was only partly overwritten; re-run the export")
    try:
        cfg = Config.from_dict(info["config"])
    except ConfigError as e:
        raise CheckpointError(f"{str(cfg_path)!r}: {e}") from None
    model = build_for(cfg.model, ema=bool(info.get("ema", True)), pred_mlp_ratio=info.get("pred_mlp_ratio"))
    load_weights(model, tensors, repr(str(w_path)))
    if str(map_location) != "cpu":
        model = model.to(map_location)
    return model.eval(), cfg


# =============================================================================================
# 3. Hub: released checkpoints and timm models
# =============================================================================================

def _download(url: str) -> Path:
    """Download `url` once into torch.hub's checkpoint folder (~/.cache/torch/hub/checkpoints); returns the path."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / url.rsplit("/", 1)[-1]
    if not path.exists():
        atomic_write(path, lambda tmp: torch.hub.download_url_to_file(url, str(tmp), progress=True))
    return path


def _timm_create(name: str, **kwargs) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=True, **kwargs)


def load_pretrained(name: str, *, map_location="cpu", **timm_overrides) -> tuple[nn.Module, Config]:
    """Released I-JEPA weights by name (needs a network on first use; files are cached).

    * An official release name (`RELEASES`, e.g. 'IN1K-vit.h.14-300e'): downloads the `.pth.tar` and returns
      `load_official`'s (IJEPA with encoder, target encoder AND predictor, Config).
    * A timm name (e.g. 'vit_huge_patch14_gap_224.in1k_ijepa'): `timm.create_model(name, pretrained=True,
      **timm_overrides)`, converted to an ijepa_viz `VisionTransformer`: returns (encoder only, Config). timm's
      I-JEPA weights hold the context encoder (`encoder` of the official file), not the target encoder.
    """
    if name in RELEASES:
        return load_official(_download(RELEASES[name][0]), map_location=map_location)
    try:
        tm = _timm_create(name, **timm_overrides)
    except RuntimeError as e:
        raise CheckpointError(f"timm could not create {name!r} with pretrained weights ({e}); official names: "
                              f"{', '.join(RELEASES)}; timm names: {', '.join(TIMM_NAMES)}") from None
    if getattr(tm, "num_prefix_tokens", 0) or getattr(tm, "global_pool", "avg") != "avg":
        raise CheckpointError(f"timm model {name!r} has a class token or does not average-pool; I-JEPA "
                              f"encoders have neither (use a *_gap_* model such as {next(iter(TIMM_NAMES))})")
    sd = {k: v for k, v in tm.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
    enc = infer_encoder_config(sd, num_heads=tm.blocks[0].attn.num_heads, what=f"timm model {name!r}")
    cfg = get_preset("vit-h14-paper")
    cfg.model = dataclasses.replace(cfg.model, **enc)
    cfg.validate()
    from ijepa_viz.model import VisionTransformer

    kwargs = {k: v for k, v in dataclasses.asdict(cfg.model).items()
              if k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
                       "qkv_bias", "norm_eps")}
    encoder = _try_meta_build(lambda: VisionTransformer(**kwargs))
    load_weights(encoder, sd, f"timm model {name!r}")
    if str(map_location) != "cpu":
        encoder = encoder.to(map_location)
    return encoder.eval(), cfg
