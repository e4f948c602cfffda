"""What the toolkit knows about each dataset: class names, normalisation statistics, and `DataError`.

The lowest file of `ijepa_viz.data` after the renderer: transforms, datasets, the cache and the loaders all read
these tables, and all raise `DataError`, whose message names the file or folder and says how to fix it.
"""
from __future__ import annotations

from ijepa_viz.data.dots import DOTS_CLASSES, DotsDataset, render_dots
from ijepa_viz.data.shapes import SHAPES_CLASSES, ShapesDataset, render_shapes

__all__ = ["DataError", "dataset_stats"]


class DataError(RuntimeError):
    """A dataset cannot be read; the message names the file or folder and the fix."""


_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_STATS = {
    # measured over 5,000 rendered 32 px training images
    "shapes": ((0.500, 0.497, 0.502), (0.257, 0.258, 0.259)),
    "dots": ((0.501, 0.500, 0.502), (0.187, 0.186, 0.187)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion_mnist": ((0.2860, 0.2860, 0.2860), (0.3530, 0.3530, 0.3530)),
    "stl10": _IMAGENET_STATS,
    "imagefolder": _IMAGENET_STATS,
}

_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR100_CLASSES = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle
caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant
flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man
maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree
plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail
snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout
tulip turtle wardrobe whale willow_tree wolf woman worm""".split())
_STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot")
# The built-in, procedural datasets: name -> (per-image Dataset class, batch renderer). Their split sizes are
# data.shapes_train_size and data.shapes_test_size, whichever of them is chosen.
BUILTIN = {"shapes": (ShapesDataset, render_shapes), "dots": (DotsDataset, render_dots)}
_FIXED_CLASSES = {"shapes": SHAPES_CLASSES, "dots": DOTS_CLASSES, "cifar10": _CIFAR10_CLASSES, "cifar100": _CIFAR100_CLASSES,
                  "stl10": _STL10_CLASSES, "fashion_mnist": _FASHION_CLASSES}
_TORCHVISION_FOLDERS = {"cifar10": "cifar-10-batches-py/", "cifar100": "cifar-100-python/",
                        "stl10": "stl10_binary/", "fashion_mnist": "FashionMNIST/raw/"}
_IN_MEMORY_NAMES = ("shapes", "dots", "cifar10", "cifar100", "fashion_mnist")  # plus imagefolder with images <= 64 px
_SMALL_IMAGE_PX = 64


def dataset_stats(name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel (mean, std) of a dataset's pixels in [0, 1], used by Normalize.

    CIFAR-10/100 and Fashion-MNIST: their published training-set statistics; stl10 and imagefolder: ImageNet's;
    shapes and dots: measured on rendered images.
    """
    if name not in _STATS:
        raise DataError(f"no statistics for dataset {name!r}; data.name must be one of {', '.join(_STATS)}")
    return _STATS[name]


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
