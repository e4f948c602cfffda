"""Tests of ijepa_viz.evaluate: probes on synthetic features, collapse metrics, features of a tiny ViT, prediction
metrics and the evaluation table of a tiny checkpoint trained on the built-in shapes data."""
from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest
import torch

from ijepa_viz.config import get_preset, override
from ijepa_viz.masks import MaskCollator
from ijepa_viz.model import IJEPA

E = importlib.import_module("ijepa_viz.evaluate")  # the module (the package's lazy `evaluate` is the function)
P = importlib.import_module("ijepa_viz.probes")  # the probes' internals (E.linear_probe is P.linear_probe)

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


@pytest.mark.parametrize("backend", E.LINEAR_BACKENDS)
def test_linear_probe_chooses_C_without_looking_at_the_test_set(separable, monkeypatch, backend):
    train_x, train_y, test_x, test_y = separable
    Cs = (1e-4, 1e-2, 1.0)
    clean = E.linear_probe(train_x, train_y, test_x, test_y, Cs=Cs, backend=backend)
    garbage_x, garbage_y = noise(len(test_x), 5, test_x.shape[1], seed=7)
    dirty = E.linear_probe(train_x, train_y, garbage_x * 100, garbage_y, Cs=Cs, backend=backend)
    assert dirty["C"] == clean["C"] and dirty["val_accuracy"] == clean["val_accuracy"]
    assert dirty["accuracy"] < 0.5 < clean["accuracy"]  # the test set was only used for the final score

    # The test features are touched only after the last fit: every array scored before comes from training.
    events = []
    if backend == "sklearn":
        from sklearn.linear_model import LogisticRegression

        real_score = LogisticRegression.score
        monkeypatch.setattr(LogisticRegression, "score",
                            lambda self, x, y: events.append(("score", len(x))) or real_score(self, x, y))
        E.linear_probe(train_x, train_y, test_x, test_y, Cs=Cs, backend=backend)
        assert events == [("score", 40)] * len(Cs) + [("score", len(test_x))]  # 10% of 400 held out, then test
    else:
        real_design, real_lbfgs = P._Design, P._lbfgs
        monkeypatch.setattr(P, "_Design", lambda x, *a: events.append(("features", len(x))) or real_design(x, *a))
        monkeypatch.setattr(P, "_lbfgs", lambda *a, **k: events.append(("fit",)) or real_lbfgs(*a, **k))
        E.linear_probe(train_x, train_y, test_x, test_y, Cs=Cs, backend=backend)
        assert events == [("features", 400)] + [("fit",)] * (len(Cs) + 1) + [("features", len(test_x))]


def hidden_signal(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes told apart only by x0 - x1: both carry one large shared noise, and x0 a small class offset. A
    strong penalty leaves the probe at chance (it leans on the class means, which the noise swamps); a weak one
    finds x0 - x1 and is near perfect. Untrained encoders' features behave like this."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    shared = 20 * torch.randn(n, generator=g)
    x = torch.stack([shared + y.float(), shared, torch.randn(n, generator=g)], dim=1)
    return x + 0.05 * torch.randn(n, 3, generator=g), y


@pytest.mark.parametrize("backend", E.LINEAR_BACKENDS)
def test_linear_probe_walks_past_a_flat_start_at_chance(backend):
    train_x, train_y = hidden_signal(800, seed=0)
    test_x, test_y = hidden_signal(400, seed=1)
    Cs = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
    first = E.linear_probe(train_x, train_y, test_x, test_y, Cs=Cs[:1], backend=backend)
    assert first["accuracy"] < 0.5  # the smallest C alone: near chance (0.25)
    full = E.linear_probe(train_x, train_y, test_x, test_y, Cs=Cs, backend=backend)  # patience=2
    assert full["C"] >= 1.0 and full["accuracy"] > 0.8  # the plateau did not end the path (it did: 27% at 1e-4)


def test_linear_probe_rejects_an_unknown_backend(separable):
    with pytest.raises(ValueError, match="backend"):
        E.linear_probe(*separable, backend="liblinear")


def test_linear_probe_puts_the_thread_count_back(separable):
    threads = torch.get_num_threads()
    E.linear_probe(*separable, Cs=(1.0,))  # runs its small steps on one thread
    assert torch.get_num_threads() == threads


# -- the torch probe against scikit-learn on image features ------------------------------------------------

def render_outlines(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """n images uint8 (n, 3, size, size) of 8 classes of light shapes (disc, square, bars, cross, ring, triangle,
    diagonal) shifted by up to 2 px, in a random colour on a random dark background, with pixel noise: real
    pictures that a linear probe on pixels classifies well but not perfectly."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 8
    c = torch.arange(size) - (size - 1) / 2
    v, u = torch.meshgrid(c, c, indexing="ij")
    shift = torch.randint(-2, 3, (n, 2), generator=g).float()
    v, u = v - shift[:, :1, None], u - shift[:, 1:, None]  # (n, size, size)
    r = (u ** 2 + v ** 2).sqrt()
    masks = torch.stack([r < 4, (u.abs() < 3.5) & (v.abs() < 3.5), (v.abs() < 1.5) & (u.abs() < 5),
                         (u.abs() < 1.5) & (v.abs() < 5), ((u.abs() < 1.2) | (v.abs() < 1.2)) & (r < 5),
                         (r > 2.5) & (r < 4.5), (v > -3) & (v < 4) & (u.abs() < (v + 3) / 2), (u - v).abs() < 1.5],
                        dim=1)  # (n, 8, size, size)
    mask = masks[torch.arange(n), y].float()[:, None]
    fg, bg = 0.5 + 0.5 * torch.rand(n, 3, 1, 1, generator=g), 0.4 * torch.rand(n, 3, 1, 1, generator=g)
    images = mask * fg + (1 - mask) * bg + 0.1 * torch.randn(n, 3, size, size, generator=g)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), y


def _vit_features(images: torch.Tensor, labels: torch.Tensor, stats) -> torch.Tensor:
    """Average-pooled features of a randomly initialised ViT (16 px, 4 px patches, 64 dims, 2 blocks)."""
    cfg = override(get_preset("cpu-tiny"), ["model.img_size=16", "model.patch_size=4", "model.embed_dim=64",
                                            "model.depth=2", "model.num_heads=2", "model.pred_embed_dim=16",
                                            "model.pred_depth=1"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = IJEPA(cfg.model).target_network
    return E.extract_features(encoder, E._EvalBatches(images, labels, 400, 16, stats), progress=False)[0]


@pytest.fixture(scope="module")
def image_features():
    """Train and test features of two real image sets, each as raw uint8 pixels and as ViT features:
    'outlines' (rendered here, 8 classes) and 'shapes' (the built-in dataset at 16 px, 10 classes)."""
    from ijepa_viz.data import dataset_stats, load_uint8

    cfg = override(get_preset("cpu-tiny"), ["data.name=shapes", "data.shapes_train_size=1500",
                                            "data.shapes_test_size=800"])
    sets = {"outlines": (render_outlines(1600, seed=0), render_outlines(800, seed=1)),
            "shapes": (load_uint8(cfg.data, "train", 16), load_uint8(cfg.data, "test", 16))}
    out = {}
    for name, ((train_img, train_y), (test_img, test_y)) in sets.items():
        stats = dataset_stats("shapes")
        out[f"{name} pixels"] = (train_img.flatten(1), train_y, test_img.flatten(1), test_y)
        out[f"{name} vit"] = (_vit_features(train_img, train_y, stats), train_y,
                              _vit_features(test_img, test_y, stats), test_y)
    return out


@pytest.mark.parametrize("which, Cs", [("outlines pixels", None), ("outlines vit", None),
                                       ("shapes pixels", (0.1,)), ("shapes vit", (0.1,))])
def test_torch_probe_agrees_with_sklearn_on_image_features(image_features, which, Cs, monkeypatch):
    """The whole probe (C search on held-out training images, refit, test) against scikit-learn run to
    convergence on the same features: within 1 accuracy point. (With its default tol=1e-4, scikit-learn stops
    far from the minimum when classes are nearly separable.) 'shapes' at 16 px is near chance for both
    feature sets, where the held-out accuracies of different Cs tie within rounding, so it is compared at
    one C."""
    from sklearn.linear_model import LogisticRegression

    feats = image_features[which]
    kw = {} if Cs is None else {"Cs": Cs}
    ours = E.linear_probe(*feats, **kw)
    monkeypatch.setattr(P, "_logreg", lambda C, max_iter, warm_start=False: LogisticRegression(
        C=C, max_iter=max_iter, warm_start=warm_start, tol=1e-8))
    reference = E.linear_probe(*feats, backend="sklearn", max_iter=10000, **kw)
    assert abs(ours["accuracy"] - reference["accuracy"]) <= 0.01, (ours, reference)
    if Cs is None:
        assert ours["C"] == reference["C"], (ours, reference)
        assert abs(ours["val_accuracy"] - reference["val_accuracy"]) <= 0.01, (ours, reference)
        assert ours["accuracy"] > 0.25  # far above chance (1/8): the comparison means something


@pytest.mark.parametrize("which, C", [("outlines pixels", 0.01), ("outlines pixels", 10.0), ("outlines vit", 1.0)])
def test_torch_probe_minimises_sklearns_objective(image_features, which, C, monkeypatch):
    """At one C both solvers minimise sum CE + ||W||^2 / (2C): the torch solution is at least as good as a
    converged scikit-learn one, by that objective, and they classify the test images alike."""
    from sklearn.linear_model import LogisticRegression

    train_x, train_y, test_x, test_y = image_features[which]
    fits, real_lbfgs = [], P._lbfgs

    def spy(fun, W, b, *args, **kwargs):  # keeps the objective and the solution of each fit
        fits.append((fun, real_lbfgs(fun, W, b, *args, **kwargs)))
        return fits[-1][1]

    monkeypatch.setattr(P, "_lbfgs", spy)
    ours = E.linear_probe(train_x, train_y, test_x, test_y, Cs=(C,))
    x_train, x_test = P._standardised(train_x.float().numpy(), test_x.float().numpy())
    clf = LogisticRegression(C=C, max_iter=10000, tol=1e-8).fit(x_train, train_y.numpy())
    assert abs(ours["accuracy"] - clf.score(x_test, test_y.numpy())) <= 0.01

    # The same objective (standardised with the whole training set's mean and std, as StandardScaler does).
    (objective, (W, b, _, _)), = fits
    theirs = objective(torch.as_tensor(clf.coef_.T, dtype=torch.float32),
                       torch.as_tensor(clf.intercept_, dtype=torch.float32))[0]
    assert objective(W, b)[0] <= theirs * (1 + 1e-4)


def test_int8_products_are_exact(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (300, 40), dtype=torch.uint8, generator=g)
    m, r = torch.randn(40, 7, generator=g), torch.randn(300, 7, generator=g)
    monkeypatch.setattr(P, "_INT8_SPAN", 128)  # exercise the chunked sums of tmm
    try:  # the arithmetic is checked wherever torch._int_mm runs at all, fast (VNNI) or not
        torch._int_mm(torch.ones(32, 8, dtype=torch.int8), torch.ones(8, 8, dtype=torch.int8))
    except (AttributeError, RuntimeError, NotImplementedError):
        pytest.skip("torch._int_mm is not available here")
    monkeypatch.setattr(P, "_INT_MM", True)
    X = P._Design(x)
    assert X.int8
    xs = x.double() - 128
    for ours, exact in ((X.mm(m), xs @ m.double()), (X.tmm(r), xs.T @ r.double())):
        assert (ours.double() - exact).abs().max() <= 1e-6 * exact.abs().max()  # float32's rounding, no more
    mean, std = X.moments(torch.arange(0, 300, 2))
    assert torch.allclose(mean.double(), x[::2].double().mean(0), atol=1e-4)
    assert torch.allclose(std.double(), x[::2].double().std(0, correction=0), rtol=1e-5)


def test_int8_products_only_where_the_cpu_has_int8_dot_products(monkeypatch):
    # Without VNNI or AMX, torch._int_mm is a plain loop (50x slower than float32 on an AVX2 CPU): float path.
    monkeypatch.setattr(P, "_INT_MM", None)
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not P._has_int_mm()
    assert not P._Design(torch.zeros(4, 3, dtype=torch.uint8)).int8


def test_probes_give_the_same_answer_for_uint8_and_float_pixels(image_features, monkeypatch):
    train_x, train_y, test_x, test_y = image_features["outlines pixels"]
    as_float = (train_x.float() / 255, train_y, test_x.float() / 255, test_y)
    assert E.knn_classifier(train_x, train_y, test_x, test_y) == E.knn_classifier(*as_float)
    exact = E.linear_probe(train_x, train_y, test_x, test_y, Cs=(0.01, 0.1))
    floats = E.linear_probe(*as_float, Cs=(0.01, 0.1))
    assert exact["C"] == floats["C"] and abs(exact["accuracy"] - floats["accuracy"]) <= 0.005
    monkeypatch.setattr(P, "_INT_MM", False)  # a torch without int8 matmul takes the float path
    assert E.linear_probe(train_x, train_y, test_x, test_y, Cs=(0.01, 0.1))["accuracy"] == floats["accuracy"]


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


def test_extract_keeps_patches_from_the_same_forward_pass(tiny_model):
    model, _ = tiny_model
    keep = np.array([1, 5, 11])
    kw = dict(progress=False, precision="fp32")
    pooled, labels, patches = E._extract(model.target_network, _batches(), keep_patches=keep, **kw)
    ref_pooled, ref_labels = E.extract_features(model.target_network, _batches(), **kw)
    ref_patches, _ = E.extract_features(model.target_network, _batches(), pool="none", **kw)
    assert torch.allclose(pooled, ref_pooled, atol=1e-6) and torch.equal(labels, ref_labels)
    assert patches.shape == (3, 16, 32) and torch.allclose(patches, ref_patches[keep], atol=1e-6)


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

    timings = result["timings"]  # seconds per phase, in the order they ran
    assert list(timings)[:3] == ["load checkpoint", "images", "features: ijepa (target encoder)"]
    for phase in ("linear", "knn"):
        assert all(f"{phase}: {name}" in timings for name in names)
    assert all(v >= 0 for v in timings.values()) and timings["total"] == result["seconds"]
    assert sum(v for k, v in timings.items() if k != "total") <= timings["total"]
    lines = E.format_timings(result).splitlines()
    assert len(lines) == len(timings) + 1 and any(line.split()[:3] == ["features:", "random", "init"] for line in lines)


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


def test_evaluate_streams_a_dataset_that_is_not_held_in_memory(tiny_checkpoint):
    """With data.in_memory=false the encoders read the DataLoader path; the rows are the same kind."""
    from ijepa_viz.train import load_model

    model, cfg = load_model(tiny_checkpoint[0])
    streamed = E.evaluate(model=model, cfg=override(cfg, ["data.in_memory=false"]), progress=False)
    in_memory = E.evaluate(model=model, cfg=cfg, progress=False)
    assert streamed["n_train"] == 64 and streamed["n_test"] == 32
    for a, b in zip(streamed["rows"], in_memory["rows"]):
        assert a["name"] == b["name"] and 0 <= a["linear"] <= 1 and 0 <= a["knn"] <= 1
    assert streamed["rows"][2] == in_memory["rows"][2]  # raw pixels: the same uint8 images either way


def test_evaluate_reuses_the_split_the_training_loader_decoded(tiny_checkpoint, monkeypatch):
    from ijepa_viz.data import UInt8Cache, build_loader
    from ijepa_viz.train import load_model

    model, cfg = load_model(tiny_checkpoint[0])
    UInt8Cache.clear_memo()
    build_loader(cfg.data, "train", cfg.model.img_size, train=True, seed=0)  # what training decoded
    rendered, real = [], UInt8Cache._render_builtin.__func__
    monkeypatch.setattr(UInt8Cache, "_render_builtin",
                        classmethod(lambda cls, data, split, *a: rendered.append(split) or real(cls, data, split, *a)))
    E.evaluate(model=model, cfg=cfg, progress=False)
    assert rendered == ["test"]  # the training split came from memory, and each split is made once


def test_feature_cache_gives_the_same_result_and_is_keyed_by_weights_and_images(tiny_checkpoint, tmp_path,
                                                                                 monkeypatch):
    from ijepa_viz.train import load_model

    model, cfg = load_model(tiny_checkpoint[0])
    cache = tmp_path / "features"
    calls = []
    real = E._extract
    monkeypatch.setattr(E, "_extract", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(m, c=cfg, **kw):
        calls.clear()
        out = E.evaluate(model=m, cfg=c, progress=False, feature_cache=cache, **kw)
        return out, len(calls)

    plain = E.evaluate(model=model, cfg=cfg, progress=False)
    first, n_first = run(model)
    again, n_again = run(model)
    assert n_first == 4 and n_again == 0  # 2 encoders x 2 splits, then nothing
    assert first["feature_cache"]["cached"] == [] and len(again["feature_cache"]["cached"]) == 2
    assert "features: random init (cached)" in again["timings"]
    for a, b, c in zip(plain["rows"], first["rows"], again["rows"]):
        assert a == b == c  # the cache changes the time, never the numbers
    # other weights: only the trained encoder runs again (the untrained one is the same for every checkpoint)
    other = load_model(tiny_checkpoint[0])[0]
    with torch.no_grad():
        next(other.target_network.parameters()).add_(0.5)
    changed, n_changed = run(other)
    assert n_changed == 2 and changed["feature_cache"]["cached"] == ["random init"]
    # other images (fewer of them): nothing is reused
    _, n_fewer = run(model, limit_train=20)
    assert n_fewer == 2  # the train split of both encoders; the test split is unchanged
    # a damaged file is computed again, not trusted
    for f in cache.glob("*.pt"):
        f.write_bytes(b"not a tensor file")
    _, n_damaged = run(model)
    assert n_damaged == 4
    # the folder keeps at most FEATURE_CACHE_FILES files
    import ijepa_viz.feature_cache as FC

    monkeypatch.setattr(FC, "FEATURE_CACHE_FILES", 3)
    run(other)
    assert len(list(cache.glob("*.pt"))) == 3


def test_eval_cli_uses_the_feature_cache_folder(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from ijepa_viz.cli import main

    monkeypatch.setenv("IJEPA_VIZ_FEATURE_CACHE", str(tmp_path / "env"))
    assert main(["eval", "--checkpoint", str(tiny_checkpoint[0]), "--quiet"]) == 0
    assert len(list((tmp_path / "env").glob("*.pt"))) == 4
    assert main(["eval", "--checkpoint", str(tiny_checkpoint[0]), "--quiet"]) == 0
    assert "(cached)" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(tiny_checkpoint[0]), "--quiet", "--feature-cache",
                 str(tmp_path / "flag")]) == 0
    assert len(list((tmp_path / "flag").glob("*.pt"))) == 4
    assert main(["eval", "--checkpoint", str(tiny_checkpoint[0]), "--quiet", "--no-feature-cache",
                 "--feature-cache", str(tmp_path / "off")]) == 0
    assert not (tmp_path / "off").exists()
    (tmp_path / "a_file").write_text("x")
    assert main(["eval", "--checkpoint", str(tiny_checkpoint[0]), "--quiet", "--feature-cache",
                 str(tmp_path / "a_file")]) != 0
    assert "is a file, not a folder" in capsys.readouterr().err


def test_prediction_metrics_on_held_out_images(tiny_checkpoint):
    from ijepa_viz.train import load_model

    model, cfg = load_model(tiny_checkpoint[0])
    out = E.prediction_metrics_on(model, cfg, n_images=20)
    assert all(math.isfinite(v) for v in out.values())
    assert out == E.prediction_metrics_on(model, cfg, n_images=20)  # seeded
