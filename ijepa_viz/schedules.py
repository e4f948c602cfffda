"""The official per-iteration schedules of I-JEPA: learning rate, weight decay and EMA momentum.

`schedule(step, total, warmup, cfg.optim)` is a pure function of the step, so the trainer (`ijepa_viz.train`),
the plots of the schedules (`ijepa_viz.viz.plots.plot_schedules`) and a resumed run all read the same curves
without any scheduler state. It sits below the trainer so that drawing a schedule needs no training code.
"""
from __future__ import annotations

import math
from typing import Optional

__all__ = ["schedule", "reg_scale"]


def schedule(step: int, total: int, warmup: int, o, steps_per_epoch: Optional[int] = None
             ) -> tuple[float, float, float]:
    """(lr, weight decay, EMA momentum) at `step` of `total`, as the official per-iteration schedules:

    * lr: linear from start_lr to lr over `warmup` steps, then a cosine from lr down to final_lr;
    * weight decay: a cosine from weight_decay to final_weight_decay over the whole run;
    * momentum: linear from ema_start to ema_end over the whole run,
      m(s) = ema_start + (ema_end - ema_start) * min(s / total, 1).

    Optional EMA warmup (not in the paper; off when optim.ema_warmup_epochs = 0): over the first
    W = round(ema_warmup_epochs * steps_per_epoch) steps the momentum instead rises linearly from
    ema_warmup_start to the official value at W,
      m(s) = ema_warmup_start + (m(W) - ema_warmup_start) * s / W   for s < W,
    then follows the official line. A lower momentum early lets the target encoder keep up with a context
    encoder that is still changing fast, and the curve is continuous at W. It needs `steps_per_epoch`.

    Pure functions of the step (no scheduler state), which keeps resume exact. timm's CosineLRScheduler covers
    the lr alone; the weight-decay and momentum schedules have no library equivalent.
    """
    if step < warmup:
        lr = o.start_lr + (o.lr - o.start_lr) * step / max(1, warmup)
    else:
        p = (step - warmup) / max(1, total - warmup)
        lr = max(o.final_lr, o.final_lr + (o.lr - o.final_lr) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))
    q = min(step / max(1, total), 1.0)
    wd = o.final_weight_decay + (o.weight_decay - o.final_weight_decay) * 0.5 * (1 + math.cos(math.pi * q))
    momentum = o.ema_start + (o.ema_end - o.ema_start) * q
    ema_warmup_epochs = getattr(o, "ema_warmup_epochs", 0.0)
    if ema_warmup_epochs > 0:
        if steps_per_epoch is None:
            raise ValueError("optim.ema_warmup_epochs > 0 needs the steps per epoch: call "
                             "schedule(..., steps_per_epoch=N)")
        w = int(round(ema_warmup_epochs * steps_per_epoch))
        if step < w:
            m_w = o.ema_start + (o.ema_end - o.ema_start) * min(w / max(1, total), 1.0)
            momentum = o.ema_warmup_start + (m_w - o.ema_warmup_start) * step / w
    return lr, wd, momentum


def reg_scale(step: int, total: int, o) -> float:
    """The factor on the optional regularisers' weights at `step` of `total` (`optim.reg_fade`; not in the paper).

    With reg_fade = (a, b), fractions of the run: 1 until step a * total, then linear down to 0 at b * total,
    and 0 after (a = b: a cut). None: always 1. The terms keep the features from collapsing early; fading them
    lets the prediction loss alone shape the features for the rest of the run.
    """
    fade = getattr(o, "reg_fade", None)
    if fade is None:
        return 1.0
    q, (a, b) = step / max(1, total), fade
    if q < a:
        return 1.0
    return 0.0 if q >= b else 1.0 - (q - a) / (b - a)
