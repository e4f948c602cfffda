"""Datasets, transforms and loaders: one entry point for every dataset the toolkit trains on.

One file per concern, read in this order (each imports only files above it):

1. `shapes` - ``ShapesDataset``, the built-in offline dataset: 10 classes, each image a mosaic of nine copies
   of the class's shape in random colours, poses and positions on a textured background, rendered by
   vectorised signed-distance tests at any resolution (a linear probe on its raw pixels is near chance).
   `dots` - ``DotsDataset``, the built-in dataset the demo learns: 10 figures (lines, circle, plus, square, ...)
   drawn with 8 identical-looking dots, turned, lighter or darker than a grey background, so that only their
   arrangement says the class.
2. `catalog` - per-dataset facts: class names and normalisation statistics (``dataset_stats``), and
   ``DataError``.
3. `transforms` - ``build_transform``: the official I-JEPA augmentation (RandomResizedCrop, optional flip,
   normalise) and an eval transform (resize, center crop, normalise); and ``augment_batch``, the same crops
   for a whole uint8 batch at once (per-sample affine grids, ~36,000 images/s at 32 px on one core).
4. `datasets` - torchvision datasets (``cifar10``, ``cifar100``, ``stl10``, ``fashion_mnist``) and
   ``imagefolder`` (``ROOT/train/<class>/*`` with ``ROOT/val/<class>/*`` or ``ROOT/test/<class>/*``), with
   checked layouts; ``build_dataset``, ``num_classes``, ``class_names``.
5. `cache` - the fast in-memory path for small datasets: ``UInt8Cache`` decodes a split once into a uint8
   tensor; ``load_uint8`` returns one for display and probing.
6. `loaders` - ``InMemoryLoader`` augments whole batches of a cache with ``augment_batch``;
   ``StreamingLoader`` wraps a DataLoader for everything else; ``build_loader`` picks one.

Every loader yields ``(images float (B, 3, H, W), labels int64 (B,))``, has ``len()`` (batches per epoch),
``set_epoch(epoch)`` and ``state_dict()`` / ``load_state_dict()``: the batches of epoch ``e`` - their order
AND their augmentations - depend only on ``(seed, epoch, rank)``, so a run resumed mid-epoch sees exactly the
batches the interrupted run would have seen. A rank's batch k is rows rank::world_size of the global batch k,
augmentation included, so W processes train on exactly the images of one process with the global batch.

Data problems raise ``DataError``; each message names the file or folder and says how to fix it.

Every public name of these files is importable from here: ``from ijepa_viz.data import build_loader``.
"""
from ijepa_viz.data.shapes import SHAPES_CLASSES, ShapesDataset, render_shapes
from ijepa_viz.data.dots import DOTS_CLASSES, DotsDataset, render_dots
from ijepa_viz.data.catalog import BUILTIN, DataError, dataset_stats
from ijepa_viz.data.transforms import ToRGB, augment_batch, build_transform, crop_params
from ijepa_viz.data.datasets import ImageFolderDataset, build_dataset, class_names, num_classes
from ijepa_viz.data.cache import UInt8Cache, load_uint8
from ijepa_viz.data.loaders import InMemoryLoader, StreamingLoader, build_loader

__all__ = [
    "DataError", "SHAPES_CLASSES", "ShapesDataset", "render_shapes", "DOTS_CLASSES", "DotsDataset", "render_dots", "BUILTIN", "dataset_stats", "build_transform",
    "ToRGB", "ImageFolderDataset", "UInt8Cache", "crop_params", "augment_batch", "InMemoryLoader", "StreamingLoader",
    "build_dataset", "build_loader", "num_classes", "class_names", "load_uint8",
]
