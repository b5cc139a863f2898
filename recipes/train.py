#!/usr/bin/env python
"""Certified (GloRo) training recipe.

usage: train.py CONFIG.yaml [--KEY VALUE ...] [--debug]

CONFIG.yaml holds the fields of ModelArguments, DataArguments and hf_gloro.GloRoTrainingArguments (a
transformers TrainingArguments); any of them can be overridden on the command line after the file
(``--num_train_epochs 5``). ``--help`` lists the recipe's own options, ``--help-all`` every TrainingArguments
option too. Errors are one line unless ``--debug`` is given.

Several processes (CPU: gloo; one per GPU: NCCL) — each rank loads the data and trains one shard per step:

    torchrun --nproc_per_node 2 recipes/train.py recipes/configs/offline_default.yaml
    accelerate launch --multi_gpu --num_processes 2 recipes/train.py recipes/configs/offline_default.yaml

(``accelerate launch --cpu --num_processes 2`` starts ONE process: ``--cpu`` selects accelerate's simple
launcher, which only forks through ``mpirun --mpirun_hostfile``. ``--multi_gpu`` selects torch.distributed.run,
and without CUDA the ranks train on the CPU.)

Data: ``datasets.load_dataset(<Hub name>)``, the same layout from ``--dataset_dir`` (e.g. ``/work/shared/data``),
or ``sklearn/digits`` (bundled with scikit-learn: no network). Images are decoded once to raw uint8 bytes
(cached by ``datasets``), then batches are built with ``with_transform`` (augmentation in torch). A stratified
validation split is carved from the training split for model selection; the test split is evaluated once, at
the end.

The output folder is a finished, shareable model: ``model.safetensors`` + ``config.json`` (certifying ε and the
guaranteed Lipschitz bound) + ``preprocessor_config.json`` (so ``pipeline("image-classification", folder)``,
``pipeline("certified-image-classification", folder)``, the ``hf-gloro`` CLI and ``from_pretrained`` all work),
``README.md`` (model card with model-index) + ``certified_accuracy.png``, ``training_recipe.json`` (the
arguments of this run), ``train_results.json`` / ``eval_results.json`` / ``test_results.json`` /
``all_results.json``, ``trainer_state.json`` and ``eval_metrics.csv`` (the validation curve).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments, set_seed

import hf_gloro
import numpy as np

from hf_gloro.data import (
    PIXELS_COLUMN,
    SKLEARN_DIGITS,
    MixedTrainingSet,
    PixelsTransform,
    StreamingPixelsCollator,
    add_index_column,
    check_same_label_space,
    decode_images,
    image_column,
    label_column,
    load_image_dataset,
    load_sklearn_digits,
    train_validation_split,
)
from hf_gloro.evaluation import CertifiedEvaluation
from hf_gloro.model_card import TRAINING_RECORD_FILE, describe_training, write_model_card
from hf_gloro.trainer import CertifiedMetricsCSVCallback, GloRoTrainer, GloRoTrainingArguments

logger = logging.getLogger("hf_gloro.recipes.train")

#: TrainingArguments fields shown by ``--help`` next to the recipe's and GloRo's own (``--help-all``: all).
COMMON_TRAINING_FIELDS = (
    "output_dir", "num_train_epochs", "max_steps", "learning_rate", "per_device_train_batch_size",
    "per_device_eval_batch_size", "eval_strategy", "save_strategy", "logging_steps", "seed",
    "resume_from_checkpoint", "bf16", "disable_tqdm", "push_to_hub",
)


@dataclass
class ModelArguments:
    backbone: str = field(default="gloro_2c2f", metadata={"help": "timm name of a Lipschitz backbone"})
    backbone_kwargs: str | None = field(default=None, metadata={"help": "JSON dict for timm.create_model"})
    adaptation: str | None = field(default=None, metadata={
        "help": "JSON dict of adaptation options for a timm backbone that is not a native Lipschitz one (e.g. "
                "resnet18): activation, batchnorm, layernorm, stem, pool, init; see hf_gloro.GloRoConfig"})
    epsilon: float = field(default=0.3, metadata={"help": "certifying radius in `norm` (pixels in [0, 1])"})
    norm: str = field(default="l2", metadata={"help": "threat model: l2 | linf (ε, radii and the bound in that norm)"})
    head_normalization: str = field(default="none", metadata={"help": "none | lln"})
    power_iterations: int = field(default=10, metadata={"help": "power-iteration steps per training step"})
    image_mean: list[float] | None = field(default=None, metadata={"help": "per-channel mean (inside the model)"})
    image_std: list[float] | None = field(default=None, metadata={"help": "per-channel std (inside the model)"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "start from a saved GloRo model"})


@dataclass
class DataArguments:
    dataset_name: str = field(default="ylecun/mnist", metadata={"help": "Hub name, or sklearn/digits"})
    dataset_dir: str | None = field(default=None, metadata={"help": "local copy in the Hub layout"})
    train_split: str = field(default="train", metadata={"help": "split to train on (validation is carved from it)"})
    test_split: str | None = field(default="test", metadata={"help": "held-out split (None: carve test_size)"})
    test_size: float = field(default=0.2, metadata={"help": "fraction carved as test when there is no test split"})
    validation_size: float = field(default=5000, metadata={"help": "validation examples (or fraction) carved from train"})
    num_channels: int = field(default=1, metadata={"help": "1 (grayscale) or 3 (RGB)"})
    image_size: int = field(default=28, metadata={"help": "images are resized to image_size × image_size"})
    crop_padding: int = field(default=0, metadata={"help": "random-crop padding (0: off)"})
    horizontal_flip: bool = field(default=False, metadata={"help": "random horizontal flips"})
    augmentation: str | None = field(default=None, metadata={
        "help": "torchvision v2 policy per image after crop/flip: randaugment | trivialaugment | autoaugment | none"})
    augmentation_probability: float = field(default=1.0, metadata={
        "help": "probability of applying the policy to an image (LiResNet: RandomApply(RandAugment), 0.5)"})
    randaugment_num_ops: int = field(default=2, metadata={"help": "RandAugment: operations per image"})
    randaugment_magnitude: int = field(default=9, metadata={"help": "RandAugment: magnitude (0..30)"})
    autoaugment_policy: str = field(default="cifar10", metadata={"help": "AutoAugment policy: imagenet | cifar10 | svhn"})
    extra_train_dataset: str | None = field(default=None, metadata={
        "help": "extra training data mixed in (Hub name, or a local folder of parquet shards), same ClassLabel names"})
    extra_train_split: str = field(default="train", metadata={"help": "split of extra_train_dataset"})
    extra_train_ratio: float = field(default=1.0, metadata={
        "help": "extra examples per real example per epoch (generated-data recipes: 3.0), no repeats within an epoch"})
    streaming: bool = field(default=False, metadata={
        "help": "stream the data (datasets IterableDataset; each process reads its own shard); needs max_steps"})
    shuffle_buffer_size: int = field(default=10000, metadata={"help": "streaming: shuffle buffer (examples)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use at most this many training images"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "... validation images"})
    max_test_samples: int | None = field(default=None, metadata={"help": "... test images"})
    decode_num_proc: int | None = field(default=None, metadata={"help": "processes for the one-time decoding"})
    torch_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (per process)"})


class RecipeError(Exception):
    """A problem with the command line, the config file or the data: reported as one line."""


# --- command line ---------------------------------------------------------------------------------------
def _parser() -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, DataArguments, GloRoTrainingArguments),
                            usage="%(prog)s CONFIG.yaml [--KEY VALUE ...] [--debug]",
                            description="Certified (GloRo) training: YAML config, then overrides.")


def short_help(prog: str = "train.py") -> str:
    """The ``--help`` text: usage, the YAML argument, then the recipe's and GloRo's own options."""
    lines = [
        f"usage: {prog} CONFIG.yaml [--KEY VALUE ...] [--debug]",
        "",
        "Certified (GloRo) training. CONFIG.yaml (e.g. recipes/configs/offline_default.yaml) sets any of the",
        "options below and every transformers TrainingArguments field; --KEY VALUE after it overrides the file.",
        "",
        "positional arguments:",
        "  CONFIG.yaml           YAML file of options (keys = option names without the leading --)",
        "",
        "options:",
        "  -h, --help            this help; --help-all: every TrainingArguments option as well",
        "  --debug               show tracebacks instead of one-line errors",
    ]
    sections = [("model", ModelArguments, None), ("data", DataArguments, None),
                ("certified training (GloRoTrainingArguments)", GloRoTrainingArguments,
                 {f.name for f in dataclasses.fields(GloRoTrainingArguments)}
                 - {f.name for f in dataclasses.fields(TrainingArguments)}),
                ("common TrainingArguments", GloRoTrainingArguments, set(COMMON_TRAINING_FIELDS))]
    for title, cls, names in sections:
        lines += ["", f"{title}:"]
        for item in dataclasses.fields(cls):
            if names is not None and item.name not in names:
                continue
            default = item.default if item.default is not dataclasses.MISSING else (
                item.default_factory() if item.default_factory is not dataclasses.MISSING else None)
            text = item.metadata.get("help", "").split("\n")[0]
            text = text if len(text) <= 70 else text[:67] + "..."
            lines.append(f"  --{item.name:<28} {text} (default: {default!r})")
    return "\n".join(lines) + "\n"


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, GloRoTrainingArguments]:
    """``<config.yaml> [--key value ...]``: YAML values become defaults, the command line overrides them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if "--help-all" in argv:
        parser.print_help()
        raise SystemExit(0)
    if "-h" in argv or "--help" in argv:
        sys.stdout.write(short_help(os.path.basename(sys.argv[0]) or "train.py"))
        raise SystemExit(0)
    if argv and argv[0].endswith((".yaml", ".yml")):
        path = argv.pop(0)
        if not os.path.isfile(path):
            raise RecipeError(f"config file {path!r} does not exist")
        try:
            with open(path) as handle:
                values: dict[str, Any] = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise RecipeError(f"config file {path!r} is not valid YAML: {_first_line(error)}") from error
        if not isinstance(values, dict):
            raise RecipeError(f"config file {path!r} must hold a mapping of option names to values")
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RecipeError(f"unknown keys in the config file {path!r}: {unknown}")
        for key in ("backbone_kwargs", "adaptation", "timm_optimizer_kwargs"):  # YAML dicts; JSON on the command line
            if isinstance(values.get(key), dict):
                values[key] = json.dumps(values[key])
        parser.set_defaults(**values)
        for action in parser._actions:  # values given in the file satisfy required arguments
            if action.dest in values:
                action.required = False
    elif argv and not argv[0].startswith("-"):
        raise RecipeError(f"the first argument must be a YAML config file (*.yaml), got {argv[0]!r}")
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # TrainingArguments.__post_init__ checks
        raise RecipeError(_first_line(error)) from error
    return model_args, data_args, training_args


# --- data and model -------------------------------------------------------------------------------------
def _limit(dataset, count: int | None):
    return dataset if count is None or count >= len(dataset) else dataset.select(range(count))


def _augmentation(data_args: DataArguments, seed: int | None) -> PixelsTransform:
    try:
        return PixelsTransform(data_args.num_channels, data_args.image_size, data_args.crop_padding,
                               data_args.horizontal_flip, seed=seed, augmentation=data_args.augmentation,
                               augmentation_probability=data_args.augmentation_probability,
                               randaugment_num_ops=data_args.randaugment_num_ops,
                               randaugment_magnitude=data_args.randaugment_magnitude,
                               autoaugment_policy=data_args.autoaugment_policy)
    except ValueError as error:
        raise RecipeError(_first_line(error)) from error


def _load_extra(data_args: DataArguments, names: list[str], streaming: bool = False):
    """The extra training set (Hub name or local folder), checked against the label space ``names``."""
    name = data_args.extra_train_dataset
    try:
        extra = load_image_dataset(name, data_args.extra_train_split,
                                   None if os.path.isdir(name) else data_args.dataset_dir, streaming=streaming)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        raise RecipeError(f"cannot load split {data_args.extra_train_split!r} of extra_train_dataset {name!r}: "
                          f"{_first_line(error)}") from error
    try:
        check_same_label_space(names, extra, what=f"extra_train_dataset {name!r}")
    except ValueError as error:
        raise RecipeError(_first_line(error)) from error
    return extra


def _check_extra_label_range(extra, count: int, name: str) -> None:
    labels = np.asarray(extra["label"])
    if len(labels) and (labels.min() < 0 or labels.max() >= count):
        raise RecipeError(f"extra_train_dataset {name!r} has labels {labels.min()}..{labels.max()}, outside the "
                          f"{count} classes of the training set")


def build_datasets(data_args: DataArguments, seed: int, main_process_first=None):
    """``(train, validation, test, label_names)`` with the fast uint8 layout and ``with_transform`` applied."""
    if data_args.dataset_name == SKLEARN_DIGITS:
        full = load_sklearn_digits(data_args.image_size)
        parts = full.train_test_split(test_size=data_args.test_size, seed=seed, stratify_by_column="label")
        train, test = parts["train"], parts["test"]
    else:
        def load(split):
            try:
                dataset = load_image_dataset(data_args.dataset_name, split, data_args.dataset_dir)
            except (FileNotFoundError, ValueError, ConnectionError) as error:
                where = f" in {data_args.dataset_dir!r}" if data_args.dataset_dir else ""
                raise RecipeError(f"cannot load split {split!r} of {data_args.dataset_name!r}{where}: "
                                  f"{_first_line(error)}") from error
            return decode_images(dataset, data_args.num_channels, data_args.image_size, data_args.decode_num_proc)

        context = main_process_first(desc="decoding images") if main_process_first else _nullcontext()
        with context:
            train = load(data_args.train_split)
            if data_args.test_split:
                test = load(data_args.test_split)
            else:
                parts = train.train_test_split(test_size=data_args.test_size, seed=seed, stratify_by_column="label")
                train, test = parts["train"], parts["test"]
    label_names = list(train.features[label_column(train)].names)
    size = data_args.validation_size
    size = int(size) if size >= 1 else float(size)
    train, validation = train_validation_split(train, size, seed=seed)
    train = _limit(train, data_args.max_train_samples)
    validation = _limit(validation, data_args.max_eval_samples)
    test = _limit(test, data_args.max_test_samples)
    augment = _augmentation(data_args, seed)
    if augment.augments:
        train = add_index_column(train)  # keys the seeded augmentation (exact resumption)
    plain = PixelsTransform(data_args.num_channels, data_args.image_size)
    train = train.with_transform(augment)
    if data_args.extra_train_dataset:
        context = main_process_first(desc="decoding extra images") if main_process_first else _nullcontext()
        with context:
            extra = decode_images(_load_extra(data_args, label_names), data_args.num_channels, data_args.image_size,
                                  data_args.decode_num_proc)
        _check_extra_label_range(extra, len(label_names), data_args.extra_train_dataset)
        if augment.augments:
            extra = add_index_column(extra, offset=len(train))  # distinct augmentation keys
        try:
            train = MixedTrainingSet(train, extra.with_transform(augment), data_args.extra_train_ratio, seed=seed)
        except ValueError as error:
            raise RecipeError(_first_line(error)) from error
    return train, validation.with_transform(plain), test.with_transform(plain), label_names


def _materialize(stream, data_args: DataArguments, count: int | None, fingerprint: str):
    """The first ``count`` rows of a stream, decoded once into the uint8 layout (a disk-backed ``datasets.Dataset``
    cached under ``fingerprint``): validation and test sets of a streamed recipe."""
    import datasets

    images, labels = image_column(stream), label_column(stream)
    names = hf_gloro.data.label_names(stream)
    features = datasets.Features({PIXELS_COLUMN: datasets.Value("binary"),
                                  "label": datasets.ClassLabel(names=names) if names else datasets.Value("int64")})
    source = stream.take(count) if count is not None else stream
    channels, size = data_args.num_channels, data_args.image_size

    def rows():
        for row in source:
            yield {PIXELS_COLUMN: hf_gloro.data._to_uint8_chw(row[images], channels, size).tobytes(),
                   "label": row[labels]}

    return datasets.Dataset.from_generator(rows, features=features, fingerprint=fingerprint)


def build_streaming_datasets(data_args: DataArguments, seed: int, process_index: int, world_size: int,
                             main_process_first=None):
    """``(train, validation, test, label_names, collator)`` for ``streaming: true``.

    Train: the split streamed (``datasets.IterableDataset``) after its first ``validation_size`` rows, mixed with
    the streamed extra data (``interleave_datasets`` at ``1 : extra_train_ratio``), shuffled in a buffer and split
    between the processes (``split_dataset_by_node``: disjoint shards). Decoding and augmentation happen per batch
    in the collator. Validation (the first ``validation_size`` rows, in file order: no stratified carve is possible
    without reading the split) and test (the first ``max_test_samples`` rows) are decoded once to disk.
    """
    import hashlib

    import datasets
    from datasets.distributed import split_dataset_by_node

    if data_args.dataset_name == SKLEARN_DIGITS:
        raise RecipeError("streaming reads Hub or parquet datasets; sklearn/digits is in memory already")
    if not data_args.test_split:
        raise RecipeError("streaming needs a test_split (a test carve would need the whole split)")
    size = data_args.validation_size
    if size < 1 or size != int(size):
        raise RecipeError(f"streaming needs validation_size as a number of examples (>= 1), got {size}")
    size = int(data_args.max_eval_samples if data_args.max_eval_samples is not None else size)

    def load(split):
        try:
            return load_image_dataset(data_args.dataset_name, split, data_args.dataset_dir, streaming=True)
        except (FileNotFoundError, ValueError, ConnectionError) as error:
            where = f" in {data_args.dataset_dir!r}" if data_args.dataset_dir else ""
            raise RecipeError(f"cannot stream split {split!r} of {data_args.dataset_name!r}{where}: "
                              f"{_first_line(error)}") from error

    def key(*parts) -> str:
        text = "|".join(map(str, (data_args.dataset_name, data_args.dataset_dir and os.path.abspath(
            data_args.dataset_dir), data_args.num_channels, data_args.image_size, hf_gloro.__version__, *parts)))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    stream = load(data_args.train_split)
    names = hf_gloro.data.label_names(stream)
    if names is None:
        raise RecipeError(f"{data_args.dataset_name!r} has no ClassLabel column; streaming needs the class names")
    context = main_process_first(desc="decoding validation/test") if main_process_first else _nullcontext()
    with context:
        validation = _materialize(stream, data_args, size, key("validation", data_args.train_split, size))
        test = _materialize(load(data_args.test_split), data_args, data_args.max_test_samples,
                            key("test", data_args.test_split, data_args.max_test_samples))

    def standard(part):  # common column names, so that streams can be interleaved
        part = part.select_columns([image_column(part), label_column(part)])
        renames = {old: new for old, new in zip((image_column(part), label_column(part)), ("image", "label"))
                   if old != new}
        return part.rename_columns(renames) if renames else part

    train = standard(stream).skip(size)
    if data_args.max_train_samples is not None:
        train = train.take(data_args.max_train_samples)
    if data_args.extra_train_dataset:
        extra = standard(_load_extra(data_args, names, streaming=True)).cast(train.features)
        if not data_args.extra_train_ratio > 0:
            raise RecipeError(f"extra_train_ratio must be > 0, got {data_args.extra_train_ratio}")
        share = data_args.extra_train_ratio / (1.0 + data_args.extra_train_ratio)
        train = datasets.interleave_datasets([train, extra], probabilities=[1.0 - share, share], seed=seed,
                                             stopping_strategy="all_exhausted")
    train = train.shuffle(seed=seed, buffer_size=data_args.shuffle_buffer_size)
    if world_size > 1:
        train = split_dataset_by_node(train, rank=process_index, world_size=world_size)
    collator = StreamingPixelsCollator(_augmentation(data_args, None), "image", "label", num_classes=len(names))
    plain = PixelsTransform(data_args.num_channels, data_args.image_size)
    return train, validation.with_transform(plain), test.with_transform(plain), names, collator


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def build_model(model_args: ModelArguments, data_args: DataArguments, label_names: list[str]):
    if model_args.model_name_or_path:
        return hf_gloro.GloRoForImageClassification.from_pretrained(model_args.model_name_or_path)
    config = hf_gloro.GloRoConfig(
        backbone=model_args.backbone,
        backbone_kwargs=json.loads(model_args.backbone_kwargs) if model_args.backbone_kwargs else None,
        **({"adaptation": json.loads(model_args.adaptation)} if model_args.adaptation else {}),
        num_channels=data_args.num_channels,
        image_size=data_args.image_size,
        epsilon=float(model_args.epsilon),
        norm=model_args.norm,
        head_normalization=model_args.head_normalization,
        power_iterations=model_args.power_iterations,
        image_mean=model_args.image_mean,
        image_std=model_args.image_std,
        id2label={i: name for i, name in enumerate(label_names)},
        label2id={name: i for i, name in enumerate(label_names)},
    )
    return hf_gloro.GloRoForImageClassification(config)


# --- the finished folder --------------------------------------------------------------------------------
def training_record(model_args, data_args, training_args, argv: list[str], config_file: str | None) -> dict:
    """What ``training_recipe.json`` records: the command, the config file and every argument of the run."""
    training = {key: value for key, value in training_args.to_dict().items()
                if not key.startswith(("hub_", "push_to_hub")) and "token" not in key}
    return {"recipe": "recipes/train.py", "config_file": config_file, "command_line": argv,
            "hf_gloro_version": hf_gloro.__version__, "model_args": dataclasses.asdict(model_args),
            "data_args": dataclasses.asdict(data_args), "training_args": training}


def test_evaluation(prediction, data_args: DataArguments, model, bound: float, extra_radii) -> CertifiedEvaluation:
    """The test split's per-example certificates (from ``trainer.predict``) as the card's evaluation."""
    summary = prediction.predictions
    if data_args.dataset_name == SKLEARN_DIGITS:
        name = f"scikit-learn digits {data_args.image_size}×{data_args.image_size}"  # test: the recipe's carve
        split = "test"
    else:
        name = data_args.dataset_name
        split = data_args.test_split or "test"
    epsilon = float(model.config.epsilon)
    return CertifiedEvaluation(
        predictions=summary[:, 0].astype("int64"), labels=prediction.label_ids, radius=summary[:, 1],
        epsilon=epsilon, lipschitz_constant=bound, dataset_id=data_args.dataset_name, dataset_split=split,
        radii=sorted({epsilon / 2, epsilon, 2 * epsilon, *map(float, extra_radii)}), dataset_name=name,
        norm=model.config.norm,
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = list(sys.argv[1:] if argv is None else argv)
    config_file = argv[0] if argv and argv[0].endswith((".yaml", ".yml")) else None
    model_args, data_args, training_args = parse_arguments(argv)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    if data_args.torch_threads:
        torch.set_num_threads(data_args.torch_threads)
    set_seed(training_args.seed)
    started = time.time()
    collator = None
    if data_args.streaming:
        if training_args.max_steps is None or training_args.max_steps <= 0:
            raise RecipeError("streaming needs max_steps (a stream has no length to count epochs in)")
        train, validation, test, label_names, collator = build_streaming_datasets(
            data_args, training_args.seed, training_args.process_index, training_args.world_size,
            training_args.main_process_first)
    else:
        train, validation, test, label_names = build_datasets(data_args, training_args.seed,
                                                              training_args.main_process_first)
    set_seed(training_args.seed)  # identical initial weights on every rank, independent of the data code
    model = build_model(model_args, data_args, label_names)
    trainer = GloRoTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=validation,
                           data_collator=collator, callbacks=[CertifiedMetricsCSVCallback()])
    logger.info("%s: train %s / validation %d / test %d images; %s, ε = %g; %d torch threads × world size %d",
                data_args.dataset_name, "streamed" if data_args.streaming else len(train), len(validation),
                len(test), model.config.backbone, model.config.epsilon, torch.get_num_threads(),
                training_args.world_size)

    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()  # weights, config (ε, guaranteed bound), preprocessor_config.json
    validation_metrics = trainer.evaluate(validation, metric_key_prefix="eval")
    prediction = trainer.predict(test, metric_key_prefix="test")
    test_metrics = prediction.metrics
    wall = time.time() - started
    train_metrics = dict(train_result.metrics)
    summary = {**train_metrics, **validation_metrics, **test_metrics, "wall_time_s": wall,
               "epochs": trainer.state.epoch, "global_step": trainer.state.global_step,
               "certifying_epsilon": float(model.config.epsilon)}
    if trainer.is_world_process_zero():
        output = training_args.output_dir
        trainer.save_metrics("train", train_metrics)
        trainer.save_metrics("eval", validation_metrics)
        trainer.save_metrics("test", test_metrics)
        trainer.save_metrics("all", summary, combined=False)
        trainer.save_state()
        record = training_record(model_args, data_args, training_args, argv, config_file)
        with open(os.path.join(output, TRAINING_RECORD_FILE), "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2, default=str)
            handle.write("\n")
        evaluation = test_evaluation(prediction, data_args, model, test_metrics["test_lipschitz_constant"],
                                     training_args.extra_eval_radii)
        write_model_card(model, output, evaluation, repo_id=training_args.hub_model_id or output,
                         training=describe_training(record, summary))
        _print_summary(summary, model, trainer, output)
    trainer.end_training()
    return summary


def _print_summary(summary: dict, model, trainer, output: str) -> None:
    best = trainer.state.best_model_checkpoint
    print(
        f"[hf-gloro] test: clean accuracy {summary['test_clean_accuracy']:.4f}  "
        f"VRA@{model.config.epsilon:g} ({model.config.norm}) {summary['test_vra']:.4f}  rejection {summary['test_rejection_rate']:.4f}  "
        f"Lipschitz bound {summary['test_lipschitz_constant']:.4g}\n"
        f"[hf-gloro] validation VRA {summary['eval_vra']:.4f}"
        f"{f' (best checkpoint: {os.path.basename(best)})' if best else ''}; "
        f"{summary['epochs']:.1f} epochs, {summary['global_step']} steps, {summary['wall_time_s']:.0f} s\n"
        f"[hf-gloro] model, image processor, card and plot saved to {output}",
        flush=True,
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def cli(argv: list[str] | None = None) -> int:
    """``main`` with one-line errors (``--debug``: tracebacks)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    prog = os.path.basename(sys.argv[0]) or "train.py"
    try:
        main(argv)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # one line, unless --debug
        if debug:
            raise
        kind = "" if isinstance(error, RecipeError) else f"{type(error).__name__}: "
        hint = "" if isinstance(error, RecipeError) else " (rerun with --debug for the traceback)"
        print(f"{prog}: error: {kind}{_first_line(error)}{hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
