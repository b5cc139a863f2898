"""Shared helpers for the certified-training tests (tiny digits data, tiny trainers) and a worker script.

As a script (used by the tests through subprocesses):

* ``python tests/gloro_helpers.py resume OUT [--kill-at STEP] [--resume]``: trains a tiny model with checkpoints
  every 4 steps; ``--kill-at`` SIGKILLs the process right after that optimizer step; ``--resume`` continues from
  the last checkpoint. Writes ``OUT/final.pt`` (weights, iterates, metrics) when it finishes.
* ``python -m torch.distributed.run --nproc_per_node 2 tests/gloro_helpers.py distributed OUT``: a 2-rank (gloo)
  run; every rank writes ``OUT/rank{r}.pt`` with its weights, iterates and bounds. The ranks use different
  thread counts and rank 1 scrambles its power iterates before every synchronisation, so the ranks only end
  equal if ``sync_power_iterates`` really synchronises.
"""

from __future__ import annotations

import os
import signal
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from transformers import TrainerCallback, set_seed

import hf_gloro
from hf_gloro.data import PixelsTransform, add_index_column, load_sklearn_digits, train_validation_split
from hf_gloro.trainer import GloRoTrainer, GloRoTrainingArguments


def tiny_digits(train_size: int = 256, validation_size: int = 96, seed: int = 0, augment: bool = False):
    """Disjoint train / validation subsets of scikit-learn's 8×8 digits with the training transform applied."""
    full = load_sklearn_digits()
    train, validation = train_validation_split(full, validation_size, seed=seed)
    train = add_index_column(train.select(range(min(train_size, len(train)))))
    transform = PixelsTransform(1, 8, crop_padding=1 if augment else 0, horizontal_flip=augment, seed=seed)
    return train.with_transform(transform), validation.with_transform(PixelsTransform(1, 8))


def tiny_model(epsilon: float = 0.3, seed: int = 0, **config) -> hf_gloro.GloRoForImageClassification:
    set_seed(seed)
    config = dict(dict(backbone="gloro_2c2f", num_channels=1, image_size=8, epsilon=epsilon, power_iterations=2,
                       id2label={i: str(i) for i in range(10)}, label2id={str(i): i for i in range(10)}), **config)
    return hf_gloro.GloRoForImageClassification(hf_gloro.GloRoConfig(**config))


def tiny_arguments(output_dir: str, **overrides) -> GloRoTrainingArguments:
    values = dict(output_dir=output_dir, per_device_train_batch_size=32, per_device_eval_batch_size=128,
                  learning_rate=1e-2, max_steps=12, logging_steps=4, eval_strategy="steps", eval_steps=4,
                  save_strategy="steps", save_steps=4, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                  # Orthogonal init has a flat spectrum, so power iteration converges slowly at first: cap it.
                  converge_tolerance=1e-5, converge_max_iterations=300,
                  train_epsilon_multiplier=1.5, epsilon_schedule="linear_half", epsilon_start_fraction=0.1)
    values.update(overrides)
    return GloRoTrainingArguments(**values)


def tiny_trainer(output_dir: str, model=None, augment: bool = False, callbacks=None, **overrides) -> GloRoTrainer:
    train, validation = tiny_digits(augment=augment)
    model = model if model is not None else tiny_model()
    return GloRoTrainer(model=model, args=tiny_arguments(output_dir, **overrides), train_dataset=train,
                        eval_dataset=validation, callbacks=callbacks)


def model_snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


class _KillAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)



def rebuilt(model: hf_gloro.GloRoForImageClassification) -> hf_gloro.GloRoForImageClassification:
    """A fresh instance with the same weights (no cached bound): what a patched bound is recomputed on."""
    clone = hf_gloro.GloRoForImageClassification(model.config)
    clone.load_state_dict(model.state_dict())
    return clone.eval()


def attack_logits(model, x):
    """Logits of normalisation → backbone → head (float32), differentiable, for inputs anywhere in R^n."""
    return model.head(model.backbone(model.normalization(x)))


def margin_to_runner_up(model, x, target):
    """``y_target − max_{i≠target} y_i`` of :func:`attack_logits` (≤ 0: the attack changed the prediction)."""
    logits = attack_logits(model, x)
    top = logits.gather(1, target[:, None]).squeeze(1)
    others = logits.scatter(1, target[:, None], float("-inf"))
    return top - others.max(dim=1).values

def _resume_main(argv: list[str]) -> None:
    output_dir = argv[0]
    kill_at = int(argv[argv.index("--kill-at") + 1]) if "--kill-at" in argv else None
    resume = "--resume" in argv
    torch.set_num_threads(1)
    callbacks = [_KillAt(kill_at)] if kill_at is not None else None
    trainer = tiny_trainer(output_dir, augment=True, callbacks=callbacks, load_best_model_at_end=False)
    trainer.train(resume_from_checkpoint=True if resume else None)
    metrics = trainer.evaluate()
    torch.save({"state_dict": model_snapshot(trainer.model), "metrics": metrics,
                "best_checkpoint": trainer.state.best_model_checkpoint, "global_step": trainer.state.global_step,
                "log_history": trainer.state.log_history}, os.path.join(output_dir, "final.pt"))


def _power_iterates(model) -> dict[str, torch.Tensor]:
    return {name: buffer.detach().clone() for name, buffer in model.named_buffers() if name.endswith("power_iterate")}


@torch.no_grad()
def scramble_power_iterates(model, seed: int) -> None:
    """Replace every power iterate with a random unit vector (a rank that diverged)."""
    generator = torch.Generator().manual_seed(seed)
    for name, buffer in model.named_buffers():
        if name.endswith("power_iterate"):
            noise = torch.randn(buffer.shape, generator=generator, dtype=buffer.dtype)
            buffer.copy_(noise / noise.norm())


class _ScrambleBeforeEvaluation(TrainerCallback):
    """On one rank, scramble the iterates right before each evaluation converges and synchronises them."""

    def __init__(self, trainer_ref: list, rank: int):
        self.trainer_ref, self.rank = trainer_ref, rank

    def on_step_end(self, args, state, control, **kwargs):
        if self.rank == 1 and args.eval_steps and state.global_step % args.eval_steps == 0:
            scramble_power_iterates(self.trainer_ref[0].model, seed=state.global_step)


def _distributed_main(argv: list[str]) -> None:
    output_dir = argv[0]
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1 + rank)  # different float reductions on each rank (1 and 2 threads)
    trainer_ref: list = []
    trainer = tiny_trainer(os.path.join(output_dir, "run"), max_steps=8, eval_steps=4, save_steps=4,
                           gloro_loss="emma", load_best_model_at_end=False,
                           callbacks=[_ScrambleBeforeEvaluation(trainer_ref, rank)])
    trainer_ref.append(trainer)
    initial = model_snapshot(trainer.model)
    trainer.train()
    model = trainer.model
    if rank == 1:
        scramble_power_iterates(model, seed=1234)
    before_sync = _power_iterates(model)
    trainer.prepare_certification()  # converge (from different iterates, with different threads), then sync
    after_sync = _power_iterates(model)
    metrics = trainer.evaluate()
    torch.save({"state_dict": model_snapshot(model), "initial": initial, "metrics": metrics,
                "before_sync": before_sync, "after_sync": after_sync, "threads": torch.get_num_threads(),
                "world_size": trainer.args.world_size, "bound": model.lipschitz_constant(),
                "backend": str(torch.distributed.get_backend()) if torch.distributed.is_initialized() else None},
               os.path.join(output_dir, f"rank{rank}.pt"))
    trainer.end_training()  # destroy the process group before the interpreter exits


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    {"resume": _resume_main, "distributed": _distributed_main}[command](rest)
