"""Tests of ijepa_viz.data: every dataset is made here, tiny, in its real on-disk format; no network."""
from __future__ import annotations

import math
import os
import pickle
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ijepa_viz.data.dots as dots_module
from ijepa_viz import data as D
from ijepa_viz.config import DataConfig
from ijepa_viz.data import DataError


# -- helpers and fixtures -----------------------------------------------------------------------------

def _py2_pickle(obj: object, strings: list[str]) -> bytes:
    """Pickle `obj` the way CIFAR's Python 2 files are: the given str objects become py2 byte strings
    (SHORT_BINSTRING), which load as b'data' with encoding='bytes' and as 'data' with encoding='latin1'."""
    raw = pickle.dumps(obj, protocol=2)
    for s in strings:
        b = s.encode()
        raw = raw.replace(b"X" + struct.pack("<I", len(b)) + b, b"U" + bytes([len(b)]) + b)
    return raw


CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def tiny_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict]:
    """A CIFAR-10 in torchvision's on-disk format with 5 x 12 training and 10 test images.

    Only torchvision's md5 check is patched (its files cannot have the real checksums): a file passes if it exists.
    """
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = 10 if name == "test_batch" else 12
        pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)  # rows: R plane, G plane, B plane
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        arrays[name] = (pixels, labels)
        batch = {"batch_label": f"{name} of tiny", "labels": labels, "data": pixels,
                 "filenames": [f"img_{i}.png" for i in range(n)]}
        (folder / name).write_bytes(_py2_pickle(batch, ["batch_label", "labels", "data", "filenames"]))
    meta = {"num_cases_per_batch": 12, "label_names": CIFAR_NAMES, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(_py2_pickle(meta, ["num_cases_per_batch", "label_names", "num_vis"]
                                                      + CIFAR_NAMES))
    with open(folder / "data_batch_1", "rb") as f:  # the format really is the py2 one
        assert b"data" in pickle.load(f, encoding="bytes")
    return str(tmp_path), arrays


def _save(path: Path, img: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """ROOT/train/{cat,dog,owl} and ROOT/test/{cat,dog,owl}: 16 px PNG and JPEG images, one grayscale,
    one RGBA (fully transparent: must load as white), one palette, plus a stray non-image file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "tree"
    for split, per_class in (("train", 4), ("test", 2)):
        for c, cls in enumerate(("cat", "dog", "owl")):
            for i in range(per_class):
                arr = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
                ext = "png" if i % 2 else "jpg"
                _save(root / split / cls / f"{i}.{ext}", Image.fromarray(arr))
    _save(root / "train" / "cat" / "gray.png", Image.fromarray(np.full((16, 16), 77, np.uint8), mode="L"))
    _save(root / "train" / "dog" / "alpha.png", Image.new("RGBA", (16, 16), (10, 20, 30, 0)))
    palette = Image.new("RGB", (16, 16), (200, 10, 10)).convert("P", palette=Image.Palette.ADAPTIVE)
    _save(root / "train" / "owl" / "palette.png", palette)
    (root / "train" / "owl" / "notes.txt").write_text("not an image")
    return root


def _folder_cfg(root: Path | str, **kw) -> DataConfig:
    return DataConfig(name="imagefolder", root=str(root), download=False, **kw)


def _batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


# -- shapes -------------------------------------------------------------------------------------------

def test_shapes_classes_are_ten_distinct_names():
    assert len(D.SHAPES_CLASSES) == 10 == len(set(D.SHAPES_CLASSES))
    shapes = DataConfig(name="shapes")
    assert D.num_classes(shapes) == 10 and D.class_names(shapes) == list(D.SHAPES_CLASSES)
    assert DataConfig().name == "dots"  # the default: the built-in data a short run learns


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_render_shape_dtype_labels(size):
    images, labels = D.render_shapes(range(20), size)
    assert images.shape == (20, 3, size, size) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == [i % 10 for i in range(20)]
    assert images.float().std() > 20  # not blank


def test_shapes_deterministic_and_batch_independent():
    a, _ = D.render_shapes([3, 5, 7], 32, seed=1)
    b, _ = D.render_shapes([5], 32, seed=1)
    ds = D.ShapesDataset("train", 32, size=10, seed=1)
    assert torch.equal(a, D.render_shapes([3, 5, 7], 32, seed=1)[0])
    assert torch.equal(a[1], b[0]) and torch.equal(ds[5][0], b[0]) and ds[5][1] == 5
    assert not torch.equal(a[0], a[1])  # different indices, different images
    assert not torch.equal(b, D.render_shapes([5], 32, seed=2)[0])  # seed matters
    assert not torch.equal(b, D.render_shapes([5], 32, seed=1, split="test")[0])  # so does the split


def test_shapes_build_dataset_gives_normalised_float():
    ds = D.build_dataset(DataConfig(name="shapes", shapes_test_size=8), "test", 32, train_transform=False)
    x, y = ds[3]
    assert len(ds) == 8 and x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 3
    mean, std = D.dataset_stats("shapes")
    raw = D.render_shapes([3], 32, split="test")[0][0].float() / 255
    expected = (raw - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert torch.allclose(x, expected, atol=1e-5)  # eval transform at the native size: only normalisation


# -- dots ---------------------------------------------------------------------------------------------

def test_dots_render_deterministic_batch_independent_and_labelled():
    a, labels = D.render_dots([3, 5, 7], 32, seed=1)
    b, _ = D.render_dots([5], 32, seed=1)
    ds = D.DotsDataset("train", 32, size=10, seed=1)
    assert a.shape == (3, 3, 32, 32) and a.dtype == torch.uint8 and labels.tolist() == [3, 5, 7]
    assert torch.equal(a[1], b[0]) and torch.equal(ds[5][0], b[0]) and ds[5][1] == 5
    assert not torch.equal(b, D.render_dots([5], 32, seed=2)[0])  # seed matters
    assert not torch.equal(b, D.render_dots([5], 32, seed=1, split="test")[0])  # so does the split
    assert D.class_names(DataConfig(name="dots")) == list(D.DOTS_CLASSES) and len(set(D.DOTS_CLASSES)) == 10


def _figure_masks(images: torch.Tensor) -> torch.Tensor:
    """Where the dots are: pixels far from the image's background (its median colour). bool (N, H, W)."""
    background = images.float().flatten(2).median(dim=2).values[:, :, None, None]
    return (images.float() - background).norm(dim=1) > 60


def test_dots_classes_differ_only_in_arrangement():
    """What the dataset promises: every class draws the same dots with the same colours, and the class shows
    in where they lie (here, the figure's width against its height)."""
    images, labels = D.render_dots(range(1000), 64)
    masks = _figure_masks(images)
    area = masks.float().mean(dim=(1, 2))
    background = images.float().flatten(2).median(dim=2).values  # (N, 3)
    contrast = torch.stack([((images[i].float() - background[i, :, None, None]).abs() * masks[i]).sum((1, 2))
                            / masks[i].sum() for i in range(1000)])  # (N, 3) how far the dots stand out
    per_class_area = torch.stack([area[labels == c].mean() for c in range(10)])
    per_class_contrast = torch.stack([contrast[labels == c].mean(0) for c in range(10)])
    # The same number of the same dots in every class; where neighbours overlap they cover less.
    assert per_class_area.max() / per_class_area.min() < 1.6
    assert (per_class_contrast.max(0).values - per_class_contrast.min(0).values).max() < 10  # of 255
    lighter = torch.stack([(images[i].float() - background[i, :, None, None])[:, masks[i]].mean() > 0
                           for i in range(1000)])
    assert 0.4 < lighter.float().mean() < 0.6  # lighter or darker than the background: one sign per image
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")

    def spread(m, grid):
        return torch.sqrt((grid[m] - grid[m].mean()).square().mean())

    aspect = torch.tensor([float(spread(m, xs) / spread(m, ys).clamp(min=0.5)) for m in masks])
    hline, vline = D.DOTS_CLASSES.index("hline"), D.DOTS_CLASSES.index("vline")
    # turned by up to 20 degrees (ROTATION), a line stays about 2.7 times longer than it is high
    assert aspect[labels == hline].min() > 1.5 and aspect[labels == vline].max() < 1 / 1.5


def test_dots_clutter_adds_dots_outside_the_figure(monkeypatch):
    """CLUTTER_DOTS (a design knob of benchmarks/dots_design.py, 0 by default) draws extra dots anywhere: the
    same figure under them, more dot pixels, still deterministic."""
    plain, labels = D.render_dots(range(40), 64)
    monkeypatch.setattr(dots_module, "CLUTTER_DOTS", 6)
    cluttered, labels2 = D.render_dots(range(40), 64)
    assert torch.equal(labels, labels2) and torch.equal(cluttered, D.render_dots(range(40), 64)[0])
    more = _figure_masks(cluttered).float().mean() / _figure_masks(plain).float().mean()
    assert 1.4 < more < 1.9  # 6 more dots on top of 8, some overlapping


def test_dots_colour_modes(monkeypatch):
    """DOT_COLOUR ("image-polarity" by default; a design knob of benchmarks/dots_design.py): "image" gives
    every dot of an image one colour; "dot-polarity" / "image-polarity" make each dot CONTRAST lighter or darker
    than the background in every channel, the sign drawn per dot / per image."""
    draws = torch.rand(2, 5, 3)
    monkeypatch.setattr(dots_module, "DOT_COLOUR", (0.9, 0.1, 0.5))
    assert torch.equal(dots_module._dot_colours(draws)[1, 3], torch.tensor([0.9, 0.1, 0.5]))

    monkeypatch.setattr(dots_module, "NOISE", 0.0)
    monkeypatch.setattr(dots_module, "CLUTTER_DOTS", 6)
    monkeypatch.setattr(dots_module, "DOT_COLOUR", "image")
    images, _ = D.render_dots(range(20), 48)
    flat = images.flatten(2).transpose(1, 2)  # (N, H*W, 3)
    for img in flat:  # the background and one dot colour, plus anti-aliased blends of the two on a line
        bg, far = img.median(0).values.float(), (img.float() - img.median(0).values).norm(dim=1)
        dot = img[far.argmax()].float()  # the colour farthest from the background: a dot's centre
        on_line = (img.float() - bg)[far > 20]  # dot pixels, each bg + a * (dot - bg) with a in (0, 1]
        a = on_line @ (dot - bg) / (dot - bg).norm() ** 2
        assert (on_line - a[:, None] * (dot - bg)).norm(dim=1).max() < 6  # one colour per image (uint8 rounding)

    signs = {}
    for mode in ("dot-polarity", "image-polarity"):
        monkeypatch.setattr(dots_module, "DOT_COLOUR", mode)
        images, _ = D.render_dots(range(20), 48)
        d = images.float() / 255 - images.float().flatten(2).median(2).values[..., None, None] / 255  # (N, 3, H, W)
        moved = (d.abs() > 0.05).any(1)  # (N, H, W): dot pixels
        lighter, darker = moved & (d > -0.01).all(1), moved & (d < 0.01).all(1)  # by their sign
        # every channel of a dot moves the same way (but where a lighter and a darker dot overlap at an edge):
        assert moved.sum() > 1000 and (lighter | darker)[moved].float().mean() > 0.99
        signs[mode] = (lighter.flatten(1).any(1) & darker.flatten(1).any(1)).float().mean()  # both signs in one image
    assert signs["dot-polarity"] > 0.8 and signs["image-polarity"] == 0


def test_dots_grey_background(monkeypatch):
    """GREY_BACKGROUND (a design knob of benchmarks/dots_design.py, off by default): with a background range, the
    background varies in brightness only, all three channels equal, and still from image to image."""
    monkeypatch.setattr(dots_module, "BACKGROUND", (0.2, 0.8))
    monkeypatch.setattr(dots_module, "GREY_BACKGROUND", True)
    images, _ = D.render_dots(range(30), 32)
    bg = images.flatten(2).median(2).values.float()  # (N, 3): most pixels are background
    assert (bg.max(1).values - bg.min(1).values).max() <= 1  # grey: equal channels (uint8 rounding)
    assert bg[:, 0].std() > 20  # different images, different brightness


def test_dots_rotation_turns_each_figure_about_its_centre(monkeypatch):
    """ROTATION (20 degrees by default): each figure turns by its own random angle. A horizontal line of dots
    then slopes, by a different angle in different images, and ROTATION = 0 renders the level lines again."""
    monkeypatch.setattr(dots_module, "NOISE", 0.0)
    monkeypatch.setattr(dots_module, "DOT_COLOUR", (0.95, 0.95, 0.95))
    monkeypatch.setattr(dots_module, "BACKGROUND", (0.2, 0.2))
    monkeypatch.setattr(dots_module, "JITTER", 0.0)
    monkeypatch.setattr(dots_module, "ROTATION", 0.0)
    plain, labels = D.render_dots(range(0, 200, 10), 32)  # every image a horizontal line (label 0)
    assert (labels == 0).all()
    monkeypatch.setattr(dots_module, "ROTATION", 30.0)
    turned, _ = D.render_dots(range(0, 200, 10), 32)

    def slopes(images):  # least-squares slope of the bright pixels' rows against their columns, per image
        out = []
        for img in images:
            ys, xs = torch.nonzero(img[0] > 150, as_tuple=True)
            xs, ys = xs.double() - xs.double().mean(), ys.double() - ys.double().mean()
            out.append(float((xs * ys).sum() / (xs * xs).sum()))
        return torch.tensor(out)

    assert slopes(plain).abs().max() < 0.05  # level lines
    s = slopes(turned)
    assert s.abs().max() < math.tan(math.radians(30)) + 0.1 and s.abs().mean() > 0.1 and s.std() > 0.1
    monkeypatch.setattr(dots_module, "ROTATION", 0.0)
    assert torch.equal(D.render_dots(range(0, 200, 10), 32)[0], plain)


def test_every_dots_figure_renders_its_own_dots(monkeypatch):
    """The figures beyond DOTS_CLASSES (for design runs with more classes) draw as the ten do: every class
    name in the figure table renders, labels follow the chosen tuple, and no two figures give the same image."""
    names = tuple(dots_module._FIGURES)
    assert set(D.DOTS_CLASSES) < set(names)
    monkeypatch.setattr(dots_module, "NOISE", 0.0)
    monkeypatch.setattr(dots_module, "DOT_COLOUR", (0.95, 0.95, 0.95))
    monkeypatch.setattr(dots_module, "BACKGROUND", (0.2, 0.2))
    monkeypatch.setattr(dots_module, "DOTS_CLASSES", names)
    images, labels = D.render_dots(range(len(names)), 32)
    assert labels.tolist() == list(range(len(names)))
    lit = (images[:, 0] > 150).flatten(1)  # (N, H*W) the dots' pixels
    assert (lit.sum(1) > 10).all()  # every figure draws its dots
    assert len({tuple(row.tolist()) for row in lit}) == len(names)  # and they differ


# -- torchvision CIFAR-10 in its on-disk format ---------------------------------------------------------

def test_cifar10_dataset_offline(tiny_cifar):
    root, arrays = tiny_cifar
    cfg = DataConfig(name="cifar10", root=root, download=False)
    train, test = D.build_dataset(cfg, "train", 32, True), D.build_dataset(cfg, "test", 32, False)
    assert len(train) == 60 and len(test) == 10
    x, y = test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == arrays["test_batch"][1][0]
    assert D.class_names(cfg) == CIFAR_NAMES


def test_cifar10_loaders_and_load_uint8(tiny_cifar):
    root, arrays = tiny_cifar
    cfg = DataConfig(name="cifar10", root=root, download=False, batch_size=8)
    images, labels = D.load_uint8(cfg, "test", 32)
    pixels, targets = arrays["test_batch"]
    assert torch.equal(images, torch.from_numpy(pixels).reshape(-1, 3, 32, 32))
    assert labels.tolist() == targets
    loader = D.build_loader(cfg, "train", 32, train=True, seed=0)
    assert isinstance(loader, D.InMemoryLoader) and len(loader) == 60 // 8
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.int64
    streaming = D.build_loader(DataConfig(name="cifar10", root=root, download=False, batch_size=8, in_memory=False),
                               "test", 32, train=False, seed=0)
    assert isinstance(streaming, D.StreamingLoader) and len(streaming) == 2  # 10 images: 8 + 2, nothing dropped
    in_memory = D.build_loader(cfg, "test", 32, train=False, seed=0)
    for (a, la), (b, lb) in zip(streaming, in_memory):  # both eval paths give the same normalised pixels
        assert torch.allclose(a, b, atol=1e-5) and torch.equal(la, lb)


def test_cifar10_missing_offline_says_how_to_fix(tmp_path):
    cfg = DataConfig(name="cifar10", root=str(tmp_path / "nothing"), download=False)
    with pytest.raises(DataError, match="shapes") as e:
        D.build_dataset(cfg, "train", 32, True)
    assert "cifar-10-batches-py" in str(e.value) and "data.download" in str(e.value)
    with pytest.raises(DataError, match="shapes"):
        D.build_loader(cfg, "train", 32, train=True, seed=0)


# -- ImageFolder trees ----------------------------------------------------------------------------------

def test_imagefolder_reads_any_mode_as_rgb(image_tree):
    cfg = _folder_cfg(image_tree)
    assert D.class_names(cfg) == ["cat", "dog", "owl"] and D.num_classes(cfg) == 3
    ds = D.build_dataset(cfg, "train", 16, train_transform=True)
    assert len(ds) == 15  # 12 + gray + alpha + palette; notes.txt ignored
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= y < 3
    raw = D.ImageFolderDataset(str(image_tree), "train")
    by_name = {Path(p).name: i for i, (p, _) in enumerate(raw.samples)}
    gray, alpha, palette = (np.asarray(raw[by_name[n]][0]) for n in ("gray.png", "alpha.png", "palette.png"))
    assert gray.shape == (16, 16, 3) and (gray == 77).all()
    assert (alpha == 255).all()  # transparent pixels composite onto white
    assert tuple(palette[0, 0]) == (200, 10, 10)
    test = D.build_dataset(cfg, "test", 16, train_transform=False)
    assert len(test) == 6 and sorted({y for _, y in test}) == [0, 1, 2]


def test_imagefolder_loaders(image_tree):
    cfg = _folder_cfg(image_tree, batch_size=4)
    loader = D.build_loader(cfg, "train", 16, train=True, seed=0)
    assert isinstance(loader, D.InMemoryLoader) and loader.cache.images.shape == (15, 3, 16, 16)
    assert len(loader) == 3 and all(x.shape == (4, 3, 16, 16) for x, _ in loader)
    images, labels = D.load_uint8(cfg, "test", 8)
    assert images.shape == (6, 3, 8, 8) and images.dtype == torch.uint8 and labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert D.load_uint8(cfg, "train", 16, limit=5)[0].shape == (5, 3, 16, 16)
    streaming = D.build_loader(_folder_cfg(image_tree, batch_size=4, in_memory=False), "train", 16, True, seed=0)
    assert isinstance(streaming, D.StreamingLoader) and [x.shape[0] for x, _ in streaming] == [4, 4, 4]


def test_streaming_augmentation_does_not_depend_on_workers(image_tree):
    runs = []
    for workers in (0, 2):
        loader = D.build_loader(_folder_cfg(image_tree, batch_size=4, in_memory=False, num_workers=workers),
                                "train", 16, train=True, seed=7)
        loader.set_epoch(2)
        runs.append(_batches(loader))
    assert _same(*runs)
    threaded = D.UInt8Cache.build(_folder_cfg(image_tree, num_workers=2), "train", 16)  # threaded decode
    assert torch.equal(threaded.images, D.UInt8Cache.build(_folder_cfg(image_tree), "train", 16).images)


def test_tiny_imagenet_val_layout(tmp_path):
    for i, wnid in enumerate(("n01", "n02")):
        _save(tmp_path / "train" / wnid / "images" / f"{wnid}_0.JPEG", Image.new("RGB", (64, 64), (i * 200, 0, 0)))
        (tmp_path / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored")
        _save(tmp_path / "val" / "images" / f"val_{i}.JPEG", Image.new("RGB", (64, 64), (i * 200, 0, 0)))
    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01\t0\t0\t9\t9\nval_1.JPEG\tn02\t0\t0\t9\t9\n")
    cfg = _folder_cfg(tmp_path)
    assert D.class_names(cfg) == ["n01", "n02"]
    images, labels = D.load_uint8(cfg, "test", 32)
    assert labels.tolist() == [0, 1] and images.shape == (2, 3, 32, 32) and images[1, 0].float().mean() > 150


def test_imagefolder_large_images_stream(tmp_path):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            _save(tmp_path / split / cls / "0.png", Image.new("RGB", (80, 96), (1, 2, 3)))
    cfg = _folder_cfg(tmp_path, batch_size=2)
    loader = D.build_loader(cfg, "test", 32, train=False, seed=0)  # val/ is the test split; 80 px > 64: streamed
    assert isinstance(loader, D.StreamingLoader) and next(iter(loader))[0].shape == (2, 3, 32, 32)


# -- bad inputs -----------------------------------------------------------------------------------------

def test_imagefolder_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        D.build_dataset(_folder_cfg(tmp_path / "nope"), "train", 16, True)
    assert "nope" in str(e.value) and "data.root" in str(e.value)


def test_imagefolder_wrong_layouts(tmp_path):
    _save(tmp_path / "flat" / "cat" / "0.png", Image.new("RGB", (8, 8)))
    with pytest.raises(DataError, match="no train/ folder") as e:
        D.build_dataset(_folder_cfg(tmp_path / "flat"), "train", 16, True)
    assert "ROOT/train/<class>" in str(e.value)
    _save(tmp_path / "loose" / "train" / "0.png", Image.new("RGB", (8, 8)))
    with pytest.raises(DataError, match="directly") as e:
        D.build_loader(_folder_cfg(tmp_path / "loose"), "train", 16, True, seed=0)
    assert "0.png" in str(e.value) and "ROOT/train/<class>" in str(e.value)
    _save(tmp_path / "noval" / "train" / "a" / "0.png", Image.new("RGB", (8, 8)))
    with pytest.raises(DataError, match="val/"):
        D.build_dataset(_folder_cfg(tmp_path / "noval"), "test", 16, False)


def test_imagefolder_empty_class_folder(image_tree):
    (image_tree / "train" / "emu").mkdir()
    (image_tree / "train" / "emu" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="emu") as e:
        D.build_dataset(_folder_cfg(image_tree), "train", 16, True)
    assert "no images" in str(e.value)


def _corrupt(image_tree: Path) -> tuple[Path, Path]:
    garbage = image_tree / "train" / "dog" / "broken.jpg"
    garbage.write_bytes(b"this is not a jpeg")
    good = image_tree / "train" / "cat" / "big.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(good)
    truncated = image_tree / "train" / "cat" / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    return garbage, truncated


def test_bad_image_error_names_file_and_fix(image_tree):
    garbage, truncated = _corrupt(image_tree)
    ds = D.build_dataset(_folder_cfg(image_tree), "train", 16, True)
    for bad in (garbage, truncated):
        index = [Path(p) for p, _ in ds.samples].index(bad)
        with pytest.raises(DataError, match=bad.name) as e:
            ds[index]
        assert "data.on_bad_image=skip" in str(e.value)
    with pytest.raises(DataError, match="on_bad_image=skip"):
        D.build_loader(_folder_cfg(image_tree, batch_size=4), "train", 16, True, seed=0)


def test_bad_image_skip_warns_and_skips(image_tree):
    garbage, truncated = _corrupt(image_tree)
    cfg = _folder_cfg(image_tree, batch_size=4, on_bad_image="skip")
    ds = D.build_dataset(cfg, "train", 16, False)
    index = [Path(p) for p, _ in ds.samples].index(garbage)
    with pytest.warns(UserWarning, match=garbage.name):
        x, y = ds[index]  # replaced by the next readable image of the split
    assert torch.equal(x, ds[index + 1][0]) and y == ds.samples[index + 1][1]
    with pytest.warns(UserWarning) as record:
        loader = D.build_loader(cfg, "train", 16, train=True, seed=0)
    messages = " ".join(str(w.message) for w in record)
    assert garbage.name in messages and truncated.name in messages
    assert len(loader.cache) == len(ds) - 2  # the in-memory path drops them


# -- the in-memory loader -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes_cache() -> D.UInt8Cache:
    return D.UInt8Cache.build(DataConfig(name="shapes", shapes_train_size=200), "train", 32)


def _loader(cache: D.UInt8Cache, **kw) -> D.InMemoryLoader:
    mean, std = D.dataset_stats("shapes")
    args = dict(batch_size=16, img_size=32, mean=mean, std=std, train=True, hflip=True, seed=3)
    args.update(kw)
    return D.InMemoryLoader(cache, **args)


def test_in_memory_batches_are_normalised(shapes_cache):
    loader = _loader(shapes_cache)
    batches = _batches(loader)
    assert len(batches) == len(loader) == 200 // 16  # drop_last when training
    x, y = batches[0]
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    allx = torch.cat([b[0] for b in batches])
    assert abs(allx.mean().item()) < 0.2 and 0.7 < allx.std().item() < 1.3
    assert len(_loader(shapes_cache, train=False)) == 13  # 12 full + 1 partial when evaluating


def test_in_memory_deterministic_per_epoch(shapes_cache):
    a, b = _loader(shapes_cache), _loader(shapes_cache)
    a.set_epoch(2), b.set_epoch(2)
    first = _batches(a)
    assert _same(first, _batches(b))
    assert _same(first, _batches(a))  # a second pass over the same epoch repeats it
    a.set_epoch(3)
    assert not torch.equal(first[0][0], _batches(a)[0][0])
    other_seed = _loader(shapes_cache, seed=4)
    other_seed.set_epoch(2)
    assert not torch.equal(first[0][0], _batches(other_seed)[0][0])


def test_in_memory_shards_are_disjoint_and_equal(shapes_cache):
    ranks = [_loader(shapes_cache, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(1)
    i0, i1 = ranks[0].indices(1), ranks[1].indices(1)
    assert len(i0) == len(i1) == 100 and not set(i0.tolist()) & set(i1.tolist())
    labels = [torch.cat([y for _, y in _batches(r)]) for r in ranks]
    assert torch.equal(labels[0], shapes_cache.labels[i0[:96]]) and torch.equal(labels[1], shapes_cache.labels[i1[:96]])


def test_in_memory_resume_mid_epoch(shapes_cache):
    full = _loader(shapes_cache)
    full.set_epoch(5)
    expected = _batches(full)
    interrupted = _loader(shapes_cache)
    interrupted.set_epoch(5)
    for k, _ in enumerate(interrupted):
        if k == 3:
            break
    state = interrupted.state_dict()
    assert state == {"epoch": 5, "batches_done": 4}
    resumed = _loader(shapes_cache)
    resumed.load_state_dict(state)
    resumed.set_epoch(5)  # a training loop's set_epoch keeps the restored position
    assert _same(_batches(resumed), expected[4:])
    skipping = _loader(shapes_cache)
    skipping.set_epoch(5, skip_batches=7)
    assert _same(_batches(skipping), expected[7:])
    skipping.set_epoch(6)
    assert len(_batches(skipping)) == len(skipping)  # the next epoch starts from its first batch


def test_augment_batch_geometry():
    images = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    plain = D.augment_batch(images, 12, mean, std, train=False)
    assert torch.allclose(plain, (images.float() / 255 - 0.5) / 0.25, atol=1e-5)
    gen = torch.Generator().manual_seed(0)
    whole = D.augment_batch(images, 12, mean, std, train=True, crop_scale=(1.0, 1.0), hflip=True, generator=gen)
    for w, p in zip(whole, plain):  # a full-image crop is the image itself, flipped or not
        assert torch.allclose(w, p, atol=1e-4) or torch.allclose(w, p.flip(-1), atol=1e-4)
    crops = D.augment_batch(images, 20, mean, std, train=True, generator=torch.Generator().manual_seed(1))
    again = D.augment_batch(images, 20, mean, std, train=True, generator=torch.Generator().manual_seed(1))
    assert crops.shape == (4, 3, 20, 20) and torch.equal(crops, again)


# -- the streaming loader and the entry point's checks ---------------------------------------------------

def test_streaming_loader_repeats_and_resumes():
    cfg = DataConfig(shapes_train_size=48, batch_size=8, in_memory=False)
    a = D.build_loader(cfg, "train", 32, train=True, seed=0)
    a.set_epoch(1)
    expected = _batches(a)
    assert len(expected) == len(a) == 6 and expected[0][0].shape == (8, 3, 32, 32)
    b = D.build_loader(cfg, "train", 32, train=True, seed=0)
    b.set_epoch(1, skip_batches=4)
    assert _same(_batches(b), expected[4:])
    shards = [D.build_loader(cfg, "train", 32, True, seed=0, rank=r, world_size=2) for r in range(2)]
    assert all(len(s) == 6 for s in shards)  # 48 images / 2 ranks, batches of 8 / 2 per rank
    assert not set(list(shards[0].sampler)) & set(list(shards[1].sampler))


def test_build_loader_checks_batch_size():
    with pytest.raises(DataError, match="divisible"):
        D.build_loader(DataConfig(batch_size=6), "train", 32, True, seed=0, world_size=4)
    with pytest.raises(DataError, match="fewer than one batch"):
        D.build_loader(DataConfig(batch_size=64, shapes_train_size=10), "train", 32, True, seed=0)


def test_build_transform_handles_pil_modes():
    cfg = DataConfig(name="fashion_mnist")
    gray = Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28) % 255, mode="L")
    for train in (True, False):
        x = D.build_transform(cfg, 32, train)(gray)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and type(x) is torch.Tensor
        assert torch.equal(x[0], x[1])  # gray repeated into three channels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = D.build_transform(DataConfig(), 32, False)(Image.new("LA", (40, 32)))
    assert x.shape == (3, 32, 32)


def test_dots_features_reads_the_factors_the_renderer_drew():
    """benchmarks/dots_features.py re-derives each image's rendering factors from the renderer's random draws;
    the background colour it reports is the colour of the image's border pixels (noise and stray dots aside)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import dots_features

    images, labels = D.render_dots(range(30), 32, 0, "test")
    f = dots_features.factors(30)
    assert f["class"].shape == (30, len(dots_module.DOTS_CLASSES))
    assert np.array_equal(f["class"].argmax(1), labels.numpy())
    border = torch.cat([images[:, :, 0, :], images[:, :, -1, :]], dim=2).float() / 255  # (N, 3, 2W)
    seen = border.median(dim=2).values.numpy()  # (N, 3)
    assert np.abs(seen - f["background colour"]).max() < 0.1  # NOISE is +-0.08
