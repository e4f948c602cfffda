"""Multi-process training: `torchrun --standalone --nproc_per_node=2` on CPU (gloo) against one process with the
same global batch.

Why they can match: both processes draw the masks of the whole global batch and keep rows rank::2
(`Trainer._batch_masks`), the loader gives rank r rows r::2 of each global batch with the crops drawn for the
whole batch (`ijepa_viz.data.InMemoryLoader`), and DDP averages the two ranks' gradients, which equals the
gradient of the mean loss over the global batch because both halves hold the same number of elements.

Why not bit for bit: the sums run in another order (two half-batch means averaged by an all-reduce instead of one
mean), which changes the last bits of each gradient (float32: ~1e-7 relative), and AdamW's division by sqrt(v)
can amplify such differences for gradients near zero. Measured here: at most 6e-8 after 4 steps. The tolerance,
atol 1e-5 and rtol 1e-4, leaves room for other CPUs and thread counts and stays far below one optimiser step
(~2e-4 per element in the first steps), so a wrong shard, mask or crop fails it (the weights move by ~2e-3).
"""
import json
import os
import subprocess
import sys

import torch

from ijepa_viz.checkpoint import load_training_checkpoint
from ijepa_viz.train import Trainer
from tiny import TINY, tiny_config

STEPS = 4
EXTRA = ["train.device=cpu", "train.checkpoint_every=2", "model.drop_path_rate=0.0"]
ATOL, RTOL = 1e-5, 1e-4


def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ijepa_viz", "train", "--quiet", "--out", str(out), "--steps", str(STEPS)]
    for item in TINY + EXTRA:
        cmd += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("done: ") == 1, proc.stdout  # only rank 0 reports

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = Trainer(tiny_config(tmp_path / "single", f"train.steps={STEPS}", *EXTRA), progress=False).fit()
    finally:
        torch.set_num_threads(threads)

    # only rank 0 wrote: one metrics line per step, no duplicates, no other files
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.yaml", "metrics.jsonl"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # rank 0 logs the loss of its half of the batch: it differs from the global loss, proof that it was sharded
    assert [r["loss"] for r in rows] != [h["loss"] for h in single.history]

    ckpt = load_training_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == STEPS
    want = single.model.state_dict()
    assert set(ckpt["model"]) == set(want)
    worst = max((ckpt["model"][k] - v).abs().max().item() for k, v in want.items() if v.is_floating_point())
    for k, v in want.items():
        assert torch.allclose(ckpt["model"][k], v, atol=ATOL, rtol=RTOL), (k, worst)
    moved = max((v - w0).abs().max().item() for (k, v), w0 in
                zip(want.items(), Trainer(tiny_config(tmp_path / "init", *EXTRA), progress=False).model
                    .state_dict().values()) if v.is_floating_point())
    assert moved > 100 * ATOL  # the weights did move: the comparison is not trivially true
    print(f"largest weight difference after {STEPS} steps: {worst:.2e} (weights moved by up to {moved:.2e})")
