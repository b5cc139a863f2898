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
    """PIL images (or uint8 arrays) → float tensor ``(B, C, H, W)`` in [0, 1] with the model's channels and size.

    Pixels are ``uint8 · (1/255)`` in float32, bit-identical to what :class:`~hf_gloro.GloRoImageProcessor`
    produces for images already at the model's size.
    """
    if num_channels not in (1, 3):
        raise ValueError(f"only 1 or 3 channels are supported, got {num_channels}")
    stacked = torch.from_numpy(np.stack([_to_uint8_chw(image, num_channels, image_size) for image in images]))
    return uint8_to_unit(stacked)


def uint8_to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """``uint8`` pixels → float32 in [0, 1], the same arithmetic as the image processor's rescale."""
    return pixels.float().mul_(1 / 255)


# --- fast training pipeline: decode once to raw uint8 bytes, augment whole batches in torch ----------------

#: Name of the column holding decoded images as raw ``uint8`` bytes in ``(C, H, W)`` order.
PIXELS_COLUMN = "pixels"


def _to_uint8_chw(image, num_channels: int, image_size: int) -> np.ndarray:
    mode = {1: "L", 3: "RGB"}[num_channels]
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert(mode)
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    array = array[:, :, None] if array.ndim == 2 else array
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def decode_images(dataset, num_channels: int, image_size: int, num_proc: int | None = None):
    """Decode the ``Image`` column once into raw ``uint8`` ``(C, H, W)`` bytes (column :data:`PIXELS_COLUMN`).

    Returns a dataset with exactly two columns, ``pixels`` (binary) and ``label`` (the ``ClassLabel``
    column renamed), so an epoch never PNG/JPEG-decodes again and a batch is one ``np.frombuffer``.
    The result is cached by ``datasets`` (fingerprinted), so later runs skip the decoding.
    """
    import datasets

    if PIXELS_COLUMN in dataset.column_names:
        return dataset
    images, labels = image_column(dataset), label_column(dataset)
    label_feature = dataset.features[labels]
    if not isinstance(label_feature, datasets.ClassLabel):
        label_feature = datasets.Value("int64")
    features = datasets.Features({PIXELS_COLUMN: datasets.Value("binary"), "label": label_feature})

    def convert(batch):
        return {
            PIXELS_COLUMN: [_to_uint8_chw(image, num_channels, image_size).tobytes() for image in batch[images]],
            "label": batch[labels],
        }

    return dataset.map(convert, batched=True, batch_size=1000, remove_columns=dataset.column_names,
                       features=features, num_proc=num_proc, desc=f"decoding to uint8 {num_channels}x{image_size}²")


def uint8_arrays_dataset(images: np.ndarray, labels: Sequence[int], label_names: Sequence[str]):
    """A ``datasets.Dataset`` in the decoded layout from ``(N, C, H, W)`` uint8 images (e.g. scikit-learn data)."""
    import datasets

    images = np.ascontiguousarray(images, dtype=np.uint8)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {images.shape}")
    features = datasets.Features({PIXELS_COLUMN: datasets.Value("binary"),
                                  "label": datasets.ClassLabel(names=list(label_names))})
    return datasets.Dataset.from_dict(
        {PIXELS_COLUMN: [image.tobytes() for image in images], "label": [int(label) for label in labels]},
        features=features,
    )


def load_sklearn_digits(image_size: int = 8):
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes; no network) in the decoded
    layout, pixels rescaled from 0..16 to 0..255 and optionally resized to ``image_size``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    if image_size != 8:
        images = np.stack([np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.BILINEAR))
                           for image in images])
    return uint8_arrays_dataset(images[:, None], digits.target, [str(i) for i in range(10)])


#: Name of scikit-learn's bundled digits as a data set name (recipes, ``hf-gloro card --dataset``).
SKLEARN_DIGITS = "sklearn/digits"


def load_sklearn_digits_split(split: str, image_size: int = 8, test_size: float = 0.2, seed: int = 0):
    """``train`` or ``test`` part of scikit-learn's digits: a stratified ``test_size`` carve with ``seed``, the
    split the recipes use (digits has no test split of its own)."""
    if split not in ("train", "test"):
        raise ValueError(f"{SKLEARN_DIGITS} has the splits 'train' and 'test' (carved with test_size and seed), "
                         f"not {split!r}")
    parts = load_sklearn_digits(image_size).train_test_split(test_size=test_size, seed=seed,
                                                             stratify_by_column="label")
    return parts[split]


def train_validation_split(dataset, validation_size: int | float, seed: int = 0):
    """Carve a stratified validation split out of a *training* split: ``(train, validation)``.

    Model selection must use this split, never the test set.
    """
    import datasets

    stratify = "label" if isinstance(dataset.features.get("label"), datasets.ClassLabel) else None
    parts = dataset.train_test_split(test_size=validation_size, seed=seed, stratify_by_column=stratify)
    return parts["train"], parts["test"]


def add_index_column(dataset, name: str = "index"):
    """Add the row number as a column (the key of :class:`PixelsTransform`'s deterministic augmentation)."""
    if name in dataset.column_names:
        return dataset
    return dataset.add_column(name, np.arange(len(dataset), dtype=np.int64))


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def counter_uniform(seed: int, epoch: int, indices: np.ndarray, stream: int) -> np.ndarray:
    """Uniform [0, 1) numbers that are a pure function of ``(seed, epoch, example index, stream)``."""
    key = _splitmix64(np.array([seed], dtype=np.uint64))
    key = _splitmix64(key ^ np.uint64(epoch))
    key = _splitmix64(key ^ np.uint64(stream))
    bits = _splitmix64(key ^ np.asarray(indices, dtype=np.int64).astype(np.uint64))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def random_crop(images: torch.Tensor, padding: int, offsets: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-image random crop of ``(B, C, H, W)`` images after zero-padding by ``padding`` on each side.

    ``offsets`` = ``(dy, dx)`` in ``[0, 2·padding]`` per image (default: drawn from torch's generator).
    """
    if padding <= 0:
        return images
    batch, channels, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    if offsets is None:
        offsets = (torch.randint(0, 2 * padding + 1, (batch,)), torch.randint(0, 2 * padding + 1, (batch,)))
    dy, dx = offsets
    rows = (dy[:, None] + torch.arange(height))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width))[:, None, None, :]
    return padded[torch.arange(batch)[:, None, None, None], torch.arange(channels)[None, :, None, None], rows, cols]


def random_horizontal_flip(images: torch.Tensor, probability: float = 0.5, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Flip each image left-right with the given probability (or where the boolean mask ``flip`` is set)."""
    if flip is None:
        flip = torch.rand(images.shape[0]) < probability
    if flip.any():
        images = images.clone()
        images[flip] = images[flip].flip(-1)
    return images


class PixelsTransform:
    """``datasets`` transform (for ``with_transform``) from decoded ``pixels`` bytes to model inputs.

    Output: ``pixel_values`` (float32 ``(B, C, H, W)`` in [0, 1]) and ``labels``. With ``crop_padding`` /
    ``horizontal_flip`` it augments the whole batch in torch.

    Randomness: with ``seed`` set, every random choice is a pure function of ``(seed, epoch, example index)``
    (the dataset needs an ``index`` column, see :func:`add_index_column`; the epoch is set with
    :meth:`set_epoch`, which :class:`~hf_gloro.trainer.GloRoTrainer` calls before every epoch). Augmentation
    is then independent of data-loader prefetching, worker processes and RNG checkpointing, so a resumed
    run sees exactly the images the uninterrupted run saw. Without ``seed``, torch's global generator is used.
    """

    def __init__(self, num_channels: int, image_size: int, crop_padding: int = 0, horizontal_flip: bool = False,
                 seed: int | None = None):
        self.shape = (num_channels, image_size, image_size)
        self.crop_padding = int(crop_padding)
        self.horizontal_flip = bool(horizontal_flip)
        self.seed = seed
        self.epoch = 0

    @property
    def augments(self) -> bool:
        return self.crop_padding > 0 or self.horizontal_flip

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, batch: dict) -> dict:
        raw = batch[PIXELS_COLUMN]
        count = len(raw)
        images = torch.from_numpy(np.frombuffer(b"".join(raw), dtype=np.uint8).reshape(count, *self.shape).copy())
        if self.augments:
            offsets = flip = None
            if self.seed is not None:
                if "index" not in batch:
                    raise KeyError("seeded augmentation needs an 'index' column (hf_gloro.data.add_index_column)")
                index = np.asarray(batch["index"], dtype=np.int64)
                span = 2 * self.crop_padding + 1
                offsets = tuple(torch.from_numpy((counter_uniform(self.seed, self.epoch, index, s) * span)
                                                 .astype(np.int64)) for s in (1, 2))
                flip = torch.from_numpy(counter_uniform(self.seed, self.epoch, index, 3) < 0.5)
            if self.crop_padding:
                images = random_crop(images, self.crop_padding, offsets)
            if self.horizontal_flip:
                images = random_horizontal_flip(images, flip=flip)
        return {"pixel_values": uint8_to_unit(images), "labels": torch.as_tensor(batch["label"], dtype=torch.long)}
