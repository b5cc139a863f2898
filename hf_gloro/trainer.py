"""Certified training with the ``transformers`` ``Trainer``: :class:`GloRoTrainingArguments` and :class:`GloRoTrainer`.

What the trainer adds to a plain ``Trainer``:

* **Loss** (``gloro_loss``: ``gloro_ce`` | ``trades`` | ``emma`` | ``margin``; see :mod:`hf_gloro.losses`) at a
  training radius ``ε_train(step) = train_epsilon_multiplier · ε · f(step/max_steps)`` interpolated per optimizer
  step (:mod:`hf_gloro.schedules`); the TRADES λ can follow its own schedule. The *certifying* ε stays in
  ``model.config.epsilon`` and is what checkpoints record.
* **Power iterations** run inside every training forward (``config.power_iterations`` warm-started steps). Before
  every evaluation, every save and at the end of training the iterates are converged
  (``model.converge_power_iterates``), made identical on all ranks (rank 0's copy is broadcast), and the
  guaranteed bound is computed; certificates and metrics only ever use the guaranteed bound.
* **Metrics** (validation or any split passed to ``evaluate``): ``clean_accuracy``, ``vra`` at the certifying
  ε, ``vra@r`` for ``extra_eval_radii``, ``rejection_rate``, ``median_certified_radius``,
  ``lipschitz_constant`` (guaranteed), ``lipschitz_estimate`` (converged power iteration) — logged like any
  ``Trainer`` metric (``eval_vra`` …), so ``metric_for_best_model="vra"`` selects checkpoints on validation VRA.
* **Optimisers from timm** (``timm_optimizer``, e.g. ``lookahead_nadam`` as in LiResNet, ``nadamw``, ``lamb``):
  built by ``timm.optim.create_optimizer_v2`` on the same weight-decay parameter groups as transformers' own
  optimisers; ``optim`` is used when it is unset. timm's ``Lookahead`` shares its inner optimiser's
  ``param_groups`` (so every LR scheduler drives it) and keeps its slow weights and step counter in the inner
  optimiser's state dict (so checkpoints resume it exactly).
* **LR schedule** ``lr_decay_after_half_to`` (the GloRo recipe's "decay_to_X_after_half") in addition to every
  ``transformers`` schedule.
* **Complete folders**: the image processor (:func:`hf_gloro.image_processing.image_processor_for_config`) is the
  default ``processing_class``, so the output folder and every checkpoint hold ``preprocessor_config.json`` and
  work with ``pipeline(...)``.
* **Console**: transformers' progress bar, training logs as floats, evaluation metrics in the bar instead of
  one dict per evaluation (:class:`CertifiedProgressCallback`), no "Writing model shards" bar per checkpoint.
* **Mixed precision**: certificates are never computed under autocast; with ``bf16``/``fp16`` the evaluation
  certifies outside the autocast region, so the reported VRA is the full-precision one.
* **Multi-process**: the process group is destroyed when the interpreter exits (or at
  :meth:`GloRoTrainer.end_training`), so that gloo's threads are gone before Python tears down.

Resuming (``trainer.train(resume_from_checkpoint=...)``) restores weights *and* power iterates (persistent
buffers), optimizer, LR scheduler, RNG and data order; the ε/λ schedules are pure functions of the global step,
so a resumed run ends with the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import EvalPrediction
from transformers.utils import logging as hf_logging

from .cpu_allocator import retain_freed_memory
from .evaluation import certify_exactly, compute_certified_metrics
from .image_processing import image_processor_for_config
from .losses import NEEDS_MARGIN_CONSTANTS, gloro_loss, resolve_loss_name
from .schedules import SCHEDULES, Schedule, decay_after_half, training_epsilon

__all__ = [
    "CertifiedMetricsCSVCallback",
    "CertifiedProgressCallback",
    "EpochSeededAugmentationCallback",
    "GloRoTrainer",
    "GloRoTrainingArguments",
    "LookaheadSyncCallback",
    "collate_pixels",
    "destroy_process_group",
    "sync_power_iterates",
]


@dataclass
class GloRoTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus certified-training options (defaults follow the GloRo/LiResNet recipes).

    Defaults that differ from ``TrainingArguments``: ``remove_unused_columns=False`` (``with_transform``
    pipelines), ``ddp_find_unused_parameters=False``, ``label_names=["labels"]``, ``max_grad_norm=0``
    (no clipping, as GloRo; LiResNet uses 3), ``metric_for_best_model="vra"``.
    """

    gloro_loss: str = field(default="gloro_ce", metadata={"help": "gloro_ce | trades | emma | margin"})
    trades_lambda: float = field(default=1.0, metadata={"help": "final λ of the TRADES KL term"})
    trades_lambda_schedule: str = field(default="fixed", metadata={"help": f"λ schedule: {sorted(SCHEDULES)}"})
    trades_lambda_start_fraction: float = field(default=0.0, metadata={"help": "λ(0) / λ for ramped schedules"})
    epsilon_schedule: str = field(default="fixed", metadata={"help": f"training-ε schedule: {sorted(SCHEDULES)}"})
    epsilon_start_fraction: float = field(default=0.01, metadata={"help": "ε_train(0) / ε_train for ramps"})
    epsilon_ramp_fraction: float | None = field(
        default=None, metadata={"help": "ramp length as a fraction of training (default: 1 or 1/2 from the name)"}
    )
    train_epsilon_multiplier: float = field(default=1.0, metadata={"help": "train at multiplier·ε, certify at ε"})
    extra_eval_radii: list[float] = field(default_factory=list, metadata={"help": "extra radii for vra@r"})
    converge_tolerance: float = field(default=1e-6, metadata={"help": "relative tolerance of the convergence"})
    converge_max_iterations: int = field(default=2000, metadata={"help": "power iterations cap per convergence"})
    lr_decay_after_half_to: float | None = field(
        default=None, metadata={"help": "GloRo LR schedule: constant for half, then exponential decay to this LR"}
    )
    timm_optimizer: str | None = field(
        default=None, metadata={"help": "timm optimizer (timm.optim.create_optimizer_v2 name, e.g. lookahead_nadam, "
                                        "nadamw, lamb); replaces `optim` when set"}
    )
    timm_optimizer_kwargs: str | None = field(
        default=None, metadata={"help": "JSON dict of extra create_optimizer_v2 arguments (e.g. betas, eps; "
                                        "lookahead_alpha, lookahead_k for Lookahead)"}
    )
    retain_cpu_memory: bool = field(
        default=True, metadata={"help": "on the CPU, keep freed memory in the process (glibc mallopt): no page "
                                        "faults for re-allocated activations every step; resident memory stays "
                                        "at its peak"}
    )

    remove_unused_columns: bool = False
    ddp_find_unused_parameters: bool | None = False
    label_names: list[str] | None = field(default_factory=lambda: ["labels"])
    max_grad_norm: float = 0.0
    metric_for_best_model: str | None = "vra"

    def __post_init__(self):
        self.gloro_loss = resolve_loss_name(self.gloro_loss)
        self.epsilon_schedule_spec  # validates
        self.trades_lambda_schedule_spec
        if self.train_epsilon_multiplier <= 0:
            raise ValueError(f"train_epsilon_multiplier must be > 0, got {self.train_epsilon_multiplier}")
        if self.trades_lambda < 0:
            raise ValueError(f"trades_lambda must be >= 0, got {self.trades_lambda}")
        if any(not (r > 0 and math.isfinite(r)) for r in self.extra_eval_radii):
            raise ValueError(f"extra_eval_radii must be finite and > 0, got {self.extra_eval_radii}")
        if self.metric_for_best_model is not None and self.greater_is_better is None:
            self.greater_is_better = not self.metric_for_best_model.endswith(("loss", "rejection_rate"))
        if not torch.cuda.is_available():
            self.use_cpu = True  # also what makes multi-process CPU launches pick gloo
        self.timm_optimizer_options  # validates
        if self.timm_optimizer:
            from timm.optim import list_optimizers

            name = self.timm_optimizer.lower()
            base = name[len("lookahead_"):] if name.startswith("lookahead_") else name
            if base not in list_optimizers():
                raise ValueError(f"unknown timm_optimizer {self.timm_optimizer!r} (timm.optim.list_optimizers() has "
                                 f"e.g. nadam, nadamw, lamb, adamw; prefix lookahead_ for Lookahead)")
        super().__post_init__()

    @property
    def timm_optimizer_options(self) -> dict:
        """``timm_optimizer_kwargs`` as a dict (a JSON string on the command line, a dict from Python)."""
        value = self.timm_optimizer_kwargs
        if value is None or value == "":
            return {}
        if isinstance(value, dict):
            return dict(value)
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"timm_optimizer_kwargs must be a JSON dict, got {value!r}") from error
        if not isinstance(parsed, dict):
            raise ValueError(f"timm_optimizer_kwargs must be a JSON dict, got {value!r}")
        return parsed

    @property
    def epsilon_schedule_spec(self) -> Schedule:
        return Schedule(self.epsilon_schedule, self.epsilon_start_fraction, self.epsilon_ramp_fraction)

    @property
    def trades_lambda_schedule_spec(self) -> Schedule:
        return Schedule(self.trades_lambda_schedule, self.trades_lambda_start_fraction)


def collate_pixels(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack ``pixel_values`` and the labels of examples (``labels`` or ``label``, as in the transformers
    image-classification tutorial) into a batch with ``pixel_values`` and ``labels``."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    key = "labels" if "labels" in examples[0] else "label" if "label" in examples[0] else None
    if key is None:
        raise KeyError(f"examples need a 'labels' or 'label' entry, got keys {sorted(examples[0])}")
    return {
        "pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples]),
        "labels": torch.as_tensor([int(e[key]) for e in examples], dtype=torch.long),
    }


def _power_iterate_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    return [buffer for name, buffer in model.named_buffers() if name.endswith("power_iterate")]


@torch.no_grad()
def sync_power_iterates(model: torch.nn.Module) -> None:
    """Broadcast rank 0's power iterates to every rank (no-op without an initialised process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    for buffer in _power_iterate_buffers(model):
        torch.distributed.broadcast(buffer, src=0)


def _is_node_split_stream(dataset) -> bool:
    """A ``datasets.IterableDataset`` returned by ``split_dataset_by_node`` (it records its rank/world size)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover
        return False
    return isinstance(dataset, datasets.IterableDataset) and getattr(dataset, "_distributed", None) is not None


def destroy_process_group() -> None:
    """Destroy the default process group if one is initialised (idempotent).

    A gloo process group that is still alive when the interpreter shuts down is destroyed during C++ static
    destruction, while its worker threads may still be joinable: ``std::terminate`` ("terminate called
    without an active exception", SIGABRT). Destroying it first joins those threads.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with contextlib.suppress(Exception):  # a peer that already exited must not turn exit into an error
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


_EXIT_HOOK_REGISTERED = False


def _destroy_process_group_at_exit() -> None:
    global _EXIT_HOOK_REGISTERED
    if not _EXIT_HOOK_REGISTERED:
        atexit.register(destroy_process_group)
        _EXIT_HOOK_REGISTERED = True


class GloRoTrainer(Trainer):
    """``Trainer`` for :class:`~hf_gloro.GloRoForImageClassification`; see the module docstring.

    ``compute_metrics`` defaults to the certified metrics; pass your own to replace them.
    """

    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = collate_pixels
        if kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = self._certified_metrics
        model = kwargs.get("model", args[0] if args else None)
        if kwargs.get("processing_class") is None and getattr(model, "config", None) is not None:
            # Saved with every checkpoint and the final model: the folders work with pipeline(...) as they are.
            kwargs["processing_class"] = image_processor_for_config(model.config)
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, GloRoTrainingArguments):
            raise TypeError("GloRoTrainer needs GloRoTrainingArguments")
        self._last_certification: dict[str, float] = {}
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(CertifiedProgressCallback)
        self.add_callback(EpochSeededAugmentationCallback(self))
        self.add_callback(LookaheadSyncCallback(self))
        if self.args.world_size > 1:
            _destroy_process_group_at_exit()

    def end_training(self) -> None:
        """Release the process group of a multi-process run (call once, after the last evaluation)."""
        destroy_process_group()

    # --- schedules ----------------------------------------------------------------------------------
    @property
    def certifying_epsilon(self) -> float:
        return float(self._unwrapped().config.epsilon)

    def _progress(self) -> tuple[int, int]:
        return self.state.global_step, self.state.max_steps or 0

    def current_training_epsilon(self) -> float:
        """``ε_train`` for the current optimizer step."""
        step, total = self._progress()
        return training_epsilon(self.certifying_epsilon, step, total, self.args.epsilon_schedule_spec,
                                self.args.train_epsilon_multiplier)

    def current_trades_lambda(self) -> float:
        step, total = self._progress()
        return self.args.trades_lambda * self.args.trades_lambda_schedule_spec.fraction(step, total)

    def get_train_dataloader(self):
        """A streamed training set already split between the processes (``datasets.distributed.
        split_dataset_by_node``: every rank reads its own disjoint shard) gets a plain ``DataLoader``;
        ``accelerator.prepare`` would otherwise shard it a second time (or read it on rank 0 and dispatch)."""
        dataset = self.train_dataset
        if not (_is_node_split_stream(dataset) and self.args.world_size > 1):
            return super().get_train_dataloader()
        from torch.utils.data import DataLoader

        params = {"batch_size": self._train_batch_size, "collate_fn": self.data_collator,
                  "num_workers": self.args.dataloader_num_workers, "pin_memory": self.args.dataloader_pin_memory}
        if self.args.dataloader_num_workers > 0:
            params["persistent_workers"] = self.args.dataloader_persistent_workers
            params["prefetch_factor"] = self.args.dataloader_prefetch_factor
        return DataLoader(dataset, **params)

    def create_optimizer(self, model=None):
        """transformers' optimizer, or timm's (``timm_optimizer``) on the same weight-decay parameter groups."""
        if not self.args.timm_optimizer or self.optimizer is not None:
            return super().create_optimizer(model)
        from timm.optim import create_optimizer_v2

        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        groups = [group for group in groups if group["params"]]
        options = self.args.timm_optimizer_options
        # Lookahead's own settings (timm's factory always uses α = 0.5, k = 6): they live in the param groups.
        lookahead = {key: options.pop(key) for key in ("lookahead_alpha", "lookahead_k") if key in options}
        self.optimizer = create_optimizer_v2(groups, opt=self.args.timm_optimizer.lower(), lr=self.args.learning_rate,
                                             weight_decay=self.args.weight_decay, filter_bias_and_bn=False, **options)
        if lookahead:
            if not hasattr(self.optimizer, "sync_lookahead"):
                raise ValueError(f"lookahead_alpha/lookahead_k need a lookahead_ optimizer, not "
                                 f"{self.args.timm_optimizer!r}")
            for group in self.optimizer.param_groups:
                group.update(lookahead)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        final = self.args.lr_decay_after_half_to
        if final is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = optimizer if optimizer is not None else self.optimizer
        warmup = self.args.get_warmup_steps(num_training_steps)
        ratio = min(final / self.args.learning_rate, 1.0)

        def factor(step: int) -> float:
            scale = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
            return scale * decay_after_half(step / max(num_training_steps, 1), ratio)

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # --- loss ---------------------------------------------------------------------------------------
    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixel_values, labels = inputs["pixel_values"], inputs["labels"]
        if model.training:
            epsilon = self.current_training_epsilon()
            outputs = model(pixel_values=pixel_values, epsilon=epsilon)
            # Training mode: the differentiable power-iteration estimate of K the forward used for y_⊥.
            margin_constants = outputs.margin_constants if self.args.gloro_loss in NEEDS_MARGIN_CONSTANTS else None
            loss = gloro_loss(self.args.gloro_loss, logits=outputs.logits, gloro_logits=outputs.gloro_logits,
                              labels=labels, epsilon=epsilon, margin_constants=margin_constants,
                              trades_lambda=self.current_trades_lambda())
        else:
            # Evaluation: guaranteed bound, certifying ε, GloRo cross-entropy as the reported eval loss.
            outputs = model(pixel_values=pixel_values, labels=labels)
            loss = outputs.loss
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach()
        if prediction_loss_only:
            return loss, None, None
        # (prediction, certified radius) per example, float64 (the radius needs it); argmax of float32 logits
        # equals the certificate's float64 argmax (the conversion is exact).
        if outputs.certified_radius is None or self.accelerator.mixed_precision in ("fp16", "bf16"):
            # Under autocast (bf16/fp16 evaluation) the forward gives no certificate (or, from older models, one
            # computed from reduced-precision logits; accelerate casts the outputs back to float32, so their dtype
            # does not tell): certify the same inputs in full precision. Only certify() escapes accelerate's
            # autocast wrapper around forward().
            certificate = certify_exactly(self._unwrapped(), inputs["pixel_values"])
            predictions, radius = certificate.predictions, certificate.radius
        else:
            predictions, radius = outputs.logits.argmax(-1), outputs.certified_radius
        device = outputs.logits.device
        summary = torch.stack([predictions.to(device=device, dtype=torch.float64),
                               radius.to(device=device, dtype=torch.float64)], dim=-1)
        return loss, summary, inputs["labels"]

    # --- certification state ------------------------------------------------------------------------
    @torch.no_grad()
    def prepare_certification(self) -> dict[str, float]:
        """Converge the power iterates, make them identical on all ranks, compute the guaranteed bound."""
        model = self._unwrapped()
        estimate = model.converge_power_iterates(self.args.converge_tolerance, self.args.converge_max_iterations)
        sync_power_iterates(model)
        bound = model.lipschitz_constant()
        self._last_certification = {"lipschitz_constant": bound, "lipschitz_estimate": estimate}
        return self._last_certification

    def _certified_metrics(self, prediction: EvalPrediction) -> dict[str, float]:
        summary = np.asarray(prediction.predictions, dtype=np.float64)
        labels = np.asarray(prediction.label_ids).reshape(-1)
        metrics = compute_certified_metrics(summary[:, 0].astype(np.int64), labels, summary[:, 1],
                                            self.certifying_epsilon, self.args.extra_eval_radii,
                                            norm=self._unwrapped().config.norm)  # ε and radii are in this norm
        metrics["epsilon"] = self.certifying_epsilon
        metrics.update(self._last_certification or {"lipschitz_constant": self._unwrapped().lipschitz_constant()})
        return metrics

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        self.prepare_certification()
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        self.prepare_certification()
        return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Every rank converges (identical iterates everywhere); rank 0 writes weights, iterates and a config
        # that records the certifying ε and the guaranteed bound.
        self.prepare_certification()
        with _no_library_progress_bars():  # no "Writing model shards" bar per checkpoint
            super().save_model(output_dir, _internal_call=_internal_call)

    def train(self, *args, **kwargs):
        if self.args.retain_cpu_memory and self.args.device.type == "cpu":
            retain_freed_memory()
        result = super().train(*args, **kwargs)
        self.prepare_certification()
        return result

    # --- logging ------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.model is not None and self.state.max_steps:
            logs["train_epsilon"] = round(self.current_training_epsilon(), 6)
            if self.args.gloro_loss == "trades":
                logs["trades_lambda"] = round(self.current_trades_lambda(), 6)
        super().log(logs, start_time)


@contextlib.contextmanager
def _no_library_progress_bars():
    enabled = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _readable(value):
    """Floats with 4 significant digits (still floats, not strings); everything else as it is."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.4g}")
    return value


class CertifiedProgressCallback(ProgressCallback):
    """transformers' progress bar with a quieter log: training logs are printed as a dict of floats (4
    significant digits, not strings), evaluation metrics during training go into the bar's postfix
    (``vra``, ``clean``, ``best``) instead of one printed dict per evaluation."""

    _best: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self._best = state.best_metric

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        logs = {k: v for k, v in logs.items() if k != "total_flos"}
        if any(key.startswith("eval_") for key in logs):
            postfix = {}
            for key, short in (("eval_vra", "vra"), ("eval_clean_accuracy", "clean")):
                if isinstance(logs.get(key), (int, float)):
                    postfix[short] = f"{logs[key]:.4f}"
            metric = args.metric_for_best_model
            value = logs.get(metric if metric and metric.startswith("eval_") else f"eval_{metric}")
            if isinstance(value, (int, float)):
                better = self._best is None or (value > self._best if args.greater_is_better else value < self._best)
                self._best = value if better else self._best
                postfix[f"best {metric}"] = f"{self._best:.4f}"
            self.training_bar.set_postfix(postfix, refresh=True)
            return
        self.training_bar.write(str({key: _readable(value) for key, value in logs.items()}))


class EpochSeededAugmentationCallback(TrainerCallback):
    """Tell a seeded augmentation (:class:`hf_gloro.data.PixelsTransform`) which epoch begins.

    Its random choices are keyed by ``(seed, epoch, example index)``, so the images of a resumed run do not
    depend on prefetching or on when the Trainer restores RNG states. At an epoch's beginning
    ``state.epoch`` is the number of completed epochs (``e + steps/steps`` is exactly ``e + 1``), or the
    fractional epoch a checkpoint was written in when training resumes mid-epoch; its integer part is the
    epoch that runs next.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        dataset = self.trainer.train_dataset
        epoch = int(math.floor((state.epoch or 0.0) + 1e-9))
        if hasattr(dataset, "set_epoch"):
            # hf_gloro.data.MixedTrainingSet (draws its extra examples and forwards the epoch to its parts'
            # transforms), or a streamed datasets.IterableDataset (reshuffles; idempotent for the same epoch).
            dataset.set_epoch(epoch)
            return
        transform = (dataset.format.get("format_kwargs") or {}).get("transform") if hasattr(dataset, "format") \
            else None
        if hasattr(transform, "set_epoch"):
            transform.set_epoch(epoch)


class LookaheadSyncCallback(TrainerCallback):
    """At the end of every epoch, pull a Lookahead optimizer's fast weights to its slow weights
    (``timm.optim.Lookahead.sync_lookahead``), as LiResNet's training loop does; no-op for other optimizers."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_epoch_end(self, args, state, control, **kwargs):
        optimizer = getattr(self.trainer, "optimizer", None)
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        if hasattr(optimizer, "sync_lookahead"):
            optimizer.sync_lookahead()


class CertifiedMetricsCSVCallback(TrainerCallback):
    """Append every evaluation's metrics, with the wall time since training began, to a CSV file.

    Columns: ``elapsed_s, epoch, step`` then the metric names (``eval_vra`` …), one row per evaluation
    (main process only) — the data of a VRA-vs-time curve. Default path: ``<output_dir>/eval_metrics.csv``.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self._start is None:
            self._start = time.time()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not state.is_world_process_zero or not metrics:
            return
        path = self.path or os.path.join(args.output_dir, "eval_metrics.csv")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        row = {"elapsed_s": round(time.time() - (self._start or time.time()), 3), "epoch": state.epoch,
               "step": state.global_step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        exists = os.path.exists(path) and os.path.getsize(path) > 0
        if exists:
            with open(path, newline="") as handle:
                header = next(csv.reader(handle), None)
        fieldnames = header if exists and header else list(row)
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames, extrasaction="ignore")
            if not exists:
                writer.writeheader()
            writer.writerow(row)
