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


def load_image_dataset(name: str, split: str, dataset_dir: str | None = None, streaming: bool = False):
    """``datasets.load_dataset(name, split=split)``, or the same layout read from a local folder.

    ``dataset_dir`` may be the dataset's own folder (parquet shards) or a folder containing it under the
    name listed in :data:`KNOWN_DATASETS` (e.g. ``../shared/data``). ``name`` itself may also be a local folder
    (e.g. a folder of parquet shards). ``streaming=True`` returns a ``datasets.IterableDataset`` that reads the
    shards as it goes (no full local copy; works offline on local parquet files).
    """
    import datasets

    if dataset_dir is None:
        return datasets.load_dataset(name, split=split, streaming=streaming)
    folder = dataset_dir
    nested = os.path.join(dataset_dir, KNOWN_DATASETS.get(name, os.path.basename(name)))
    if os.path.isdir(nested):
        folder = nested
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"dataset folder {folder!r} does not exist")
    try:
        return datasets.load_dataset(folder, split=split, streaming=streaming)
    except ValueError as error:
        # A local copy of shards named like the Hub's (``valid-*.parquet``) gets the split name ``datasets``
        # infers from the file names (``validation``), not the one the Hub repository declares (``valid``).
        alias = _SPLIT_ALIASES.get(split)
        if alias is None or not any(text in str(error) for text in ("Unknown split", "Bad split")):
            raise
        return datasets.load_dataset(folder, split=alias, streaming=streaming)


#: Split names ``datasets`` infers from local file names, for the names a Hub repository may declare.
_SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation", "validation": "valid"}


def label_names(dataset) -> list[str] | None:
    """The class names of a dataset's ``ClassLabel`` column (``None`` for plain integer labels)."""
    import datasets

    feature = (dataset.features or {}).get(label_column(dataset))
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def check_same_label_space(names: Sequence[str], other, what: str = "extra_train_dataset") -> None:
    """Raise a one-line ``ValueError`` unless ``other``'s labels are the class names ``names`` (same order)."""
    other_names = label_names(other)
    if other_names is None:
        return  # integer labels: checked against the range when the rows are read
    if list(other_names) != list(names):
        differ = next((i for i, (a, b) in enumerate(zip(names, other_names)) if a != b), min(len(names),
                                                                                             len(other_names)))
        raise ValueError(
            f"{what} has a different label space: {len(other_names)} classes vs {len(names)}, first difference at "
            f"index {differ} ({other_names[differ] if differ < len(other_names) else '-'!r} vs "
            f"{names[differ] if differ < len(names) else '-'!r}); it must use the same ClassLabel names in the same order")


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


def add_index_column(dataset, name: str = "index", offset: int = 0):
    """Add ``offset +`` the row number as a column (the key of :class:`PixelsTransform`'s deterministic
    augmentation; an offset keeps the keys of a second, mixed-in dataset distinct)."""
    if name in dataset.column_names:
        return dataset
    return dataset.add_column(name, np.arange(offset, offset + len(dataset), dtype=np.int64))


class MixedTrainingSet(torch.utils.data.Dataset):
    """The real training set plus ``ratio`` extra examples per real one, drawn anew every epoch.

    An epoch has ``n + m`` rows, ``m = round(ratio·n)``: rows ``0..n−1`` are the real examples, rows ``n..n+m−1``
    the extra examples at positions ``e·m .. e·m + m − 1`` (epoch ``e``) of an endless sequence of seeded
    permutations of the extra set, so extra examples are sampled **without replacement** within an epoch (and
    every extra example is seen once before any is seen twice, across epochs). The trainer's sampler shuffles
    the ``n + m`` rows as usual. The choice is a pure function of ``(seed, epoch)``:
    :class:`~hf_gloro.trainer.EpochSeededAugmentationCallback` calls :meth:`set_epoch`, which also forwards the
    epoch to both datasets' seeded transforms. Batches are fetched with ``__getitems__`` (one transform call per
    dataset per batch, as for a plain ``datasets.Dataset``).
    """

    def __init__(self, real, extra, ratio: float, seed: int = 0) -> None:
        if not ratio > 0:
            raise ValueError(f"extra_train_ratio must be > 0, got {ratio}")
        if len(extra) == 0:
            raise ValueError("the extra training dataset is empty")
        self.real, self.extra, self.ratio, self.seed = real, extra, float(ratio), int(seed)
        self.extra_per_epoch = max(1, int(round(self.ratio * len(real))))
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.real) + self.extra_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for part in (self.real, self.extra):
            transform = (getattr(part, "format", None) or {}).get("format_kwargs", {}).get("transform")
            if hasattr(transform, "set_epoch"):
                transform.set_epoch(self.epoch)

    def extra_indices(self, epoch: int | None = None) -> np.ndarray:
        """Rows of the extra dataset used in ``epoch`` (default: the current one), in the epoch's row order."""
        epoch = self.epoch if epoch is None else int(epoch)
        size, count = len(self.extra), self.extra_per_epoch
        start = epoch * count
        chunks, position = [], start
        while position < start + count:  # walk the concatenation of per-cycle permutations
            cycle, offset = divmod(position, size)
            permutation = np.random.default_rng([self.seed, cycle]).permutation(size)
            take = min(size - offset, start + count - position)
            chunks.append(permutation[offset:offset + take])
            position += take
        return np.concatenate(chunks)

    def __getitems__(self, indices):
        indices = [int(i) for i in indices]
        n = len(self.real)
        chosen = self.extra_indices()
        real_rows = [(k, i) for k, i in enumerate(indices) if i < n]
        extra_rows = [(k, int(chosen[i - n])) for k, i in enumerate(indices) if i >= n]
        out: list = [None] * len(indices)
        for part, rows in ((self.real, real_rows), (self.extra, extra_rows)):
            if rows:
                fetched = _get_items(part, [i for _, i in rows])
                for (k, _), item in zip(rows, fetched):
                    out[k] = item
        return out

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]


def _get_items(dataset, indices: list[int]) -> list[dict]:
    """``dataset.__getitems__`` when it has one (a formatted ``datasets.Dataset``: one batched transform)."""
    if hasattr(dataset, "__getitems__"):
        return dataset.__getitems__(indices)
    return [dataset[i] for i in indices]


class StreamingPixelsCollator:
    """Collator for streamed rows (``datasets.IterableDataset``): decode and augment a whole batch at once.

    Rows carry a decoded image (PIL, from the ``Image`` feature) and a label; the batch is converted to
    ``uint8`` ``(C, H, W)`` at the model's size, then passed through ``transform`` (a :class:`PixelsTransform`,
    usually unseeded: a stream has no stable row index) in one call. Rows that already hold ``pixel_values``
    (the validation/test sets, materialised) are stacked as they are.
    """

    def __init__(self, transform: "PixelsTransform", image_key: str = "image", label_key: str = "label",
                 num_classes: int | None = None) -> None:
        self.transform, self.image_key, self.label_key = transform, image_key, label_key
        self.num_classes = num_classes

    def __call__(self, examples: list[dict]) -> dict:
        if examples and "pixel_values" in examples[0]:
            from .trainer import collate_pixels  # lazy: data.py stays free of transformers at import time

            return collate_pixels(examples)
        channels, size = self.transform.shape[0], self.transform.shape[1]
        pixels = [_to_uint8_chw(e[self.image_key], channels, size).tobytes() for e in examples]
        labels = [int(e[self.label_key]) for e in examples]
        if self.num_classes is not None and any(not 0 <= label < self.num_classes for label in labels):
            raise ValueError(f"a streamed label lies outside [0, {self.num_classes}): {labels}")
        return self.transform({PIXELS_COLUMN: pixels, "label": labels})


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


#: Names of the policy augmentations (torchvision v2 transforms on uint8 tensors) :class:`PixelsTransform` knows.
AUGMENTATIONS = ("randaugment", "trivialaugment", "autoaugment")


def policy_augmentation(name: str, num_ops: int = 2, magnitude: int = 9, policy: str = "cifar10"):
    """The torchvision v2 transform called ``name`` (:data:`AUGMENTATIONS`) for ``uint8`` ``(C, H, W)`` tensors.

    ``randaugment``: ``v2.RandAugment(num_ops, magnitude)``; ``trivialaugment``: ``v2.TrivialAugmentWide()``;
    ``autoaugment``: ``v2.AutoAugment(AutoAugmentPolicy(policy))`` (``imagenet`` | ``cifar10`` | ``svhn``).
    """
    from torchvision.transforms import v2

    key = name.strip().lower().replace("_", "").replace("-", "")
    if key == "randaugment":
        return v2.RandAugment(num_ops=int(num_ops), magnitude=int(magnitude))
    if key in ("trivialaugment", "trivialaugmentwide"):
        return v2.TrivialAugmentWide()
    if key == "autoaugment":
        return v2.AutoAugment(v2.AutoAugmentPolicy(policy.lower()))
    raise ValueError(f"unknown augmentation {name!r}; choose one of {list(AUGMENTATIONS)} (or none)")


class PixelsTransform:
    """``datasets`` transform (for ``with_transform``) from decoded ``pixels`` bytes to model inputs.

    Output: ``pixel_values`` (float32 ``(B, C, H, W)`` in [0, 1]) and ``labels``. With ``crop_padding`` /
    ``horizontal_flip`` it augments the whole batch in torch. ``augmentation`` (:data:`AUGMENTATIONS`) then
    applies a torchvision v2 policy (RandAugment, TrivialAugmentWide, AutoAugment) to each uint8 image of the
    batch with probability ``augmentation_probability`` (LiResNet: ``RandomApply([RandAugment()])``, p = ½),
    each image with its own random operations.

    Randomness: with ``seed`` set, every random choice is a pure function of ``(seed, epoch, example index)``
    (the dataset needs an ``index`` column, see :func:`add_index_column`; the epoch is set with
    :meth:`set_epoch`, which :class:`~hf_gloro.trainer.GloRoTrainer` calls before every epoch). Augmentation
    is then independent of data-loader prefetching, worker processes and RNG checkpointing, so a resumed
    run sees exactly the images the uninterrupted run saw. Without ``seed``, torch's global generator is used.
    """

    def __init__(self, num_channels: int, image_size: int, crop_padding: int = 0, horizontal_flip: bool = False,
                 seed: int | None = None, augmentation: str | None = None, augmentation_probability: float = 1.0,
                 randaugment_num_ops: int = 2, randaugment_magnitude: int = 9, autoaugment_policy: str = "cifar10"):
        self.shape = (num_channels, image_size, image_size)
        self.crop_padding = int(crop_padding)
        self.horizontal_flip = bool(horizontal_flip)
        self.seed = seed
        self.epoch = 0
        if augmentation is not None and str(augmentation).strip().lower() in ("", "none"):
            augmentation = None
        if not 0.0 <= augmentation_probability <= 1.0:
            raise ValueError(f"augmentation_probability must lie in [0, 1], got {augmentation_probability}")
        self.augmentation = augmentation
        self.augmentation_probability = float(augmentation_probability)
        self.policy = (policy_augmentation(augmentation, randaugment_num_ops, randaugment_magnitude, autoaugment_policy)
                       if augmentation is not None else None)

    @property
    def augments(self) -> bool:
        return self.crop_padding > 0 or self.horizontal_flip or self.policy is not None

    def _apply_policy(self, images: torch.Tensor, index: np.ndarray | None) -> torch.Tensor:
        """The policy on each image (uint8, ``(C, H, W)``): seeded per ``(seed, epoch, index)`` when seeded."""
        count = images.shape[0]
        if index is None:
            chosen = torch.rand(count) < self.augmentation_probability
            seeds = None
        else:
            chosen = torch.from_numpy(counter_uniform(self.seed, self.epoch, index, 4) < self.augmentation_probability)
            seeds = (counter_uniform(self.seed, self.epoch, index, 5) * 2.0**52).astype(np.int64)
        if not bool(chosen.any()):
            return images
        images = images.clone()
        if seeds is None:
            for i in chosen.nonzero().flatten().tolist():
                images[i] = self.policy(images[i])
            return images
        with torch.random.fork_rng(devices=[]):  # the caller's generator is left as it was
            for i in chosen.nonzero().flatten().tolist():
                torch.default_generator.manual_seed(int(seeds[i]))  # CPU generator only: ~100× cheaper
                images[i] = self.policy(images[i])
        return images

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, batch: dict) -> dict:
        raw = batch[PIXELS_COLUMN]
        count = len(raw)
        images = torch.from_numpy(np.frombuffer(b"".join(raw), dtype=np.uint8).reshape(count, *self.shape).copy())
        if self.augments:
            offsets = flip = index = None
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
            if self.policy is not None:
                images = self._apply_policy(images, index)
        return {"pixel_values": uint8_to_unit(images), "labels": torch.as_tensor(batch["label"], dtype=torch.long)}
