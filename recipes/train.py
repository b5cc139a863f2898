#!/usr/bin/env python
"""Certified (GloRo) training recipe: ``python recipes/train.py recipes/configs/<config>.yaml [--key value ...]``.

Runs under ``accelerate launch`` / ``torchrun`` as well (one process per rank). The YAML file holds the
fields of :class:`ModelArguments`, :class:`DataArguments` and :class:`hf_gloro.GloRoTrainingArguments`; any
of them can be overridden on the command line after the file (``--num_train_epochs 5``).

Data: ``datasets.load_dataset(<Hub name>)``, or the same layout from ``--dataset_dir`` (e.g.
``/work/shared/data``), or ``sklearn/digits`` (bundled with scikit-learn: no network). Images are decoded once
to raw uint8 bytes (cached by ``datasets``), then batches are built with ``with_transform`` (augmentation in
torch). A stratified validation split is carved from the training split for model selection; the test split
is only evaluated at the end.

Output: ``output_dir`` holds the final model (loadable with ``AutoModelForImageClassification.from_pretrained``
after ``import hf_gloro``; its config records the certifying ε and the guaranteed Lipschitz bound),
``test_results.json`` / ``all_results.json`` and the checkpoints.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from transformers import HfArgumentParser, set_seed

import hf_gloro
from hf_gloro.data import (
    PixelsTransform,
    add_index_column,
    decode_images,
    label_column,
    load_image_dataset,
    load_sklearn_digits,
    train_validation_split,
)
from hf_gloro.trainer import CertifiedMetricsCSVCallback, GloRoTrainer, GloRoTrainingArguments

logger = logging.getLogger("hf_gloro.recipes.train")

SKLEARN_DIGITS = "sklearn/digits"


@dataclass
class ModelArguments:
    backbone: str = field(default="gloro_2c2f", metadata={"help": "timm name of a Lipschitz backbone"})
    backbone_kwargs: str | None = field(default=None, metadata={"help": "JSON dict for timm.create_model"})
    epsilon: float = field(default=0.3, metadata={"help": "certifying L2 radius (pixels in [0, 1])"})
    head_normalization: str = field(default="none", metadata={"help": "none | lln"})
    power_iterations: int = field(default=10, metadata={"help": "power-iteration steps per training step"})
    image_mean: list[float] | None = field(default=None, metadata={"help": "per-channel mean (inside the model)"})
    image_std: list[float] | None = field(default=None, metadata={"help": "per-channel std (inside the model)"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "start from a saved GloRo model"})


@dataclass
class DataArguments:
    dataset_name: str = field(default="ylecun/mnist", metadata={"help": "Hub name, or sklearn/digits"})
    dataset_dir: str | None = field(default=None, metadata={"help": "local copy in the Hub layout"})
    train_split: str = "train"
    test_split: str | None = field(default="test", metadata={"help": "held-out split (None: carve test_size)"})
    test_size: float = field(default=0.2, metadata={"help": "fraction carved as test when there is no test split"})
    validation_size: float = field(default=5000, metadata={"help": "validation examples (or fraction) carved from train"})
    num_channels: int = 1
    image_size: int = 28
    crop_padding: int = field(default=0, metadata={"help": "random-crop padding (0: off)"})
    horizontal_flip: bool = False
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_test_samples: int | None = None
    decode_num_proc: int | None = None
    torch_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (per process)"})


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, GloRoTrainingArguments]:
    """``<config.yaml> [--key value ...]``: YAML values become defaults, the command line overrides them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, GloRoTrainingArguments))
    if argv and argv[0].endswith((".yaml", ".yml")):
        with open(argv.pop(0)) as handle:
            values: dict[str, Any] = yaml.safe_load(handle) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown keys in the config file: {unknown}")
        if isinstance(values.get("backbone_kwargs"), dict):
            values["backbone_kwargs"] = json.dumps(values["backbone_kwargs"])
        parser.set_defaults(**values)
        for action in parser._actions:  # values given in the file satisfy required arguments
            if action.dest in values:
                action.required = False
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, training_args


def _limit(dataset, count: int | None):
    return dataset if count is None or count >= len(dataset) else dataset.select(range(count))


def build_datasets(data_args: DataArguments, seed: int, main_process_first=None):
    """``(train, validation, test, label_names)`` with the fast uint8 layout and ``with_transform`` applied."""
    if data_args.dataset_name == SKLEARN_DIGITS:
        full = load_sklearn_digits(data_args.image_size)
        parts = full.train_test_split(test_size=data_args.test_size, seed=seed, stratify_by_column="label")
        train, test = parts["train"], parts["test"]
    else:
        def load(split):
            dataset = load_image_dataset(data_args.dataset_name, split, data_args.dataset_dir)
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
    augment = PixelsTransform(data_args.num_channels, data_args.image_size, data_args.crop_padding,
                              data_args.horizontal_flip, seed=seed)
    if augment.augments:
        train = add_index_column(train)  # keys the seeded augmentation (exact resumption)
    plain = PixelsTransform(data_args.num_channels, data_args.image_size)
    return train.with_transform(augment), validation.with_transform(plain), test.with_transform(plain), label_names


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
        num_channels=data_args.num_channels,
        image_size=data_args.image_size,
        epsilon=float(model_args.epsilon),
        head_normalization=model_args.head_normalization,
        power_iterations=model_args.power_iterations,
        image_mean=model_args.image_mean,
        image_std=model_args.image_std,
        id2label={i: name for i, name in enumerate(label_names)},
        label2id={name: i for i, name in enumerate(label_names)},
    )
    return hf_gloro.GloRoForImageClassification(config)


def main(argv: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model_args, data_args, training_args = parse_arguments(argv)
    if data_args.torch_threads:
        torch.set_num_threads(data_args.torch_threads)
    set_seed(training_args.seed)
    started = time.time()
    train, validation, test, label_names = build_datasets(data_args, training_args.seed,
                                                          training_args.main_process_first)
    set_seed(training_args.seed)  # identical initial weights on every rank, independent of the data code
    model = build_model(model_args, data_args, label_names)
    trainer = GloRoTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=validation,
                           callbacks=[CertifiedMetricsCSVCallback()])
    logger.info("train %d / validation %d / test %d examples; %d torch threads; world size %d",
                len(train), len(validation), len(test), torch.get_num_threads(), training_args.world_size)

    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    validation_metrics = trainer.evaluate(validation, metric_key_prefix="eval")
    test_metrics = trainer.evaluate(test, metric_key_prefix="test")
    wall = time.time() - started
    summary = {
        **{f"train_{k}" if not k.startswith("train") else k: v for k, v in train_result.metrics.items()},
        **validation_metrics, **test_metrics,
        "wall_time_s": wall, "epochs": trainer.state.epoch, "global_step": trainer.state.global_step,
        "certifying_epsilon": float(trainer.model.config.epsilon),
    }
    if trainer.is_world_process_zero():
        trainer.save_metrics("test", test_metrics)
        trainer.save_metrics("all", summary)
        print(
            f"\n[hf-gloro] test: clean accuracy {test_metrics['test_clean_accuracy']:.4f}  "
            f"VRA@{trainer.model.config.epsilon:g} {test_metrics['test_vra']:.4f}  "
            f"rejection {test_metrics['test_rejection_rate']:.4f}  "
            f"Lipschitz bound {test_metrics['test_lipschitz_constant']:.4g}  "
            f"({trainer.state.epoch:.1f} epochs, {wall:.0f} s) → model saved to {training_args.output_dir}",
            flush=True,
        )
    return summary


if __name__ == "__main__":
    main()
