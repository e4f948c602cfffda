"""benchmarks/sweep.py: jobs train, get probed and land in the results file; the budget and bad jobs are handled."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sweep  # noqa: E402

MODEL = ["model.img_size=16", "model.patch_size=2", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
         "model.pred_embed_dim=16", "model.pred_depth=1", "mask.min_keep=1", "mask.num_targets=1",
         "data.batch_size=8", "train.precision=fp32"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """An ImageFolder tree, ROOT/{train,test}/{a,b,c}/*.png, of 16 px images whose colour gives the class."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        for c, cls in enumerate("abc"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 60, size=(16, 16, 3), dtype=np.uint8)
                arr[..., c] += 180
                Image.fromarray(arr).save(root / split / cls / f"{i}.png")
    return root


def _run(tree, tmp_path, *args):
    results = tmp_path / "rows.jsonl"
    rows = sweep.main(["--data-root", str(tree), "--results", str(results), "--out", str(tmp_path / "runs"),
                       "--limit-train", "24", "--device", "cpu", *[a for s in MODEL for a in ("--set", s)], *args])
    return rows, results


def test_jobs_train_get_probed_and_are_written(tree, tmp_path):
    rows, results = _run(tree, tmp_path, "--job", "plain", "train.steps=2",
                         "--job", "lr", "train.steps=2", "optim.lr=5e-4", "--workers", "2")
    assert sorted(r["name"] for r in rows) == ["lr", "plain"]
    written = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["name"] for r in written) == ["lr", "plain"]
    for row in written:
        assert row["complete"] and row["steps"] == 2 and row["device"] == "cpu"
        assert 0 <= row["linear"] <= 1 and 0 <= row["knn"] <= 1 and 0 <= row["context_linear"] <= 1
        assert row["n_probe_train"] == 24 and row["rankme"] >= 1
    assert next(r for r in written if r["name"] == "lr")["overrides"][-1] == "optim.lr=5e-4"


def test_a_bad_job_is_reported_and_the_others_still_run(tree, tmp_path):
    rows, _ = _run(tree, tmp_path, "--job", "bad", "optim.learning_rate=1", "--job", "good", "train.steps=1")
    bad, good = (next(r for r in rows if r["name"] == n) for n in ("bad", "good"))
    assert "ConfigError" in bad["error"] and "optim.learning_rate" in bad["error"]
    assert good["complete"]


def test_no_job_starts_without_budget(tree, tmp_path, capsys):
    rows, results = _run(tree, tmp_path, "--job", "late", "train.steps=1", "--budget", "0")
    assert rows == [] and not results.exists()
    assert "[late] skipped: too little budget left" in capsys.readouterr().out


def test_grids_hold_valid_overrides():
    from ijepa_viz.config import get_preset, override

    assert [name for name, _ in sweep.GRIDS["ablations"]] == [
        "base", "strategy=block", "strategy=random", "strategy=quadrant", "target=pixels", "ema=off",
        "num_targets=1"]
    for jobs in sweep.GRIDS.values():
        for _, sets in jobs:
            override(get_preset("cpu-tiny"), sets).validate()
