"""Feature visualisation: compute (embeddings, projections, prediction maps, retrieval), draw and wire layers."""
import datetime
import io

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from PIL import Image

from ijepa_viz.data import class_names, load_uint8
from ijepa_viz.masks import MaskCollator
from ijepa_viz.viz import feature_plots as fp
from ijepa_viz.viz import feature_widgets as fw
from ijepa_viz.viz import features as fx
from ijepa_viz.config import override as ij_override
from tiny import tiny_config

NOW = datetime.datetime.now(datetime.timezone.utc)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return tiny_config(tmp_path_factory.mktemp("run"))  # 16 px, patch 2: an 8x8 grid, D=32


@pytest.fixture(scope="module")
def model(cfg):
    return fw.untrained_model(cfg, seed=1)


@pytest.fixture(scope="module")
def other(cfg):
    return fw.untrained_model(cfg, seed=2)


@pytest.fixture(scope="module")
def data(cfg):
    return load_uint8(cfg.data, "test", cfg.model.img_size, limit=16)


def _masks(cfg, seed=0):
    return MaskCollator(cfg.mask, cfg.grid_size, seed=seed).sample(1, step=0)


def _ax():
    return Figure().add_subplot()


# -- compute -------------------------------------------------------------------------------------------

def test_embed_shapes_pools_and_matches_the_target_encoder(model, cfg, data):
    images, _ = data
    pooled = fx.embed(model, images, cfg)
    patches = fx.embed(model, images, cfg, pool="none", batch_size=5)  # batches must not change the result
    assert pooled.shape == (16, 32) and patches.shape == (16, 64, 32) and pooled.dtype == torch.float32
    assert torch.allclose(patches.mean(1), pooled, atol=1e-5)
    with torch.no_grad():
        direct = model.target_network(fx.as_input(images, cfg))
    assert torch.allclose(direct, patches, atol=1e-5)
    normed = fx.embed(model, images, cfg, pool="none", normalize=True)
    assert torch.allclose(normed.mean(-1), torch.zeros(16, 64), atol=1e-5)
    # a float image already normalised gives the same features as its uint8 original
    assert torch.allclose(fx.embed(model, fx.as_input(images, cfg), cfg), pooled, atol=1e-5)


def test_embed_cache_hits_for_same_weights_and_misses_after_they_change(cfg, data):
    images, _ = data
    m = fw.untrained_model(cfg, seed=3)
    fx.clear_cache()
    a = fx.embed(m, images, cfg)
    b = fx.embed(m, images, cfg)
    assert b is a and fx._EMBED_CACHE.hits == 1
    with torch.no_grad():
        m.target_encoder.norm.bias.add_(0.5)
    c = fx.embed(m, images, cfg)
    assert c is not a and not torch.allclose(a, c)
    assert not torch.allclose(fx.embed(m, images, cfg, which="context"), c)  # another encoder, another key


def test_bad_inputs_get_clear_errors(model, cfg, data):
    images, _ = data
    with pytest.raises(ValueError, match="pool"):
        fx.embed(model, images, cfg, pool="cls")
    with pytest.raises(ValueError, match="which"):
        fx.embed(model, images, cfg, which="student")
    with pytest.raises(ValueError, match="cfg"):
        fx.as_input(images, None)
    with pytest.raises(ValueError, match="N >= 4"):
        fx.tsne_2d(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="target block"):
        fx.prediction_maps(model, images[0], _masks(cfg), index=7, cfg=cfg)


def test_pca_rgb_is_in_unit_range_for_both_layouts_and_keeps_nan_rows():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(4, 64, 32)).astype(np.float32)
    rgb = fx.pca_rgb(feats)
    assert rgb.shape == (4, 64, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert rgb.max() - rgb.min() > 0.9  # the colour range is used
    one = fx.pca_rgb(torch.from_numpy(feats[0]), fit_on=feats)
    assert one.shape == (64, 3) and np.isfinite(one).all() and 0 <= one.min() and one.max() <= 1
    feats[0, :5] = np.nan
    holes = fx.pca_rgb(feats[0], fit_on=feats[1:])
    assert np.isnan(holes[:5]).all() and np.isfinite(holes[5:]).all()


def test_remove_position_subtracts_each_positions_mean():
    feats = torch.randn(5, 16, 8) + torch.randn(16, 8) * 10  # a strong per-position offset
    out = fx.remove_position(feats)
    assert out.shape == feats.shape and torch.allclose(out.mean(0), torch.zeros(16, 8), atol=1e-5)
    mean = feats.mean(0)
    assert torch.allclose(fx.remove_position(feats[0], mean), out[0])
    with pytest.raises(ValueError, match="mean"):
        fx.remove_position(feats[0])


def test_pca_2d_and_tsne_2d_shapes_and_tsne_cache():
    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(0, 1, (30, 40)), rng.normal(6, 1, (30, 40))]).astype(np.float32)
    assert fx.pca_2d(feats).shape == (60, 2)
    xy = fx.tsne_2d(feats, perplexity=10, iterations=250, exaggeration_iterations=50)
    assert xy.shape == (60, 2) and np.isfinite(xy).all()
    assert fx.tsne_2d(feats, perplexity=10, iterations=250, exaggeration_iterations=50) is xy  # cached
    # two well separated clusters stay separated
    a, b = xy[:30].mean(0), xy[30:].mean(0)
    assert np.linalg.norm(a - b) > 2 * max(xy[:30].std(0).max(), xy[30:].std(0).max())
    assert fx.tsne_2d(feats[:7], perplexity=30, iterations=250).shape == (7, 2)  # perplexity lowered for small N


def test_tsne_schedule_hook_still_exists_in_scikit_learn():
    # tsne_2d shortens the early-exaggeration phase through this class attribute; notice if it moves.
    from sklearn.manifold import TSNE

    assert isinstance(getattr(TSNE, "_EXPLORATION_MAX_ITER", None), int)


def test_to_grid_scatters_means_and_nans():
    g = fx.to_grid(np.array([1.0, 3.0, 5.0]), [0, 0, 5], 3)
    assert g.shape == (3, 3) and g[0, 0] == 2.0 and g[1, 2] == 5.0 and np.isnan(g).sum() == 7


def test_prediction_maps_finite_on_targets_nan_elsewhere(model, cfg, data):
    images, _ = data
    masks = _masks(cfg)
    maps = fx.prediction_maps(model, images[0], masks, cfg=cfg)
    in_target = masks.target_mask()[0].any(0).view(8, 8).numpy()
    for grid in (maps.cos, maps.err):
        assert grid.shape == (8, 8)
        assert np.isfinite(grid[in_target]).all() and np.isnan(grid[~in_target]).all()
    assert np.nanmin(maps.cos) >= -1 - 1e-5 and np.nanmax(maps.cos) <= 1 + 1e-5 and np.nanmin(maps.err) >= 0
    M, K = masks.targets.shape[1:]
    assert maps.pred.shape == maps.target.shape == (M * K, 32) and maps.all_targets.shape == (64, 32)
    # the targets are the model's own forward_target, and the predictions its predict stage
    with torch.no_grad():
        x = fx.as_input(images[:1], cfg)
        out = model(x, masks)
    assert torch.allclose(maps.target, out.target[0].reshape(-1, 32), atol=1e-5)
    assert torch.allclose(maps.pred, out.pred[0].reshape(-1, 32), atol=1e-5)
    one = fx.prediction_maps(model, images[0], masks, index=1, cfg=cfg)
    block = masks.target_mask()[0, 1].view(8, 8).numpy()
    assert np.isfinite(one.cos[block]).all() and np.isnan(one.cos[~block]).all() and (one.block == 1).all()


def test_nearest_patches_returns_the_exact_bank_patch_for_a_bank_embedding(model, cfg, data):
    images, _ = data
    bank = fx.patch_bank(model, images[:6], cfg)
    assert len(bank) == 6 * 64 and bank.pixels.shape == (6 * 64, 2, 2, 3) and bank.pixels.dtype == np.uint8
    # the pixels of row r are patch bank.patch[r] of image bank.image[r]
    r = 2 * 64 + 9
    img = images[2].permute(1, 2, 0).numpy()
    assert np.array_equal(bank.pixels[r], img[2:4, 2:4])
    rows = [5, 100, r]
    nb = fx.nearest_patches(bank.feats[rows], bank, k=3)
    assert nb.index.shape == nb.score.shape == (3, 3) and nb.pixels.shape == (3, 3, 2, 2, 3)
    assert list(nb.index[:, 0]) == rows and np.allclose(nb.score[:, 0], 1, atol=1e-5)
    assert np.array_equal(nb.pixels[2, 0], bank.pixels[r])
    assert (np.diff(nb.score, axis=1) <= 1e-6).all()  # best first
    other = fx.nearest_patches(bank.feats[[r]], bank, k=3, exclude_image=2)
    assert (bank.image[other.index] != 2).all()


def test_similarity_search_ranks_an_identical_vector_first():
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(50, 16)).astype(np.float32)
    idx, score = fx.similarity_search(gallery, gallery[17] * 3.0, k=5)  # cosine ignores the scale
    assert idx.shape == score.shape == (5,) and idx[0] == 17 and score[0] == pytest.approx(1.0, abs=1e-5)
    assert (np.diff(score) <= 1e-6).all()
    idx, _ = fx.similarity_search(gallery, gallery[17], k=5, exclude=17)
    assert 17 not in idx
    many, _ = fx.similarity_search(torch.from_numpy(gallery), torch.from_numpy(gallery[[3, 4]]), k=2)
    assert many.shape == (2, 2) and list(many[:, 0]) == [3, 4]


# -- draw ----------------------------------------------------------------------------------------------

def test_map_plots_draw_image_and_overlay(model, cfg, data):
    images, _ = data
    maps = fx.prediction_maps(model, images[0], _masks(cfg), cfg=cfg)
    for fn, grid in ((fp.plot_similarity_map, maps.cos), (fp.plot_error_map, maps.err)):
        ax = _ax()
        assert fn(ax, images[0], grid) is ax
        ims = [a for a in ax.get_children() if isinstance(a, AxesImage)]
        assert len(ims) == 2 and ims[1].get_array().mask.sum() == np.isnan(grid).sum()
        assert len(ax.figure.axes) == 2  # the colour bar
        ax = _ax()
        fn(ax, images[0], grid, colorbar=False)
        assert len(ax.figure.axes) == 1


def test_plot_pca_rgb_accepts_grid_and_flat_layouts():
    rgb = np.random.default_rng(0).uniform(size=(64, 3)).astype(np.float32)
    rgb[:4] = np.nan
    ax = _ax()
    assert fp.plot_pca_rgb(ax, rgb, title="t") is ax
    (im,) = ax.images
    arr = im.get_array()
    assert arr.shape == (8, 8, 4) and (arr[0, :4, 3] == 0).all() and (arr[1:, :, 3] == 1).all()
    ax = _ax()
    fp.plot_pca_rgb(ax, rgb.reshape(8, 8, 3), image=np.zeros((3, 16, 16), np.uint8), alpha=0.5)
    assert len(ax.images) == 2
    with pytest.raises(ValueError, match="square"):
        fp.plot_pca_rgb(_ax(), rgb[:10])


def test_plot_embedding_2d_one_scatter_per_class():
    xy = np.random.default_rng(0).normal(size=(30, 2))
    labels = np.arange(30) % 3
    ax = _ax()
    assert fp.plot_embedding_2d(ax, xy, labels, ["a", "b", "c"]) is ax
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(scatters) == 3 and [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "c"]
    ax = _ax()
    fp.plot_embedding_2d(ax, xy)
    assert len(ax.collections) == 1


def test_plot_retrieval_and_neighbours_fill_their_axes(model, cfg, data):
    images, labels = data
    axes = fp.plot_retrieval(Figure(), images[0], images, [3, 5, 7], [0.9, 0.8, 0.7], labels=labels,
                             class_names=class_names(cfg.data), query_label=int(labels[0]))
    assert axes.shape == (4,) and all(len(a.images) == 1 for a in axes)
    assert "0.900" in axes[1].get_title() and class_names(cfg.data)[int(labels[3])] in axes[1].get_title()
    assert axes[1].get_xlabel() == "#3"
    bank = fx.patch_bank(model, images[:4], cfg)
    nb = fx.nearest_patches(bank.feats[:5], bank, k=3)
    grid = fp.plot_neighbours(Figure(), nb, true_pixels=bank.pixels[:5], rows=[0, 2])
    assert grid.shape == (2, 4) and all(len(a.images) == 1 for a in grid.ravel())
    assert grid[0, 1].get_title() == f"{nb.score[0, 0]:.3f}"
    left, right = Figure().subfigures(1, 2)  # two models side by side
    assert fp.plot_neighbours(right, nb, rows=[1]).shape == (1, 3)
    assert fp.plot_retrieval(left, images[0], images, [3], [0.5]).shape == (2,)


def test_plot_probe_bars_one_container_per_encoder():
    result = {"rows": [{"name": "ijepa (target encoder)", "linear": 0.61, "knn": 0.5},
                       {"name": "random init", "linear": 0.4, "knn": 0.3},
                       {"name": "raw pixels", "linear": 0.35, "knn": 0.2}]}
    ax = _ax()
    assert fp.plot_probe_bars(ax, result, chance=0.1) is ax
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bars) == 3 and [len(b) for b in bars] == [2, 2, 2]
    assert bars[0][0].get_height() == pytest.approx(61.0)
    assert [t.get_text() for t in ax.get_legend().get_texts()][:3] == [r["name"] for r in result["rows"]]
    ax = _ax()
    fp.plot_probe_bars(ax, {"rows": [{"name": "x", "linear": 0.5}]})  # a probe that was not run is left out
    assert len(ax.get_xticklabels()) == 1


# -- wire ----------------------------------------------------------------------------------------------

def _all_children(box):
    out = []
    for c in getattr(box, "children", ()):
        out += [c, *_all_children(c)]
    return out


def test_prediction_explorer_controls_and_redraws(model, other, cfg, data):
    images, _ = data
    app = fw.prediction_explorer(model, other, images[:4], cfg, size_px=500)
    assert set(app.controls) == {"index", "seed", "resample", "block"}
    assert all(w in _all_children(app) for w in app.controls.values())
    assert app.image_widget.value[:4] == b"\x89PNG" and "untrained" in app.summary.value
    assert set(app.all_maps) == {"trained", "untrained"} and app.maps is app.all_maps["trained"]
    first, maps = app.image_widget.value, app.maps
    app.controls["index"].value = 2
    assert app.image_widget.value != first and app.maps is not maps
    app.controls["resample"].click()
    assert app.controls["seed"].value == 1
    app.controls["block"].value = 0
    assert all((m.block == 0).all() for m in app.all_maps.values())
    # the two rows are two models on the same image and masks
    t, u = app.all_maps["trained"], app.all_maps["untrained"]
    assert np.array_equal(t.patch, u.patch) and not np.allclose(np.nan_to_num(t.cos), np.nan_to_num(u.cos))
    assert len(app.redraw_times) == 4 and app.error.value == ""
    solo = fw.prediction_explorer(model, None, images[:2], cfg, size_px=400)
    assert list(solo.all_maps) == ["trained"]


def test_embedding_explorer_draws_every_model_and_redraws(model, other, cfg, data):
    images, labels = data
    app = fw.embedding_explorer({"trained": model, "untrained": other}, images, labels, cfg,
                                class_names(cfg.data), points=12, perplexity=3)
    assert set(app.controls) == {"points", "perplexity"}
    assert set(app.xy) == {"trained", "untrained"}
    assert app.xy["trained"]["pca"].shape == app.xy["untrained"]["tsne"].shape == (12, 2)
    assert not np.allclose(app.xy["trained"]["pca"], app.xy["untrained"]["pca"])
    first = app.image_widget.value
    app.controls["points"].value = 16
    assert app.xy["trained"]["tsne"].shape == (16, 2) and app.image_widget.value != first
    app.controls["perplexity"].value = 4
    assert app.error.value == "" and len(app.redraw_times) == 3
    assert list(fw.embedding_explorer(model, images, labels, cfg, points=8, perplexity=2).xy) == ["trained"]


def test_similarity_search_app_gallery_query_and_upload(model, other, cfg, data):
    images, labels = data
    app = fw.similarity_search_app({"trained": model, "untrained": other}, images, cfg, labels,
                                   class_names(cfg.data), k=4)
    assert set(app.controls) == {"source", "index", "upload", "k", "centre"}
    assert set(app.results) == {"trained", "untrained"} and app.result is app.results["trained"]
    for idx, score in app.results.values():
        assert len(idx) == 4 and 0 not in idx and (np.diff(score) <= 1e-6).all()  # the query leaves itself out
    assert "left out of its own results" in app.summary.value
    # centred scores are those of similarity_search with centre=True; raw ones differ
    feats = app.gallery_feats["trained"]
    assert np.allclose(app.result[1], fx.similarity_search(feats, feats[0], k=4, exclude=0, centre=True)[1])
    first = app.image_widget.value
    app.controls["centre"].value = False
    assert np.allclose(app.result[1], fx.similarity_search(feats, feats[0], k=4, exclude=0)[1])
    app.controls["index"].value = 5
    assert app.image_widget.value != first and all(5 not in r[0] for r in app.results.values())
    app.controls["k"].value = 6
    assert len(app.result[0]) == 6
    # upload gallery image 9 as a PNG: it is not left out, so it is the best match of itself, cosine ~1
    buf = io.BytesIO()
    Image.fromarray(images[9].permute(1, 2, 0).numpy()).save(buf, format="PNG")
    app.controls["upload"].value = ({"name": "q.png", "type": "image/png", "size": len(buf.getvalue()),
                                     "content": memoryview(buf.getvalue()), "last_modified": NOW},)
    assert app.controls["source"].value == "upload" and "your upload" in app.summary.value
    assert app.result[0][0] == 9 and app.result[1][0] == pytest.approx(1.0, abs=1e-4)
    app.controls["upload"].value = ({"name": "junk.png", "type": "image/png", "size": 4,
                                     "content": memoryview(b"junk"), "last_modified": NOW},)
    assert "could not read 'junk.png'" in app.error.value
    assert list(fw.similarity_search_app(model, images, cfg, k=2).results) == ["trained"]


def test_notebook_model_prefers_notebook_03_then_trains_and_reuses_a_fallback(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fw, "NOTEBOOK_CHECKPOINT", tmp_path / "notebook" / "checkpoint.pt")
    monkeypatch.setattr(fw, "RUNS_DIR", tmp_path)
    monkeypatch.setattr(fw, "notebook_config", lambda quick, out_dir, extra=(): tiny_config(out_dir, "train.steps=2"))
    model, cfg = fw.notebook_model(quick=True)
    assert "Training a fallback" in capsys.readouterr().out and not model.training
    assert (tmp_path / "notebook-fallback-quick" / "checkpoint.pt").exists()
    again, _ = fw.notebook_model(quick=True)
    assert "reusing the fallback" in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    (tmp_path / "notebook").mkdir()
    (tmp_path / "notebook-fallback-quick" / "checkpoint.pt").rename(tmp_path / "notebook" / "checkpoint.pt")
    fw.notebook_model(quick=True)
    assert "Loaded notebook 03's model" in capsys.readouterr().out


# -- the notebooks' model ------------------------------------------------------------------------------

def test_untrained_model_is_seeded_and_leaves_the_global_rng_alone(cfg):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = fw.untrained_model(cfg)
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is untouched
    b = fw.untrained_model(cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters())) and not a.training


def test_feature_model_shipped_is_the_dots_model_offline():
    from ijepa_viz.pretrained import shipped

    if fw.SHIPPED_MODELS["dots"] not in shipped():
        pytest.skip("the dots weights are not installed")
    model, cfg, about = fw.feature_model("shipped")
    assert cfg.data.name == "dots" and not model.training and model.target_encoder is not None
    assert fw.SHIPPED_MODELS["dots"] in about and f"{cfg.model.embed_dim} wide" in about
    assert "steps" in about  # how long it trained, read from its model card
    assert "shipped" in fw.feature_sources() and "notebook03" in fw.feature_sources()
    # the untrained model of the same config is the same network with other weights
    untrained = fw.untrained_model(cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in untrained.state_dict().items()}
    assert not torch.equal(model.target_encoder.patch_embed.proj.weight, untrained.target_encoder.patch_embed.proj.weight)


def test_feature_model_notebook03_and_bad_sources(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fw, "NOTEBOOK_CHECKPOINT", tmp_path / "notebook" / "checkpoint.pt")
    monkeypatch.setattr(fw, "RUNS_DIR", tmp_path)
    monkeypatch.setattr(fw, "notebook_config", lambda quick, out_dir, extra=(): tiny_config(out_dir, "train.steps=2"))
    model, cfg, about = fw.feature_model("notebook03", quick=True)
    assert about.startswith("notebook 03's run") and cfg.model.embed_dim == 32 and not model.training
    with pytest.raises(ValueError, match="'shipped', 'notebook03', 'cifar10'"):
        fw.feature_model("imagenet")
    monkeypatch.setattr("ijepa_viz.pretrained.shipped", lambda: {})
    with pytest.raises(ValueError, match="does not have"):
        fw.feature_model("cifar10")
    assert set(fw.feature_sources()) == {"notebook03"}


def test_feature_model_cifar10_finds_its_images_or_says_why(monkeypatch, cfg, tmp_path):
    shipped_cfg = ij_override(cfg, ["data.name=imagefolder", "data.root=nowhere/cifar10"])
    monkeypatch.setattr("ijepa_viz.pretrained.shipped", lambda: {fw.SHIPPED_MODELS["cifar10"]: "x"})
    monkeypatch.setattr("ijepa_viz.pretrained.load_shipped", lambda name: (fw.untrained_model(cfg), shipped_cfg))
    tried = []

    def offline(data, split, size, limit=None):
        tried.append((data.name, data.root))
        raise OSError("no network")

    monkeypatch.setattr("ijepa_viz.data.load_uint8", offline)
    monkeypatch.chdir(tmp_path)  # a working folder other than the repository: two places to look
    assert "cifar10" in fw.feature_sources()
    with pytest.raises(RuntimeError, match="no network.*source='shipped'"):
        fw.feature_model("cifar10")
    # the ImageFolder tree it was trained on (from the working folder, then the repository), then torchvision
    assert [n for n, _ in tried] == ["imagefolder", "imagefolder", "cifar10"]
    assert tried[0][1].endswith("nowhere/cifar10") and tried[2][1] == str(fw.REPO_ROOT / "data")

    monkeypatch.setattr("ijepa_viz.data.load_uint8", lambda data, *a, **k: data.name == "cifar10" or offline(data, 0, 0))
    model, got, about = fw.feature_model("cifar10")
    assert got.data.name == "cifar10" and fw.SHIPPED_MODELS["cifar10"] in about and "torchvision" in about
    monkeypatch.setattr("ijepa_viz.data.load_uint8", lambda *a, **k: None)  # the tree is there
    _, got, about = fw.feature_model("cifar10")
    assert got.data.name == "imagefolder" and "torchvision" not in about


# -- numbers that explain the pictures -----------------------------------------------------------------

def test_position_share_common_share_and_mean_cosine():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(16, 8, generator=g) * 10
    assert fx.position_share(pos.expand(5, 16, 8)) == pytest.approx(1.0)  # position is everything
    noise = torch.randn(50, 16, 8, generator=g)
    assert fx.position_share(noise) < 0.1 and fx.position_share(noise + pos) > 0.9
    with pytest.raises(ValueError, match="N >= 2"):
        fx.position_share(pos)
    shared = torch.randn(8, generator=g) * 10
    feats = shared + torch.randn(200, 8, generator=g)
    assert fx.common_share(feats) > 0.95 and fx.common_share(feats - feats.mean(0)) < 1e-6
    assert fx.mean_cosine(feats) > 0.95 and abs(fx.mean_cosine(feats, centre=True)) < 0.02
    # exact over all pairs
    u = torch.nn.functional.normalize(feats[:6].double(), dim=1)
    pairs = (u @ u.T)[~torch.eye(6, dtype=torch.bool)].mean()
    assert fx.mean_cosine(feats[:6]) == pytest.approx(float(pairs), abs=1e-9)


def test_image_share_is_what_the_patches_of_an_image_share():
    g = torch.Generator().manual_seed(0)
    per_image = torch.randn(30, 1, 8, generator=g) * 10
    assert fx.image_share(per_image.expand(30, 16, 8)) == pytest.approx(1.0)  # every patch the image's code
    pos = torch.randn(1, 16, 8, generator=g) * 10
    assert fx.image_share(pos.expand(30, 16, 8) + 0 * per_image) == pytest.approx(0.0, abs=1e-6)
    noise = torch.randn(30, 16, 8, generator=g)
    assert fx.image_share(per_image + noise) > 0.95 and fx.image_share(noise) < 0.15
    split = per_image + pos + noise  # image, position and the rest add up to about 1
    assert fx.image_share(split) + fx.position_share(split) == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match="N >= 2"):
        fx.image_share(pos[0])


def test_similarity_search_centre_subtracts_the_gallery_mean():
    rng = np.random.default_rng(1)
    gallery = (rng.normal(size=(40, 8)) + 20).astype(np.float32)  # a large shared component
    _, raw = fx.similarity_search(gallery, gallery[3], k=5, exclude=3)
    assert raw.min() > 0.95  # every raw cosine near 1
    idx, cen = fx.similarity_search(gallery, gallery[3], k=5, exclude=3, centre=True)
    centred = gallery - gallery.mean(0)
    ref_idx, ref = fx.similarity_search(centred, centred[3], k=5, exclude=3)
    assert np.array_equal(idx, ref_idx) and np.allclose(cen, ref, atol=1e-5) and cen.max() < 0.95
    _, given = fx.similarity_search(gallery, gallery[3], k=5, exclude=3, centre=torch.from_numpy(gallery.mean(0)))
    assert np.allclose(given, cen, atol=1e-5)


def test_new_images_and_drawn_picture_are_new_images(cfg):
    imgs, labels = fx.new_images(cfg.data.name, 10, 16)
    assert imgs.shape == (10, 3, 16, 16) and imgs.dtype == torch.uint8 and list(labels) == list(range(10))
    test, _ = load_uint8(cfg.data, "test", 16, limit=10)
    train, _ = load_uint8(cfg.data, "train", 16, limit=10)
    assert not any(torch.equal(a, b) for a in imgs for b in torch.cat([test, train]))
    with pytest.raises(ValueError, match="seed 0"):
        fx.new_images(cfg.data.name, 2, 16, seed=0)
    with pytest.raises(ValueError, match="built-in"):
        fx.new_images("cifar10", 2, 16)
    pic = fx.drawn_picture(32)
    assert pic.shape == (3, 32, 32) and pic.dtype == torch.uint8
    assert pic[:, 0, 0].tolist() == pytest.approx([150, 200, 240], abs=3)  # sky in the corner
    assert pic[:, 31, 0].tolist() == pytest.approx([70, 160, 60], abs=3)  # grass at the bottom


def test_prediction_colours_share_one_pca(model, cfg, data):
    images, _ = data
    maps = fx.prediction_maps(model, images[0], _masks(cfg), cfg=cfg)
    pos = fx.position_mean(model, images, cfg)
    assert pos.shape == (64, 32)
    col = fx.prediction_colours(maps, pos)
    assert col["all"].shape == (64, 3) and col["true"].shape == col["pred"].shape == (8, 8, 3)
    on = np.isfinite(col["true"]).all(-1)
    assert on.sum() == len(set(maps.patch.tolist())) and np.array_equal(on, np.isfinite(col["pred"]).all(-1))
    # a perfect prediction gets exactly the true colours
    perfect = fx.PredictionMaps(**{**maps.__dict__, "pred": maps.target.clone()})
    both = fx.prediction_colours(perfect, pos)
    assert np.allclose(both["true"][on], both["pred"][on])


def test_retrieval_pixel_gaps_pairs_three_lookups(model, cfg, data):
    images, _ = data
    bank = fx.patch_bank(model, images[8:], cfg)
    gaps = fx.retrieval_pixel_gaps(model, images[:3], bank, cfg, k=2)
    n = sum(len(fx.prediction_maps(model, images[i], MaskCollator(cfg.mask, cfg.grid_size, seed=0).sample(1, step=i),
                                   cfg=cfg).patch) for i in range(3))
    assert set(gaps) == {"prediction", "truth", "random"} and all(v.shape == (n,) for v in gaps.values())
    assert all(((v >= 0) & (v <= 255)).all() for v in gaps.values())
    # a bank that holds the query images themselves: the truth's nearest patch is the true patch (gap 0 for k=1)
    own = fx.patch_bank(model, images[:3], cfg)
    exact = fx.retrieval_pixel_gaps(model, images[:3], own, cfg, k=1)
    assert np.allclose(exact["truth"], 0) and exact["random"].mean() > 0
    assert np.array_equal(fx.patch_pixels(images[:2], 8).reshape(-1, 2, 2, 3), fx.patch_bank(model, images[:2], cfg).pixels)
