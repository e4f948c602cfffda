"""The training loop: schedules, autocast, DDP, atomic checkpoints with exact resume, callbacks and metrics.

One step reads like the official `train.py` (facebookresearch/ijepa):

    masks = collator.sample(B, step)                 # multi-block masks, a pure function of (seed, step)
    h = model.forward_target(images, masks.targets)   # EMA target encoder on the full image, layer-normed
    z = model.forward_context(images, masks.context)  # context encoder on the kept patches
    loss = model.loss(model.predict(z, ...), h)
    loss.backward(); optimizer.step(); model.update_target(momentum)

Use it from Python or a notebook:

    trainer = Trainer(get_preset("cpu-tiny"), callbacks=[MyPlot()])
    result = trainer.fit()          # trainer.stop() from a callback or a button ends it with a checkpoint

Everything a step draws at random comes from the seed and the step (masks) or epoch (data order, augmentation),
and the checkpoint holds the RNG state for the rest (stochastic depth), so a resumed run reproduces the losses of
an uninterrupted one exactly on CPU. Checkpoints are written every `train.checkpoint_every` steps and every
`train.checkpoint_minutes` of wall time, so a slow run killed early keeps its progress.

No silent collapse: every `train.collapse_every` steps the trainer encodes a fixed batch (the first training
batch) with the target encoder and logs the RankMe and std of its average-pooled features ('probe_rankme',
'probe_std' in metrics.jsonl and the progress bar). On collapse it warns once (`CollapseWarning`), and with
`train.stop_on_collapse` it stops with a checkpoint (`TrainResult.stop_reason`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ijepa_viz.checkpoint import FORMAT_VERSION, CheckpointError, atomic_save, load_training_checkpoint
from ijepa_viz.checkpoint import load_model  # noqa: F401  (public here too: `ijepa_viz.train.load_model`)
from ijepa_viz.config import Config, ConfigError, save_yaml
from ijepa_viz.masks import MaskCollator
from ijepa_viz.model import IJEPA, build_model, feature_std, rankme, set_attention
from ijepa_viz.schedules import reg_scale, schedule  # noqa: F401  (schedule is public here too)

clock = time.monotonic  # the wall clock of `train.checkpoint_minutes` (tests replace it)
PROBE_IMAGES = 256  # collapse checks encode at most this many images of the first training batch

COLLAPSE_ADVICE = (
    "Collapse means every image maps to nearly the same feature vector: the loss becomes trivially small and the "
    "features carry no information (a linear probe on them does no better than on a random network). Try: keep "
    "train.ema=true, raise optim.ema_start (e.g. 0.999: a slower target), lower optim.lr, lengthen "
    "optim.warmup_epochs, or train for more epochs (short runs compress the warmup and the EMA ramp into a few "
    "hundred steps). train.stop_on_collapse=true stops such a run with a checkpoint.")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


class DeviceUnavailable(ConfigError, RuntimeError):
    """train.device names a device this machine lacks. A ConfigError, so the CLI prints it as one line."""


class CollapseWarning(UserWarning):
    """The target encoder's features collapsed (see `Trainer.check_collapse`); warned once per run."""


# -- device, precision, distributed --------------------------------------------------------------

def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu. An unavailable explicit device is an error with the fix."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailable(f"train.device={name!r} but CUDA is not available here; use --set train.device=cpu "
                                f"(or auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceUnavailable("train.device='mps' but MPS is not available here; use --set train.device=cpu "
                                "(or auto)")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bf16 matmuls (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # torch >= 2.3
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((check and check()) or (amx and amx()))


def resolve_attention(attention: str, device: torch.device) -> str:
    """'auto': fused SDPA except on a CPU, where PyTorch's CPU flash-attention kernel (its backward above all)
    is slower than explicit matmuls at ViT-Tiny sizes: in bf16 (1.43x for the whole step, AVX-512 bf16) and in
    fp32 (1.06-1.09x, AVX2), measured with benchmarks/step_ab.py (benchmarks/README.md)."""
    if attention != "auto":
        return attention
    return "math" if device.type == "cpu" else "sdpa"


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. 'auto': bf16 on CUDA, and on CPUs with native bf16 (measured
    faster there, see the README's benchmark table); fp32 elsewhere."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1). A single process never does: the
    official code fails there (its issue #43)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local)


def shutdown_distributed(wait: bool = True) -> None:
    """Leave the process group, if this process joined one. With `wait`, every rank first waits for the others
    (rank 0 may still be writing its checkpoint); after an error, pass wait=False, since the other ranks may
    never arrive. Without this, gloo's threads can outlive the interpreter, and a rank that finished its work
    aborts at exit ('terminate called without an active exception')."""
    if dist.is_available() and dist.is_initialized():
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()


# -- optimiser ------------------------------------------------------------------------------------

def param_groups(model: torch.nn.Module) -> list[dict]:
    """AdamW groups as the official code: no weight decay on biases and other 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


# -- callbacks -------------------------------------------------------------------------------------

class Callback(Protocol):
    """Any object with some of these methods; each receives the trainer and a metrics dict."""

    def on_step(self, trainer: "Trainer", metrics: dict) -> None: ...

    def on_epoch(self, trainer: "Trainer", metrics: dict) -> None: ...


@dataclass
class TrainResult:
    """What `Trainer.fit` returns."""

    model: IJEPA
    history: list[dict]  # one dict per logged step (the lines of metrics.jsonl)
    checkpoint: Optional[Path]  # the last checkpoint written (rank 0), or None
    step: int  # optimiser steps done in total
    stopped_early: bool  # stop(), Ctrl-C or a collapse ended the run before its planned length
    wall_time: float  # seconds spent in this call
    stop_reason: Optional[str] = None  # why it ended early: 'collapse at step N: ...' or 'stop() or Ctrl-C'


# -- the trainer -----------------------------------------------------------------------------------

class Trainer:
    """Train an `IJEPA` model on `cfg`.

    Args:
        cfg: a validated `Config`.
        callbacks: objects with `on_step(trainer, metrics)` / `on_epoch(trainer, metrics)`.
        resume: True resumes from `<out_dir>/checkpoint.pt` when it exists; a path resumes from that file.
        progress: show a tqdm progress bar (a widget in notebooks).
        loader: an iterable of (images, labels) batches to use instead of `cfg.data` (tests, notebooks).
    """

    CHECKPOINT = "checkpoint.pt"

    def __init__(self, cfg: Config, callbacks: list | tuple = (), resume: bool | str | Path = False,
                 progress: bool = True, loader=None):
        self.cfg = cfg.validate()
        t = cfg.train
        self.dist = init_distributed(t.device)
        self.device = resolve_device(t.device)
        if self.device.type == "cuda" and self.dist.world_size > 1:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.amp_dtype = resolve_precision(t.precision, self.device)
        self.callbacks = list(callbacks)
        self.progress = progress and self.dist.is_main
        self.out_dir = Path(t.out_dir)
        self.history: list[dict] = []
        self._stop = False
        self.stop_reason: Optional[str] = None
        self._collapse_warned = False
        # the latest collapse check (saved in checkpoints, so a resumed run logs what an uninterrupted one does)
        self.collapse_state: dict[str, Any] = dict.fromkeys(("step", "rankme", "feature_std", "first_std",
                                                             "first_rankme", "collapsed_at"))

        if cfg.data.batch_size % self.dist.world_size:
            raise ValueError(f"data.batch_size={cfg.data.batch_size} must be divisible by the "
                             f"{self.dist.world_size} processes; it is the global batch")
        self.local_batch = cfg.data.batch_size // self.dist.world_size

        torch.manual_seed(t.seed)
        self.model = build_model(cfg.model, ema=t.ema).to(self.device)
        self.attention = resolve_attention(t.attention, self.device)
        set_attention(self.model, self.attention)
        self.collator = MaskCollator(cfg.mask, cfg.grid_size, seed=t.seed)
        if loader is None:
            from ijepa_viz.data import build_loader
            loader = build_loader(cfg.data, "train", cfg.model.img_size, train=True, seed=t.seed,
                                  rank=self.dist.rank, world_size=self.dist.world_size,
                                  device=self.device if self.device.type == "cuda" else None)
        self.loader = loader
        self.steps_per_epoch = len(loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training set has fewer images than one batch ({cfg.data.batch_size}); "
                             f"lower data.batch_size")
        self.probe_images = self._probe_batch() if t.collapse_every else None
        self.total_steps = t.steps or t.epochs * self.steps_per_epoch
        self.warmup_steps = int(round(cfg.optim.warmup_epochs * self.steps_per_epoch))

        # fused AdamW: one kernel for all parameters (CPU and CUDA since torch 2.4); the same update rule.
        self.optimizer = torch.optim.AdamW(param_groups(self.model), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                           fused=self.device.type in ("cpu", "cuda"))
        self.net = self.model
        if self.dist.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if t.compile:
            self.net = torch.compile(self.net)
        self.step = 0
        if resume:
            path = Path(resume) if not isinstance(resume, bool) else self.out_dir / self.CHECKPOINT
            if isinstance(resume, bool) and not path.exists():
                if self.dist.is_main:  # nothing to resume from: start fresh, dropping the metrics of a run
                    self._trim_metrics(0)  # that was killed before its first checkpoint
            else:
                self.load_state(path)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "schedule": {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps},
            "rng": rng,
            "collapse": dict(self.collapse_state),
            "config": self.cfg.to_dict(),
        }

    def load_state(self, path: Path) -> None:
        ckpt = load_training_checkpoint(path, map_location=self.device)
        if ckpt["config"]["model"] != self.cfg.to_dict()["model"]:
            raise CheckpointError(f"{str(path)!r} was trained with another model configuration; resume with the "
                                  f"same model.* settings (see config.yaml beside it) or start a new out_dir")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["step"])
        if isinstance(ckpt.get("collapse"), dict):  # absent in checkpoints of older versions: measured afresh
            self.collapse_state.update(ckpt["collapse"])
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng"]["cuda"]])
        if self.dist.is_main:
            self._trim_metrics(self.step)

    def save_checkpoint(self, name: str | None = None) -> Optional[Path]:
        """Write the full training state atomically (rank 0 only). Returns the path, or None on other ranks."""
        if not self.dist.is_main:
            return None
        path = atomic_save(self.state_dict(), self.out_dir / (name or self.CHECKPOINT))
        self.last_checkpoint = path
        if name is None:  # the file a resume reads: the clock of train.checkpoint_minutes restarts
            self._last_save_time = clock()
        return path

    def _checkpoint_due(self) -> bool:
        """Every train.checkpoint_every steps, or once train.checkpoint_minutes passed since the last one."""
        t = self.cfg.train
        if self.step % t.checkpoint_every == 0:
            return True
        return bool(t.checkpoint_minutes) and clock() - self._last_save_time >= 60.0 * t.checkpoint_minutes

    def _trim_metrics(self, step: int) -> None:
        """Drop metrics lines written after the checkpoint we resume from (they will be written again)."""
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for ln in path.read_text().splitlines():
            try:
                if json.loads(ln)["step"] <= step:
                    keep.append(ln)
            except (ValueError, KeyError, TypeError):  # a half-written last line (power cut): drop it
                continue
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        tmp.replace(path)
        self.history = [json.loads(ln) for ln in keep]

    # -- control -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the run to end after the current step; it writes a checkpoint and returns."""
        self._stop = True

    @contextlib.contextmanager
    def _sigint_stops(self):
        """The first Ctrl-C stops cleanly at the next step boundary; a second one interrupts at once."""
        try:
            previous = signal.getsignal(signal.SIGINT)

            def handler(signum, frame):
                if self._stop:
                    raise KeyboardInterrupt
                self._stop = True
                if self.dist.is_main:
                    print("\nStopping after this step and writing a checkpoint (Ctrl-C again to abort)...")

            signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: no signal handling
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    # -- collapse ------------------------------------------------------------------------------
    def _probe_batch(self) -> torch.Tensor:
        """The fixed images of the collapse checks: the first `PROBE_IMAGES` of epoch 0's first batch. Drawn
        under a forked RNG, and every epoch re-selects its start in the loader, so training sees exactly the
        batches (and random numbers) it would see without it."""
        with torch.random.fork_rng(devices=[]):
            if hasattr(self.loader, "set_epoch"):
                try:
                    self.loader.set_epoch(0, skip_batches=0)
                except TypeError:
                    self.loader.set_epoch(0)
            batch = next(iter(self.loader))
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return images[:PROBE_IMAGES].to(self.device).clone()

    @torch.no_grad()
    def probe_metrics(self) -> tuple[float, float]:
        """(RankMe, feature std) of the target encoder's average-pooled features of the probe images, in eval
        mode (no drop path, so no random numbers drawn). With DDP every rank gets rank 0's values."""
        net = self.model.target_network
        was_training = net.training
        net.eval()
        try:
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                feats = net(self.probe_images).mean(dim=1).float().cpu()  # (n, D)
        finally:
            net.train(was_training)
        values = [rankme(feats), feature_std(feats)]
        if self.dist.world_size > 1:
            buf = torch.tensor(values, dtype=torch.float64, device=self.device)
            dist.broadcast(buf, src=0)
            values = buf.tolist()
        return values[0], values[1]

    def check_collapse(self) -> bool:
        """Measure the probe's RankMe and feature std and judge collapse; True when the run should stop.

        Collapse: RankMe below train.collapse_rankme and its first reading (features that start that low, as an
        untrained network's on a plain background, lost nothing), or the feature std below collapse_std_ratio x
        its first reading. The first reading is never judged; the first collapse warns once (`CollapseWarning`,
        rank 0), and with train.stop_on_collapse stops the loop.
        """
        t, st = self.cfg.train, self.collapse_state
        r, s = self.probe_metrics()
        first = st["first_std"] is None
        st.update(step=self.step, rankme=r, feature_std=s, first_std=s if first else st["first_std"])
        if first or st.get("first_rankme") is None:  # (a checkpoint from before first_rankme: from now on)
            st["first_rankme"] = r
            return False
        reasons = []
        if r < min(t.collapse_rankme, st["first_rankme"]):
            reasons.append(f"RankMe {r:.2f} < train.collapse_rankme={t.collapse_rankme:g}, and below its first "
                           f"reading {st['first_rankme']:.2f}")
        if t.collapse_std_ratio and s < t.collapse_std_ratio * st["first_std"]:
            reasons.append(f"feature std {s:.3g} < train.collapse_std_ratio={t.collapse_std_ratio:g} x its first "
                           f"reading {st['first_std']:.3g}")
        if not reasons:
            return False
        if st["collapsed_at"] is None:
            st["collapsed_at"] = self.step
        what = f"collapse at step {self.step}: " + "; ".join(reasons)
        if not self._collapse_warned and self.dist.is_main:
            self._collapse_warned = True
            stopping = " Stopping (train.stop_on_collapse=true)." if t.stop_on_collapse else ""
            warnings.warn(f"the target encoder's features collapsed ({what}).{stopping} {COLLAPSE_ADVICE}",
                          CollapseWarning, stacklevel=2)
        if t.stop_on_collapse:
            self.stop_reason = what
            self._stop = True
            return True
        return False

    # -- the step ------------------------------------------------------------------------------
    def _batch_masks(self, batch_len: int):
        """Masks for this rank's rows of the global batch: the same global masks on every rank, so a DDP run
        uses exactly the masks (and the truncation) of a single-process run with the same global batch."""
        W = self.dist.world_size
        masks = self.collator.sample(batch_len * W, step=self.step)
        if W > 1:
            masks = masks.rows(slice(self.dist.rank, None, W))  # the loader shards the batch the same way
        masks = masks.to(self.device, non_blocking=True)
        if self.cfg.train.compile:
            # The context and target lengths change from batch to batch: symbols from the first compile on, rather
            # than a first graph for one (context, target) pair that the next batch recompiles. PyTorch still
            # specialises on the target length: one graph per target block area (2 at the 8x8 grid's defaults).
            torch._dynamo.maybe_mark_dynamic(masks.context, 1)
            torch._dynamo.maybe_mark_dynamic(masks.targets, 2)
        return masks

    def train_step(self, images: torch.Tensor) -> dict:
        """One optimiser step on a batch of images (B, C, H, W); returns the step's metrics."""
        lr, wd, momentum = schedule(self.step, self.total_steps, self.warmup_steps, self.cfg.optim,
                                    steps_per_epoch=self.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group.get("apply_wd"):
                group["weight_decay"] = wd
        images = images.to(self.device, non_blocking=True)
        masks = self._batch_masks(images.shape[0])
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            out = self.net(images, masks)
        scale = reg_scale(self.step, self.total_steps, self.cfg.optim)  # optim.reg_fade; 1: untouched
        if scale != 1.0 and len(out.loss_terms) > 1:  # loss = pred + scale * (sum of weighted terms)
            out.loss = out.loss_terms["pred"] + scale * (out.loss - out.loss_terms["pred"])
        loss = out.loss.item()
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"the loss became {loss} at step {self.step}; stopping. The last good checkpoint is kept in "
                f"{str(self.out_dir)!r}. Lower optim.lr or set optim.clip_grad, then resume or restart")
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.cfg.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step()
        self.model.update_target(momentum)
        self.step += 1
        return {"loss": loss, "lr": lr, "wd": wd, "momentum": momentum, "out": out}

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Run until `total_steps` (or `stop()` / Ctrl-C). Returns a `TrainResult`."""
        t, main = self.cfg.train, self.dist.is_main
        start, self.last_checkpoint = time.perf_counter(), None
        self._last_save_time = clock()
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(self.cfg, self.out_dir / "config.yaml")
        metrics_file = open(self.out_dir / "metrics.jsonl", "a") if main else None
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not self.progress,
                   dynamic_ncols=True)
        self.model.train()
        stopped = False
        if t.collapse_every and self.collapse_state["step"] is None:
            self.check_collapse()  # the first reading: the reference of collapse_std_ratio, never judged
        try:
            with self._sigint_stops():
                while self.step < self.total_steps and not self._stop:
                    epoch = self.step // self.steps_per_epoch
                    skip = self.step % self.steps_per_epoch  # batches of this epoch already done (resume)
                    tick, n_imgs, epoch_losses = time.perf_counter(), 0, []
                    for i, batch in enumerate(self._iter_epoch(skip)):
                        images = batch[0]
                        m = self.train_step(images)
                        n_imgs += images.shape[0] * self.dist.world_size
                        epoch_losses.append(m["loss"])
                        collapse_stop = bool(t.collapse_every) and self.step % t.collapse_every == 0 \
                            and self.check_collapse()
                        bar.update(1)
                        bar.set_postfix(self._postfix(m))
                        if self.step % t.log_every == 0 or self.step == self.total_steps or collapse_stop:
                            now = time.perf_counter()
                            row = self._metrics_row(epoch, m, n_imgs / max(now - tick, 1e-9))
                            tick, n_imgs = now, 0
                            self.history.append(row)
                            if metrics_file:
                                metrics_file.write(json.dumps(row) + "\n")
                                metrics_file.flush()
                            for cb in self.callbacks:
                                if hasattr(cb, "on_step"):
                                    cb.on_step(self, row)
                        if self.step < self.total_steps and not self._stop and self._checkpoint_due():
                            self.save_checkpoint()  # (a stop writes its checkpoint below)
                        if self.step >= self.total_steps or self._stop:
                            break
                    if self.step % self.steps_per_epoch == 0 or self.step >= self.total_steps:
                        summary = {"epoch": epoch, "step": self.step,
                                   "loss": sum(epoch_losses) / max(1, len(epoch_losses))}
                        if t.keep_epoch_checkpoints and self.step % self.steps_per_epoch == 0:
                            self.save_checkpoint(f"checkpoint_epoch{epoch + 1:03d}.pt")
                        for cb in self.callbacks:
                            if hasattr(cb, "on_epoch"):
                                cb.on_epoch(self, summary)
            stopped = self.step < self.total_steps
            if stopped and self.stop_reason is None:
                self.stop_reason = "stop() or Ctrl-C"
            self.save_checkpoint()
        finally:
            bar.close()
            if metrics_file:
                metrics_file.close()
        return TrainResult(self.model, self.history, self.last_checkpoint, self.step, stopped,
                           time.perf_counter() - start, self.stop_reason)

    def _postfix(self, m: dict) -> dict:
        post = {"loss": f"{m['loss']:.4f}", "lr": f"{m['lr']:.2e}"}
        if self.collapse_state["rankme"] is not None:
            post.update(rankme=f"{self.collapse_state['rankme']:.2f}",
                        feat_std=f"{self.collapse_state['feature_std']:.3g}")
        return post

    def _iter_epoch(self, skip: int):
        """This epoch's batches, without the first `skip` ones (exact mid-epoch resume)."""
        epoch = self.step // self.steps_per_epoch
        if hasattr(self.loader, "set_epoch"):
            try:
                self.loader.set_epoch(epoch, skip_batches=skip)
                yield from self.loader
                return
            except TypeError:  # a loader whose set_epoch takes no skip: skip by hand below
                self.loader.set_epoch(epoch)
        for i, batch in enumerate(self.loader):
            if i >= skip:
                yield batch

    def _metrics_row(self, epoch: int, m: dict, imgs_per_s: float) -> dict:
        out = m["out"]
        with torch.no_grad():
            tgt = out.target.float().flatten(0, -2)  # (B*M*K, D)
            target_std = tgt.std(dim=0).mean().item()  # collapse signal: 0 when all targets are equal
        return {
            "step": self.step, "epoch": epoch, "loss": m["loss"], "lr": m["lr"], "wd": m["wd"],
            "momentum": m["momentum"], "imgs_per_s": imgs_per_s,
            "context_tokens": int(out.masks.context.shape[1]),
            "target_tokens": int(out.masks.targets.shape[1] * out.masks.targets.shape[2]),
            "target_std": target_std, **self._collapse_columns(),
        }

    def _collapse_columns(self) -> dict:
        """The latest collapse check, for the metrics rows: 'probe_rankme', 'probe_std' (and 'stop_reason' when a
        collapse stopped the run). Other names than the dashboard's 'rankme'/'feature_std' (test images)."""
        st, out = self.collapse_state, {}
        if st["rankme"] is not None:
            out.update(probe_rankme=st["rankme"], probe_std=st["feature_std"])
        if self.stop_reason is not None:
            out["stop_reason"] = self.stop_reason
        return out


def train(cfg: Config, callbacks: list | tuple = (), resume: bool | str | Path = False,
          progress: bool = True) -> TrainResult:
    """Build a `Trainer` for `cfg` and run it. See `Trainer`."""
    return Trainer(cfg, callbacks=callbacks, resume=resume, progress=progress).fit()
