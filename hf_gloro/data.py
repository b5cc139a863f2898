"""Loading image-classification datasets the Hub way (or from local copies in the Hub's layout)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

#: Hub names of the datasets the recipes know, with the local folder name used in ``dataset_dir`` copies.
KNOWN_DATASETS = {
    "ylecun/mnist": "mnist",
    "uoft-cs/cifar10": "cifar10",
    "zh-plus/tiny-imagenet": "tiny_imagenet_subset",
}


def load_image_dataset(name: str, split: str, dataset_dir: str | None = None):
    """``datasets.load_dataset(name, split=split)``, or the same layout read from a local folder.

    ``dataset_dir`` may be the dataset's own folder (parquet shards) or a folder containing it under the
    name listed in :data:`KNOWN_DATASETS` (e.g. ``../shared/data``).
    """
    import datasets

    if dataset_dir is None:
        return datasets.load_dataset(name, split=split)
    folder = dataset_dir
    nested = os.path.join(dataset_dir, KNOWN_DATASETS.get(name, os.path.basename(name)))
    if os.path.isdir(nested):
        folder = nested
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"dataset folder {folder!r} does not exist")
    return datasets.load_dataset(folder, split=split)


def image_column(dataset) -> str:
    """Name of the (first) ``Image`` column of a ``datasets.Dataset`` (``image`` for MNIST, ``img`` for CIFAR)."""
    import datasets

    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise ValueError(f"dataset has no Image column (columns: {list(dataset.features)})")


def label_column(dataset) -> str:
    """Name of the ``ClassLabel`` column (``label`` / ``fine_label`` ...)."""
    import datasets

    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.ClassLabel):
            return name
    if "label" in dataset.features:
        return "label"
    raise ValueError(f"dataset has no ClassLabel column (columns: {list(dataset.features)})")


def images_to_pixels(images: Sequence[Image.Image | np.ndarray], num_channels: int, image_size: int) -> torch.Tensor:
    """PIL images (or uint8 arrays) → float tensor ``(B, C, H, W)`` in [0, 1] with the model's channels and size."""
    mode = {1: "L", 3: "RGB"}.get(num_channels)
    if mode is None:
        raise ValueError(f"only 1 or 3 channels are supported, got {num_channels}")
    arrays = []
    for image in images:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = image.convert(mode)
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        arrays.append(array[:, :, None] if array.ndim == 2 else array)
    stacked = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return stacked.float().div_(255.0)
