"""Per-image datasets: torchvision's (CIFAR-10/100, STL-10, Fashion-MNIST) and ImageFolder trees, with
checked layouts, and `build_dataset`, which returns any of them (or a built-in one: 'shapes', 'dots') with its transform.

An ImageFolder tree is `ROOT/train/<class>/*` with `ROOT/val/<class>/*` or `ROOT/test/<class>/*` (Tiny-ImageNet's
val/ layout is read as well). Layout problems and unreadable images raise `DataError` naming the folder or
file, and `data.on_bad_image` decides whether a bad image is an error or skipped with a warning.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ijepa_viz.config import DataConfig
from ijepa_viz.data.catalog import BUILTIN, _FIXED_CLASSES, _STATS, _TORCHVISION_FOLDERS, DataError, _check_split
from ijepa_viz.data.transforms import _pil_to_rgb, build_transform

__all__ = ["ImageFolderDataset", "build_dataset", "class_names", "num_classes"]


def _torchvision_dataset(cfg: DataConfig, split: str, transform: Optional[Callable]) -> torch.utils.data.Dataset:
    """CIFAR-10/100, STL-10 or Fashion-MNIST from torchvision, downloaded into cfg.root if cfg.download."""
    import torchvision.datasets as tvd

    train = split == "train"
    root = os.path.expanduser(cfg.root)
    try:
        if cfg.name == "cifar10":
            return tvd.CIFAR10(root, train=train, transform=transform, download=cfg.download)
        if cfg.name == "cifar100":
            return tvd.CIFAR100(root, train=train, transform=transform, download=cfg.download)
        if cfg.name == "stl10":
            return tvd.STL10(root, split="train" if train else "test", transform=transform, download=cfg.download)
        if cfg.name == "fashion_mnist":
            return tvd.FashionMNIST(root, train=train, transform=transform, download=cfg.download)
    except Exception as e:  # missing files, failed download (no network), corrupt archive
        folder = os.path.join(root, _TORCHVISION_FOLDERS[cfg.name])
        how = ("the download failed" if cfg.download else
               "data.download=false and the files are not there")
        raise DataError(
            f"cannot load the {cfg.name} {split} split from {folder!r}: {how} ({type(e).__name__}: {e}). "
            f"Fixes: let torchvision download it with network access (--set data.download=true), or point "
            f"--set data.root=PATH at a folder that holds {_TORCHVISION_FOLDERS[cfg.name]} (torchvision's layout), "
            f"or train offline on the built-in dataset with --data shapes.") from e
    raise DataError(f"{cfg.name!r} is not a torchvision dataset")  # pragma: no cover


_IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_LAYOUT = ("ROOT/train/<class>/<image>.jpg|png|...  and  ROOT/val/<class>/<image> (or ROOT/test/<class>/...), "
           "one sub-folder per class")


def _split_dir(root: str, split: str) -> Path:
    """ROOT/train for 'train'; ROOT/val, else ROOT/test, for 'test'. Raises DataError on a missing folder."""
    path = Path(os.path.expanduser(root))
    if not path.is_dir():
        raise DataError(f"imagefolder root {str(path)!r} does not exist (data.root); point --set data.root=PATH at "
                        f"a folder laid out as {_LAYOUT}, or use --data shapes")
    if not (path / "train").is_dir():
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise DataError(f"imagefolder root {str(path)!r} has no train/ folder (found: {found}); "
                        f"expected layout: {_LAYOUT}")
    if split == "train":
        return path / "train"
    for name in ("val", "test"):
        if (path / name).is_dir():
            return path / name
    raise DataError(f"imagefolder root {str(path)!r} has train/ but neither val/ nor test/ for evaluation; "
                    f"expected layout: {_LAYOUT}")


def _is_tiny_imagenet_val(split_dir: Path) -> bool:
    """Tiny-ImageNet's val/ keeps all images in val/images/ and their classes in val/val_annotations.txt."""
    return (split_dir / "val_annotations.txt").is_file() and (split_dir / "images").is_dir()


def _class_folders(split_dir: Path) -> list[str]:
    """The class sub-folders of a split folder; raises DataError if images lie directly in it or none exist."""
    entries = list(os.scandir(split_dir))
    loose = sorted(e.name for e in entries if e.is_file() and e.name.lower().endswith(_IMG_EXTENSIONS))
    if loose:
        raise DataError(f"{str(split_dir)!r} holds images directly (e.g. {loose[0]!r}) instead of class "
                        f"sub-folders; move each image into a folder named after its class. "
                        f"Expected layout: {_LAYOUT}")
    classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{str(split_dir)!r} has no class sub-folders; expected layout: {_LAYOUT}")
    return classes


def _imagefolder_classes(root: str) -> list[str]:
    """The class names of an ImageFolder tree: the sub-folders of ROOT/train, sorted (as torchvision)."""
    return _class_folders(_split_dir(root, "train"))


def _load_rgb(path: str, size: Optional[int] = None) -> Image.Image:
    """Open and fully decode an image file as RGB (so truncated files fail here, not later).

    With `size`, the shorter side is resized to `size` and the image center-cropped to size x size
    (JPEGs are decoded at a reduced scale first when they are much larger).
    """
    with open(path, "rb") as f:
        img = Image.open(f)
        if size is not None and img.format == "JPEG":
            img.draft("RGB", (size, size))
        img.load()
    img = _pil_to_rgb(img)
    if size is not None and img.size != (size, size):
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=None if max(w / nw, h / nh) < 3 else 2.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def _bad_image(path: str, error: BaseException, policy: str, what: str) -> None:
    """Apply data.on_bad_image to an unreadable file: raise DataError ('error') or warn ('skip')."""
    if policy == "skip":
        warnings.warn(f"skipping unreadable image {path!r} ({type(error).__name__}: {error}); {what}", stacklevel=3)
        return
    raise DataError(f"cannot read image {path!r} ({type(error).__name__}: {error}). Replace or delete the file, "
                    f"or pass --set data.on_bad_image=skip to skip unreadable images with a warning") from error


def _make_imagefolder_base():
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import make_dataset

    class _Base(ImageFolder):
        def find_classes(self, directory):  # the classes of train/, so every split numbers them alike
            return list(self._wanted_classes), {c: i for i, c in enumerate(self._wanted_classes)}

        def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
            directory = Path(directory)
            if _is_tiny_imagenet_val(directory):
                samples = []
                for line in (directory / "val_annotations.txt").read_text().splitlines():
                    parts = line.split("\t")
                    if len(parts) >= 2 and parts[1] in class_to_idx:
                        samples.append((str(directory / "images" / parts[0]), class_to_idx[parts[1]]))
                return samples
            return make_dataset(str(directory), class_to_idx, extensions=extensions, is_valid_file=is_valid_file,
                                allow_empty=True)

    return _Base


class ImageFolderDataset(torch.utils.data.Dataset):
    """An ImageFolder split (torchvision's `ImageFolder` underneath) with checked layout and bad-image policy.

    `dataset[i]` is `(transform(RGB PIL image), int label)`, or the PIL image itself without a transform.
    Files whose extension is not an image extension are ignored; images of any mode are converted to RGB
    (grayscale and palette expanded, 16-bit rescaled, transparency composited onto white).
    A file with an image extension that cannot be decoded (corrupt, truncated) is handled by `on_bad_image`:
    'error' raises DataError naming it; 'skip' warns (naming it) and returns the next readable image of the
    split instead (index + 1, + 2, ...), so the result is deterministic and the length does not change.
    (The in-memory path, `UInt8Cache`, drops such files instead.)
    Tiny-ImageNet's val/ layout (val/images + val_annotations.txt) is read as well.
    """

    def __init__(self, root: str, split: str, transform: Optional[Callable] = None, on_bad_image: str = "error",
                 classes: Optional[Sequence[str]] = None) -> None:
        split_dir = _split_dir(root, split)
        self.classes = list(classes) if classes is not None else _imagefolder_classes(root)
        if not _is_tiny_imagenet_val(split_dir):
            extra = sorted(set(_class_folders(split_dir)) - set(self.classes))
            if extra:
                raise DataError(f"{str(split_dir)!r} has class folders that train/ lacks: {', '.join(extra[:5])}; "
                                f"every evaluation class needs a folder in train/ as well")
        base = _make_imagefolder_base()
        base._wanted_classes = self.classes
        samples = base(str(split_dir), transform=None, allow_empty=True).samples  # keep the list, not the scanner
        counts = np.bincount(np.asarray([t for _, t in samples], dtype=np.int64), minlength=len(self.classes))
        for cls, count in zip(self.classes, counts):
            if count == 0 and (split_dir / cls).is_dir():
                raise DataError(f"class folder {str(split_dir / cls)!r} has no images (extensions "
                                f"{', '.join(_IMG_EXTENSIONS)}); add images or remove the folder")
        if not samples:
            raise DataError(f"{str(split_dir)!r} has no images; expected layout: {_LAYOUT}")
        self.root, self.split, self.split_dir = root, split, split_dir
        self.samples: list[tuple[str, int]] = samples
        self.targets: list[int] = [t for _, t in samples]
        self.transform, self.on_bad_image = transform, on_bad_image

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not 0 <= index < len(self.samples):
            raise IndexError(f"index {index} out of range for {len(self.samples)} images in {str(self.split_dir)!r}")
        for step in range(len(self.samples)):
            path, label = self.samples[(index + step) % len(self.samples)]
            try:
                img = _load_rgb(path)
            except Exception as e:  # noqa: BLE001 - any decoding failure is a bad image
                _bad_image(path, e, self.on_bad_image, "using the next image of the split in its place")
                continue
            return (self.transform(img) if self.transform is not None else img), label
        raise DataError(f"no image in {str(self.split_dir)!r} can be read; check the files")


def _first_image_size(ds: ImageFolderDataset) -> tuple[int, int]:
    """(width, height) of the first readable image of a split (reads the header only)."""
    for path, _ in ds.samples[:50]:
        try:
            with Image.open(path) as img:
                return img.size
        except Exception:  # noqa: BLE001 - try the next one
            continue
    raise DataError(f"none of the first images in {str(ds.split_dir)!r} can be read; check the files")

def build_dataset(cfg: DataConfig, split: str, img_size: int, train_transform: bool) -> torch.utils.data.Dataset:
    """A per-image dataset of cfg.name: `ds[i]` is (normalised float tensor (3, img_size, img_size), int label).

    train_transform=True applies the training augmentation (`build_transform(cfg, img_size, True)`), else the
    eval transform. 'test' is the held-out split (ImageFolder: val/, or test/ when there is no val/).
    """
    _check_split(split)
    transform = build_transform(cfg, img_size, train_transform)
    if cfg.name in BUILTIN:
        size = cfg.shapes_train_size if split == "train" else cfg.shapes_test_size
        return BUILTIN[cfg.name][0](split, img_size, size, seed=0, transform=transform)
    if cfg.name == "imagefolder":
        return ImageFolderDataset(cfg.root, split, transform=transform, on_bad_image=cfg.on_bad_image)
    if cfg.name in _TORCHVISION_FOLDERS:
        return _torchvision_dataset(cfg, split, transform)
    raise DataError(f"data.name={cfg.name!r} is not a dataset; choose one of {', '.join(_STATS)}")

def class_names(cfg: DataConfig) -> list[str]:
    """The class names of cfg's dataset, in label order (imagefolder: the sorted folders of ROOT/train)."""
    if cfg.name == "imagefolder":
        return _imagefolder_classes(cfg.root)
    if cfg.name in _FIXED_CLASSES:
        return list(_FIXED_CLASSES[cfg.name])
    raise DataError(f"data.name={cfg.name!r} is not a dataset; choose one of {', '.join(_STATS)}")


def num_classes(cfg: DataConfig) -> int:
    """How many classes cfg's dataset has."""
    return len(class_names(cfg))
