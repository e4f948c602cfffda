"""Crash recovery: SIGKILL a CPU training run at random moments (one of them in the middle of a checkpoint
write), and check after each kill that the checkpoint is whole, that at most the steps since the last checkpoint
are lost, and that `--resume` to the end reproduces the losses of an uninterrupted run exactly.

The kill during a write uses the test hook of `ijepa_viz.checkpoint.atomic_write`: with
IJEPA_VIZ_TEST_SLOW_SAVE=<seconds> each checkpoint write sleeps between writing its temporary file and renaming
it over checkpoint.pt, which leaves time to kill the process while the temporary file exists.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ijepa_viz.checkpoint import load_training_checkpoint
from ijepa_viz.train import Trainer
from tiny import TINY, tiny_config

STEPS, EVERY = 120, 2  # enough steps that a fast CPU is still training when each kill lands
EXTRA = [f"train.checkpoint_every={EVERY}", "train.log_every=1"]


def _launch(out: Path, resume: bool, slow_save: float = 0.0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ijepa_viz", "train", "--quiet", "--out", str(out), "--steps", str(STEPS)]
    for item in TINY + EXTRA:
        cmd += ["--set", item]
    if resume:
        cmd.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("IJEPA_VIZ_TEST_SLOW_SAVE", None)
    if slow_save:
        env["IJEPA_VIZ_TEST_SLOW_SAVE"] = str(slow_save)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _steps_logged(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]  # every line must parse


def _temporaries(out: Path) -> list[Path]:
    return sorted(p for p in out.glob(".*") if ".tmp" in p.name)


def _wait(proc: subprocess.Popen, cond, what: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stdout.read()}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()


def _check_after_kill(out: Path) -> int:
    """The state a SIGKILL left: returns the checkpoint's step (0 when none was written yet)."""
    logged = _steps_logged(out)
    last = max(logged, default=0)
    assert sorted(p.name for p in out.glob("*.pt")) in ([], ["checkpoint.pt"])  # temporaries never end in .pt
    if (out / "checkpoint.pt").exists():
        ckpt = load_training_checkpoint(out / "checkpoint.pt")  # never corrupt
        step = int(ckpt["step"])
        assert step % EVERY == 0
    else:
        step = 0
    assert step >= last - EVERY, f"checkpoint at step {step}, but step {last} was logged: more than {EVERY} lost"
    return step


@pytest.mark.slow  # four interpreter starts: about a minute on 2 busy cores
def test_sigkill_at_random_moments_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses: the same reductions, bit for bit
    try:
        ref = Trainer(tiny_config(tmp_path / "ref", f"train.steps={STEPS}", *EXTRA), progress=False).fit()
    finally:
        torch.set_num_threads(threads)
    want = [h["loss"] for h in ref.history]
    assert len(want) == STEPS

    out, rng, steps_at_kill = tmp_path / "run", random.Random(20240229), []

    # 1. a fresh run, killed a random moment after its first metrics line
    proc = _launch(out, resume=False)
    _wait(proc, lambda: len(_steps_logged(out)) >= 1, "the first metrics line")
    time.sleep(rng.uniform(0.0, 0.6))
    _kill(proc)
    steps_at_kill.append(_check_after_kill(out))

    # 2. resumed with slow checkpoint writes, killed while a checkpoint's temporary file exists (mid-write)
    before = len(_steps_logged(out))
    proc = _launch(out, resume=True, slow_save=1.0)
    _wait(proc, lambda: len(_steps_logged(out)) > before and _temporaries(out), "a checkpoint write")
    time.sleep(rng.uniform(0.0, 0.3))  # well inside the 1 s between writing and renaming
    writing = _temporaries(out)
    _kill(proc)
    assert writing and _temporaries(out) == writing, "the kill was meant to land in the middle of a write"
    steps_at_kill.append(_check_after_kill(out))

    # 3. resumed again, killed a random moment after it logged a new step
    before = max(_steps_logged(out), default=0)
    proc = _launch(out, resume=True)
    _wait(proc, lambda: max(_steps_logged(out), default=0) > before + 1, "a new metrics line")
    time.sleep(rng.uniform(0.0, 0.6))
    _kill(proc)
    steps_at_kill.append(_check_after_kill(out))

    # 4. resumed to the end
    proc = _launch(out, resume=True)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert f"done: {STEPS} steps" in output

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # one line per step, no duplicates
    assert [r["loss"] for r in rows] == want  # bit-exact on CPU
    final = load_training_checkpoint(out / "checkpoint.pt")
    assert final["step"] == STEPS
    for k, v in ref.model.state_dict().items():
        assert torch.equal(final["model"][k], v), k
    assert _temporaries(out) == []  # stale temporaries of killed writers are cleaned up by the next write
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.yaml", "metrics.jsonl"]
    print(f"killed with checkpoints at steps {steps_at_kill}")


class Crash(Exception):
    pass


class CrashAt:
    """Raises out of the training loop at a step: the state a kill leaves (metrics lines, no new checkpoint)."""

    def __init__(self, step):
        self.step = step

    def on_step(self, trainer, row):
        if trainer.step == self.step:
            raise Crash


def test_a_run_killed_before_its_first_checkpoint_resumes_from_scratch(tmp_path):
    """--resume with no checkpoint yet starts afresh; the metrics lines of the killed run must not stay."""
    cfg = tiny_config(tmp_path / "run", "train.steps=6", "train.checkpoint_every=4")
    try:
        Trainer(cfg, callbacks=[CrashAt(3)], progress=False).fit()
    except Crash:
        pass
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and len(_steps_logged(tmp_path / "run")) == 3
    Trainer(cfg, resume=True, progress=False).fit()
    ref = Trainer(tiny_config(tmp_path / "ref", "train.steps=6", "train.checkpoint_every=4"), progress=False).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["loss"] for r in rows] == [h["loss"] for h in ref.history]
