"""Sharing certified models on the Hugging Face Hub: one commit with weights, config, processor, card and plot.

* :func:`save_certified_model` writes a folder that is complete on its own: ``model.safetensors``,
  ``config.json`` (ε and the recorded guaranteed bound), ``preprocessor_config.json``, ``README.md`` (the
  GloRo card, :mod:`hf_gloro.model_card`), and with an evaluation ``certified_accuracy.{png,json,csv}``.
* :func:`push_certified_model` pushes that folder as **one commit**. ``PreTrainedModel.push_to_hub`` keeps an
  existing README and otherwise writes a stub card, so pushing the model and then the card is two commits
  with a window in which the repo shows a wrong card; one commit has no such window.
* :func:`push_model_card` replaces only the card and plot (e.g. after ``Trainer.push_to_hub``).

Pulling needs no remote code: after ``import hf_gloro``,
``AutoModelForImageClassification.from_pretrained("org/name")`` builds the model from the installed package.

For environments where hf-gloro cannot be installed, ``remote_code=True`` adds a self-contained copy of the model
code plus ``auto_map`` entries (:func:`hf_gloro.remote_code.write_remote_code`), so that
``from_pretrained("org/name", trust_remote_code=True)`` works with only torch, timm and transformers.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, ModelCard

from .evaluation import CertifiedEvaluation
from .image_processing import GloRoImageProcessor, image_processor_for_config
from .model_card import CURVE_CSV_FILE, CURVE_JSON_FILE, PLOT_FILE, write_model_card

# The bundler lives in hf_gloro.remote_code (standard library only); re-exported here for existing imports.
from .remote_code import (  # noqa: F401
    REMOTE_CODE_AUTO_MAP,
    REMOTE_CODE_ENTRY_MODULES,
    REMOTE_CODE_PROCESSOR_AUTO_MAP,
    remote_code_sources,
    write_remote_code,
)

# --- saving and pushing ---------------------------------------------------------------------------------
def _check_processor(model, processor) -> None:
    config = model.config
    size = getattr(processor, "size", None) or {}
    shape = (size.get("height"), size.get("width"))
    channels = getattr(processor, "num_channels", config.num_channels)
    if shape != (config.image_size, config.image_size) or channels != config.num_channels:
        raise ValueError(
            f"the image processor produces {channels}×{shape[0]}×{shape[1]} inputs but the model is certified "
            f"for {config.num_channels}×{config.image_size}×{config.image_size}"
        )
    if getattr(processor, "do_normalize", False):
        raise ValueError("the image processor normalises; GloRo models normalise inside the model "
                         "(use hf_gloro.gloro_image_processor)")


def save_certified_model(
    model,
    save_directory: str | os.PathLike,
    *,
    evaluation: CertifiedEvaluation | None = None,
    image_processor: GloRoImageProcessor | None = None,
    remote_code: bool = False,
    **card_kwargs,
) -> ModelCard:
    """Write everything a shared certified model needs into ``save_directory``; return the card.

    ``card_kwargs`` go to :func:`hf_gloro.model_card.build_model_card` (``repo_id``, ``training``,
    ``license``, ``model_name``, ``tags``).
    """
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    processor = image_processor or image_processor_for_config(config)
    _check_processor(model, processor)
    # Render the card first: it refuses an evaluation made with other weights before anything is written.
    card = write_model_card(model, directory, evaluation, remote_code=remote_code, **card_kwargs)
    model.save_pretrained(directory)  # records config.lipschitz_constant
    processor.save_pretrained(directory)
    if remote_code:
        write_remote_code(directory)
    return card


def _stale_patterns(remote_code: bool, evaluation: CertifiedEvaluation | None) -> list[str]:
    """Files a previous push may have left that this push must replace or remove."""
    patterns = ["model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin"]
    if evaluation is None:
        patterns += [PLOT_FILE, CURVE_JSON_FILE, CURVE_CSV_FILE]
    if not remote_code:
        patterns += list(remote_code_sources())
    return patterns


def push_certified_model(
    model,
    repo_id: str,
    *,
    evaluation: CertifiedEvaluation | None = None,
    image_processor: GloRoImageProcessor | None = None,
    remote_code: bool = False,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    **card_kwargs,
):
    """Create ``repo_id`` if needed and push weights, config, processor, card and plot in one commit.

    The card's YAML is validated by the Hub (``/api/validate-yaml``) before the commit. Weight shards, plots
    and remote-code files left by an earlier push are deleted in the same commit when this push does not
    replace them. Returns the ``CommitInfo``.

    Example:

    ```python
    >>> evaluation = evaluate_for_card(model, test_set, dataset_id="ylecun/mnist")
    >>> push_certified_model(model, "me/gloro-mnist", evaluation=evaluation, training="10 epochs, ε=0.3")
    ```
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory(prefix="hf-gloro-push-") as folder:
        card = save_certified_model(model, folder, evaluation=evaluation, image_processor=image_processor,
                                    remote_code=remote_code, repo_id=repo_id, **card_kwargs)
        card.validate()
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
            commit_message=commit_message or f"Upload certified GloRo model (ε = {model.config.epsilon:g})",
            delete_patterns=_stale_patterns(remote_code, evaluation),
        )


def push_model_card(
    model,
    repo_id: str,
    evaluation: CertifiedEvaluation | None = None,
    *,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    **card_kwargs,
):
    """Replace the card (and plot) of an existing repo whose weights were pushed some other way.

    The card must describe the weights in the repo: pass the model that was pushed.
    """
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="hf-gloro-card-") as folder:
        card = write_model_card(model, folder, evaluation, repo_id=repo_id, **card_kwargs)
        card.validate()
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
            commit_message=commit_message or "Update GloRo model card",
        )
