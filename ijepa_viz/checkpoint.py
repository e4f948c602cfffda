"""Checkpoints: atomic writes, safe loads, and training checkpoints read back into a model.

Read top to bottom:

1. **Atomic writes and safe loads.** Every write goes to a temporary file in the same folder, is flushed to
   disk, then renamed over the target, so a killed process leaves either the old file or the new one, never
   half a file. Every load uses `torch.load(..., weights_only=True)`, which refuses pickles that would run code.
2. **Training checkpoints**: `load_training_checkpoint` checks what `ijepa_viz.train` wrote, and `load_model`
   rebuilds the model in it.
3. **Weights into a model, with clear errors**: `build_for` builds an `IJEPA` without allocating its weights,
   and `load_weights` loads a state dict with strict=True after naming every key that does not fit.

The official I-JEPA checkpoints, the safetensors / timm export and the released weights by name live in
`ijepa_viz.official`, which builds on this module.

Test hook: with the environment variable `IJEPA_VIZ_TEST_SLOW_SAVE=<seconds>`, every atomic write sleeps that
long after the temporary file is complete and before the rename, so a test can kill a process in the middle of
a checkpoint write (tests/test_crash_recovery.py). Unset, it costs nothing.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn as nn

from ijepa_viz.config import Config, ModelConfig

if TYPE_CHECKING:
    from ijepa_viz.model import IJEPA

FORMAT_VERSION = 1  # bump when the layout of a training checkpoint changes
SLOW_SAVE_ENV = "IJEPA_VIZ_TEST_SLOW_SAVE"  # test hook: seconds to sleep between writing and renaming


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit; the message names the file and the fix."""


# =============================================================================================
# 1. Atomic writes and safe loads
# =============================================================================================

def _tmp_name(path: Path) -> Path:
    """The temporary sibling of `path` for this process: `.NAME.tmpPID` (hidden, and never ends in .pt)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete `.NAME.tmpPID` files left beside `path` by processes that no longer run (killed mid-write).

    Returns the deleted paths. A temporary file of a live process is never touched.
    """
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(f".{path.name}.tmp*"):
        suffix = tmp.name[len(f".{path.name}.tmp"):]
        if suffix.isdigit() and int(suffix) != os.getpid() and not _pid_alive(int(suffix)):
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` to fill a temporary file beside `path`, fsync it, then rename it over `path`.

    A process killed at any moment leaves `path` either as it was or complete. Stale temporaries of killed
    processes are removed first. `IJEPA_VIZ_TEST_SLOW_SAVE=<seconds>` sleeps before the rename (test hook).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _tmp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        delay = float(os.environ.get(SLOW_SAVE_ENV, "0") or 0)
        if delay > 0:
            time.sleep(delay)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_save(obj: Any, path: str | Path) -> Path:
    """`torch.save` to `path` through a temporary file and a rename (atomic on POSIX)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _atomic_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; check the path (or train first)")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder; pass the .pt file inside it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes): the write was cut off; "
                              f"use an earlier checkpoint")


def _refused(path: Path) -> CheckpointError:
    return CheckpointError(
        f"refused to load {str(path)!r}: it contains Python objects that are not plain tensors and "
        f"could run code when unpickled (weights_only=True refused it). Only load files you trust; "
        f"convert trusted ones with `ijepa-viz convert`")


def _file_kind(path: Path) -> str:
    """What a file that torch cannot load looks like, from its first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return "unreadable"
    if head.startswith(b"PK"):
        return "a PyTorch zip archive that is truncated or corrupt (a write that was cut off?)"
    if head[:1] == b"\x80":
        return "a pickle that is truncated or corrupt"
    try:
        text = head.decode("utf-8")
        if "\x00" not in text:
            return "a text file, not a checkpoint"
    except UnicodeDecodeError:
        pass
    return "not a PyTorch file (its first bytes are no zip archive and no pickle)"


_TRAIN_FIX = "Pass a checkpoint.pt written by `ijepa-viz train` (or an earlier checkpoint)"


def _unreadable(path: Path, e: BaseException, fix: str = _TRAIN_FIX) -> CheckpointError:
    reason = str(e).splitlines()[0][:160] if str(e) else ""
    detail = f" ({type(e).__name__}: {reason})" if reason and "weights_only" not in reason and len(reason) > 8 else ""
    return CheckpointError(f"{str(path)!r} is not a readable PyTorch checkpoint: {_file_kind(path)}{detail}. "
                           f"{fix}")


_CODE_SIGNS = ("GLOBAL", "Unsupported global", "unrecognized function", "Can only build", "Can only create",
               "is blocked")


def _is_code_refusal(msg: str) -> bool:
    """True when weights_only refused a pickle because it names classes or functions (code), not because the
    bytes are garbage."""
    return any(sign in msg for sign in _CODE_SIGNS)


def safe_load(path: str | Path, map_location="cpu") -> Any:
    """Load a `torch.save` file with `weights_only=True`; clear errors for every way it can go wrong."""
    path = Path(path)
    _check_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if _is_code_refusal(msg):
            raise _refused(path) from None
        raise _unreadable(path, e) from None
    except Exception as e:  # noqa: BLE001 - truncated zip, text, random bytes: torch raises many kinds
        raise _unreadable(path, e) from None


# =============================================================================================
# 2. Training checkpoints
# =============================================================================================

def load_training_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load and check a checkpoint written by `ijepa_viz.train`."""
    ckpt = safe_load(path, map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "format_version" not in ckpt:
        raise CheckpointError(f"{str(path)!r} is not an ijepa_viz training checkpoint (no 'model'/'format_version' "
                              f"entries); for official I-JEPA .pth.tar files use `ijepa-viz convert`")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r} has format version {ckpt['format_version']}, newer than this "
                              f"ijepa_viz understands ({FORMAT_VERSION}); upgrade ijepa_viz to read it")
    return ckpt


def load_model(path: str | Path, map_location="cpu") -> tuple[IJEPA, Config]:
    """Rebuild the model saved in a training checkpoint: returns (model in eval mode, its Config)."""
    from ijepa_viz.model import build_model

    ckpt = load_training_checkpoint(path, map_location)
    cfg = Config.from_dict(ckpt["config"])
    model = build_model(cfg.model, ema=cfg.train.ema)
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg


# =============================================================================================
# 3. Weights into a model, with clear errors
# =============================================================================================

def _try_meta_build(fn: Callable[[], nn.Module]) -> nn.Module:
    """Build a module without allocating its weights when possible (they are replaced on load anyway)."""
    try:
        with torch.device("meta"):
            return fn()
    except (NotImplementedError, RuntimeError):  # an init step that needs real numbers: build it on the CPU
        return fn()


def build_for(mcfg: ModelConfig, *, ema: bool = True, pred_mlp_ratio: Optional[float] = None) -> nn.Module:
    """An `IJEPA` for `mcfg`; `pred_mlp_ratio` (from an older config.json) fills `mcfg.pred_mlp_ratio`.

    Its weights may be uninitialised (meta tensors): load a state dict with `load_weights` before use.
    """
    from ijepa_viz.model import build_model

    if pred_mlp_ratio is not None and mcfg.pred_mlp_ratio is None and pred_mlp_ratio != mcfg.mlp_ratio:
        mcfg = dataclasses.replace(mcfg, pred_mlp_ratio=pred_mlp_ratio)
    return _try_meta_build(lambda: build_model(mcfg, ema=ema))


def _describe_mismatch(module: nn.Module, sd: dict, what: str) -> Optional[str]:
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    shapes = [f"{k} {have[k]} vs {want[k]}" for k in want if k in have and have[k] != want[k]]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} ({', '.join(unexpected[:3])}"
                     f"{', ...' if len(unexpected) > 3 else ''})")
    if shapes:
        parts.append(f"shape mismatch in {len(shapes)} (file vs model: {'; '.join(shapes[:3])}"
                     f"{'; ...' if len(shapes) > 3 else ''})")
    return f"{what} does not fit the model: {', '.join(parts)}" if parts else None


def load_weights(module: nn.Module, sd: dict, what: str) -> None:
    """`module.load_state_dict(sd, strict=True, assign=True)` after a check that names every key that does not
    fit. Non-float32 floating weights are converted to float32."""
    problem = _describe_mismatch(module, sd, what)
    if problem:
        raise CheckpointError(problem)
    sd = {k: (v.float() if v.is_floating_point() and v.dtype != torch.float32 else v) for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=True)
