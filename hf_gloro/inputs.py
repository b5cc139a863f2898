"""Finding, opening and checking the images to certify (used by the ``hf-gloro`` CLI and the pipeline).

* :func:`collect_inputs`: image files, folders of images, data sets (a local folder in the Hub layout,
  ``parquet:/dir:split``, a Hub data set name, ``sklearn/digits``) → a list of :class:`Item`.
* :func:`load_dataset_spec`: one data set argument → ``(datasets.Dataset, description)``.
* :func:`prepare_image`: check an image against the model's input size and channel count. A mismatch is
  refused (:class:`InputMismatchError`, naming the file and the expected size) unless resizing/converting
  was asked for; then the image is resized (bilinear, as the training data) or converted, and a note says
  that the certificate is about the processed image, not the file.

Errors are :class:`InputError` (a ``ValueError``) with a one-line message naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}

#: PIL mode a model with this many channels takes, and the modes accepted as they are.
MODEL_MODES = {1: "L", 3: "RGB"}
_ACCEPTED_MODES = {1: {"L", "1"}, 3: {"RGB"}}
_MODE_NAMES = {"L": "grayscale (L, 1 channel)", "RGB": "RGB (3 channels)"}


class InputError(ValueError):
    """An input that cannot be used: one line naming the file or data set."""


class UnreadableImageError(InputError):
    """A file that is not a readable image (the CLI reports it and goes on with the other inputs)."""


class InputMismatchError(InputError):
    """An image whose size or channel count differs from the model's (refused unless resize/convert)."""


@dataclass
class Item:
    """One image to certify: where it came from, how to open it, and its true label if known."""

    source: str
    index: int | None
    load: Callable  # () -> PIL.Image.Image
    label: int | None = None

    @property
    def name(self) -> str:
        return self.source if self.index is None else f"{self.source}[{self.index}]"


def is_local_reference(reference: str) -> bool:
    """Whether ``reference`` names a local path (rather than a Hub repo or data set id)."""
    return os.path.exists(reference) or reference.startswith((".", "/", "~")) or reference.count("/") > 1 \
        or (os.sep != "/" and os.sep in reference)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def open_image(path: str | os.PathLike):
    """Open an image file fully (no conversion); :class:`UnreadableImageError` if it is not one."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            copy = image.copy()
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UnreadableImageError(f"cannot read image {str(path)!r}: {_first_line(error)}") from error
    copy.filename = str(path)
    return copy


# --- checking an image against the model ---------------------------------------------------------------
def _size(pixels: int) -> str:
    return f"{pixels}×{pixels}"


def prepare_image(image, num_channels: int, image_size: int, source: str = "image", *, resize: bool = False,
                  convert: bool = False):
    """``(image, note)``: ``image`` in the model's mode and size, ``note`` ``None`` if it was used as it is.

    Refuses (:class:`InputMismatchError`) an image of another size unless ``resize``, of another colour mode
    unless ``convert``. With permission the image is converted (PIL) and resized (bilinear, as
    :func:`hf_gloro.data.images_to_pixels`), and ``note`` says what was done: the certificate is about that
    processed image, not about the file.
    """
    from PIL import Image

    if num_channels not in MODEL_MODES:
        raise InputError(f"models with {num_channels} channels are not supported (1 or 3)")
    mode = MODEL_MODES[num_channels]
    notes = []
    if image.mode not in _ACCEPTED_MODES[num_channels]:
        if not convert:
            raise InputMismatchError(
                f"image {source!r} is {image.mode} but the model takes {_MODE_NAMES[mode]} images; pass the "
                f"convert option (--convert) to certify a converted copy")
        notes.append(f"converted from {image.mode} to {mode}")
    expected = (image_size, image_size)
    if image.size != expected:
        if not resize:
            raise InputMismatchError(
                f"image {source!r} is {image.size[0]}×{image.size[1]} but the model takes {_size(image_size)} "
                f"images; pass the resize option (--resize) to certify a resized copy")
        notes.append(f"resized from {image.size[0]}×{image.size[1]} to {_size(image_size)}")
    if image.mode != mode:
        image = image.convert(mode)
    if image.size != expected:
        image = image.resize(expected, Image.BILINEAR)
    if not notes:
        return image, None
    return image, "; ".join(notes) + ": the certificate is about this processed image, not the original"


# --- data sets -------------------------------------------------------------------------------------------
def load_dataset_spec(spec: str, split: str, *, image_size: int | None = None, test_size: float = 0.2,
                      seed: int = 0):
    """``parquet:/dir:split`` | a local data set folder | ``sklearn/digits`` | a Hub data set name →
    ``(dataset, description)``. ``sklearn/digits`` is carved as the recipes carve it (``test_size``, ``seed``;
    resized to ``image_size``)."""
    import datasets

    from .data import SKLEARN_DIGITS, load_sklearn_digits_split

    try:
        if spec == SKLEARN_DIGITS:
            dataset = load_sklearn_digits_split(split, image_size or 8, test_size=test_size, seed=seed)
            return dataset, f"{spec}:{split}"
        if spec.startswith("parquet:"):
            path, _, spec_split = spec[len("parquet:"):].rpartition(":")
            if not path:  # no split given: "parquet:/dir"
                path, spec_split = spec_split, split
            if not os.path.isdir(path):
                raise InputError(f"parquet folder {path!r} does not exist")
            return datasets.load_dataset("parquet", data_dir=path, split=spec_split), f"{path}:{spec_split}"
        return datasets.load_dataset(spec, split=split), f"{spec}:{split}"
    except InputError:
        raise
    except Exception as error:  # datasets raises many types (ValueError, FileNotFoundError, ConnectionError …)
        raise InputError(f"cannot load data set {spec!r} (split {split!r}): {_first_line(error)}") from error


def dataset_id(spec: str, description: str) -> str:
    """The name for the model-index: the Hub name, also for local copies of the data sets hf-gloro knows."""
    from .data import KNOWN_DATASETS

    if not spec.startswith("parquet:") and not os.path.isdir(spec):
        return spec
    folder = spec[len("parquet:"):].rpartition(":")[0] if spec.startswith("parquet:") and spec.count(":") > 1 \
        else spec.removeprefix("parquet:")
    known = {local: hub for hub, local in KNOWN_DATASETS.items()}
    return known.get(os.path.basename(os.path.normpath(folder)), description)


def dataset_items(dataset, description: str, limit: int | None, num_channels: int = 1,
                  image_size: int | None = None) -> Iterator[Item]:
    """One :class:`Item` per row (``Image`` column, or the decoded ``pixels`` layout of the recipes)."""
    import numpy as np
    from PIL import Image

    from .data import PIXELS_COLUMN, image_column, label_column

    try:
        labels = label_column(dataset)
    except ValueError:
        labels = None
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if PIXELS_COLUMN in dataset.column_names:
        if image_size is None:
            raise InputError(f"{description}: decoded pixels need the image size")
        shape = (num_channels, image_size, image_size)

        def decode(raw: bytes):
            array = np.frombuffer(raw, dtype=np.uint8).reshape(shape).transpose(1, 2, 0)
            return Image.fromarray(array[:, :, 0] if num_channels == 1 else array)

        for index in range(count):
            row = dataset[index]
            yield Item(description, index, (lambda raw=row[PIXELS_COLUMN]: decode(raw)),
                       None if labels is None else int(row[labels]))
        return
    try:
        images = image_column(dataset)
    except ValueError as error:
        raise InputError(f"{description}: {_first_line(error)}") from error
    for index in range(count):
        row = dataset[index]
        yield Item(description, index, (lambda image=row[images]: image),
                   None if labels is None else int(row[labels]))


def collect_inputs(inputs: Sequence[str], split: str = "test", limit: int | None = None, *, num_channels: int = 1,
                   image_size: int | None = None) -> list[Item]:
    """Every image named by ``inputs`` (files, folders, data sets), in order; nothing is opened yet."""
    items: list[Item] = []
    for spec in inputs:
        path = Path(spec).expanduser()
        if spec.startswith("parquet:") or spec == "sklearn/digits":
            dataset, description = load_dataset_spec(spec, split, image_size=image_size)
            items.extend(dataset_items(dataset, description, limit, num_channels, image_size))
        elif path.is_file():
            items.append(Item(str(path), None, lambda p=path: open_image(p)))
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if files:
                items.extend(Item(str(p), None, lambda p=p: open_image(p)) for p in files)
            elif any(path.rglob("*.parquet")):
                dataset, description = load_dataset_spec(str(path), split)
                items.extend(dataset_items(dataset, description, limit, num_channels, image_size))
            else:
                raise InputError(f"folder {spec!r} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif is_local_reference(spec) or path.suffix.lower() in IMAGE_SUFFIXES:
            raise InputError(f"no such file or folder: {spec!r}")
        else:
            dataset, description = load_dataset_spec(spec, split)
            items.extend(dataset_items(dataset, description, limit, num_channels, image_size))
    if not items:
        raise InputError("no images to certify")
    return items
