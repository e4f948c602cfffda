"""Tests of ijepa_viz.evaluate: probes on synthetic features, collapse metrics, features of a tiny ViT, prediction
metrics and the evaluation table of a tiny checkpoint trained on the built-in shapes data."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ijepa_viz import evaluate as E
from ijepa_viz.config import get_preset, override
from ijepa_viz.masks import MaskCollator
from ijepa_viz.model import IJEPA

TINY_MODEL = ["model.img_size=16", "model.patch_size=2", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
              "model.pred_embed_dim=16", "model.pred_depth=1", "mask.min_keep=2"]
TINY_DATA = ["data.name=shapes", "data.shapes_train_size=64", "data.shapes_test_size=32", "data.batch_size=16"]


# -- synthetic features ------------------------------------------------------------------------------------

def blobs(n: int, classes: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n points (n, dim) around `classes` random centres 10 apart on average, with noise of std `spread`."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 10
    y = torch.arange(n) % classes
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


def noise(n: int, classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels that have nothing to do with each other."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.fixture(scope="module")
def separable():
    return (*blobs(400, 5, 16, 1.0, seed=0), *blobs(200, 5, 16, 1.0, seed=1))


@pytest.fixture(scope="module")
def unrelated():
    return (*noise(600, 4, 16, seed=0), *noise(800, 4, 16, seed=1))


def test_probes_are_near_perfect_on_separable_blobs(separable):
    assert E.linear_probe(*separable)["accuracy"] > 0.95
    assert E.knn_classifier(*separable) > 0.95


def test_probes_are_at_chance_on_noise(unrelated):
    chance = 1 / 4
    assert abs(E.linear_probe(*unrelated)["accuracy"] - chance) < 0.1
    assert abs(E.knn_classifier(*unrelated, num_classes=4) - chance) < 0.1


def test_linear_probe_chooses_C_without_looking_at_the_test_set(separable, monkeypatch):
    train_x, train_y, test_x, test_y = separable
    Cs = (1e-4, 1e-2, 1.0)
    clean = E.linear_probe(train_x, train_y, test_x, test_y, Cs=Cs)
    garbage_x, garbage_y = noise(len(test_x), 5, test_x.shape[1], seed=7)
    dirty = E.linear_probe(train_x, train_y, garbage_x * 100, garbage_y, Cs=Cs)
    assert dirty["C"] == clean["C"] and dirty["val_accuracy"] == clean["val_accuracy"]
    assert dirty["accuracy"] < 0.5 < clean["accuracy"]  # the test set was only used for the final score

    # Every array the probe scores during the C search comes from the training features.
    from sklearn.linear_model import LogisticRegression

    seen, real_score = [], LogisticRegression.score
    monkeypatch.setattr(LogisticRegression, "score", lambda self, x, y: seen.append(len(x)) or real_score(self, x, y))
    E.linear_probe(train_x, train_y, test_x, test_y, Cs=Cs)
    assert seen[:-1] == [40] * len(Cs) and seen[-1] == len(test_x)  # 10% of 400 held out, then the test set


def test_knn_uses_the_k_nearest_neighbours():
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    train_y = torch.tensor([0, 0, 1])
    test_x = torch.tensor([[0.1, 1.0]])
    assert E.knn_classifier(train_x, train_y, test_x, torch.tensor([1]), k=1) == 1.0
    assert E.knn_classifier(train_x, train_y, test_x, torch.tensor([0]), k=3, temperature=10.0) == 1.0  # 2 vs 1


# -- collapse metrics --------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 5, 20])
def test_rankme_of_a_rank_k_matrix_is_about_k(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(256, k, generator=g) @ torch.randn(k, 64, generator=g)  # (256, 64) of rank k
    assert abs(E.rankme(x) - k) <= 0.15 * k


def test_feature_std_is_zero_under_collapse_and_positive_otherwise():
    assert E.feature_std(torch.ones(10, 8) * torch.randn(1, 8)) == pytest.approx(0.0, abs=1e-6)
    spread = E.feature_std(torch.randn(2000, 64, generator=torch.Generator().manual_seed(0)))
    assert spread == pytest.approx(1 / math.sqrt(64), rel=0.05)


def test_collapse_metrics_keys():
    g = torch.Generator().manual_seed(0)
    out = E.collapse_metrics(torch.randn(20, 8, generator=g), torch.randn(20, 4, 8, generator=g))
    assert set(out) == {"pooled_std", "pooled_rankme", "patch_std", "patch_rankme"}
    assert all(math.isfinite(v) for v in out.values())
    assert E.collapse_metrics(torch.randn(20, 8))["patch_std"] is None


# -- features and prediction metrics of a tiny model -------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    cfg = override(get_preset("cpu-tiny"), ["model.img_size=16", "model.patch_size=4", "model.embed_dim=32",
                                            "model.depth=2", "model.num_heads=2", "model.pred_embed_dim=16",
                                            "model.pred_depth=1"])
    torch.manual_seed(0)
    return IJEPA(cfg.model), cfg


def _batches(n_batches: int = 3, b: int = 4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(b, 3, 16, 16, generator=g), torch.arange(b)) for _ in range(n_batches)]


@pytest.mark.parametrize("pool, n_last, shape", [("avg", 1, (12, 32)), ("none", 1, (12, 16, 32)),
                                                 ("avg", 2, (12, 64)), ("none", 2, (12, 16, 64))])
def test_extract_features_shapes(tiny_model, pool, n_last, shape):
    model, _ = tiny_model
    model.train()
    x, y = E.extract_features(model.target_network, _batches(), pool=pool, n_last=n_last, progress=False)
    assert tuple(x.shape) == shape and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert y.dtype == torch.long and y.tolist() == [0, 1, 2, 3] * 3
    assert model.training  # the mode is put back


def test_extract_features_limit_and_last_layer(tiny_model):
    model, _ = tiny_model
    x, y = E.extract_features(model.encoder, _batches(), limit=6, progress=False)
    assert x.shape == (6, 32) and y.shape == (6,)
    both, _ = E.extract_features(model.encoder, _batches(), n_last=2, limit=6, progress=False)
    assert torch.allclose(both[:, 32:], x, atol=1e-5)  # the last of the n_last layers is the output


def test_prediction_metrics_are_finite(tiny_model):
    model, cfg = tiny_model
    cfg = override(cfg, ["mask.min_keep=0"])
    masks = MaskCollator(cfg.mask, cfg.grid_size, seed=0).sample(4, step=0)
    out = E.prediction_metrics(model, torch.randn(4, 3, 16, 16), masks)
    assert set(out) == {"cosine", "l2", "baseline_cosine", "baseline_l2"}
    assert all(math.isfinite(v) for v in out.values())
    assert -1 <= out["cosine"] <= 1 and out["l2"] >= 0


def test_raw_pixel_features():
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    x = E.raw_pixel_features(images)
    assert x.shape == (5, 192) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert E.raw_pixel_features(images, size=4).shape == (5, 48)


# -- the evaluation table of a tiny checkpoint ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from ijepa_viz.train import Trainer

    out = tmp_path_factory.mktemp("run")
    cfg = override(get_preset("cpu-tiny"), TINY_MODEL + TINY_DATA + [
        "train.steps=2", f"train.out_dir={out}", "train.device=cpu", "train.precision=fp32"])
    result = Trainer(cfg, progress=False).fit()
    return result.checkpoint, cfg


def test_evaluate_tiny_checkpoint(tiny_checkpoint):
    path, cfg = tiny_checkpoint
    result = E.evaluate(path, progress=False)
    names = [r["name"] for r in result["rows"]]
    assert names == ["ijepa (target encoder)", "random init", "raw pixels"]
    assert result["n_train"] == 64 and result["n_test"] == 32 and result["data"] == "shapes"
    for row in result["rows"]:
        assert 0 <= row["linear"] <= 1 and 0 <= row["knn"] <= 1
    assert result["rows"][0]["rankme"] >= 1 and result["rows"][0]["pooled_std"] >= 0
    json.dumps(result)  # the CLI writes it as JSON

    table = E.format_table(result)
    for name in names:
        assert name in table
    assert "%" in table


def test_evaluate_model_with_limits_and_one_probe(tiny_checkpoint):
    from ijepa_viz.train import load_model

    path, _ = tiny_checkpoint
    model, cfg = load_model(path)
    result = E.evaluate(model=model, cfg=cfg, probes=("knn",), limit_train=30, limit_test=10, progress=False)
    assert result["n_train"] == 30 and result["n_test"] == 10
    assert all("linear" not in r and "knn" in r for r in result["rows"])
    assert "linear" not in E.format_table(result)
    with pytest.raises(ValueError, match="probes"):
        E.evaluate(model=model, cfg=cfg, probes=("svm",))
    with pytest.raises(ValueError, match="cfg"):
        E.evaluate(model=model)


def test_prediction_metrics_on_held_out_images(tiny_checkpoint):
    from ijepa_viz.train import load_model

    model, cfg = load_model(tiny_checkpoint[0])
    out = E.prediction_metrics_on(model, cfg, n_images=20)
    assert all(math.isfinite(v) for v in out.values())
    assert out == E.prediction_metrics_on(model, cfg, n_images=20)  # seeded
