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

For environments where hf-gloro cannot be installed, ``remote_code=True`` (or :func:`write_remote_code`) adds a
self-contained copy of the model code plus ``auto_map`` entries, so that
``from_pretrained("org/name", trust_remote_code=True)`` works with only torch, timm and transformers.
``register_for_auto_class`` + ``save_pretrained`` cannot do this on its own: transformers'
``custom_object_save`` copies the defining file and the *flat* files of its relative imports, and hf-gloro's
model imports sub-packages (``from .lipschitz import …``), which it cannot copy.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, ModelCard

from .image_processing import GloRoImageProcessor, gloro_image_processor
from .model_card import CURVE_CSV_FILE, CURVE_JSON_FILE, PLOT_FILE, CertifiedEvaluation, write_model_card

#: Entry modules of the remote-code bundle; everything they import relatively is bundled too.
REMOTE_CODE_ENTRY_MODULES = ("configuration_gloro", "modeling_gloro", "image_processing")

#: ``auto_map`` written into ``config.json`` / ``preprocessor_config.json`` with remote code.
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_gloro.GloRoConfig",
    "AutoModelForImageClassification": "modeling_gloro.GloRoForImageClassification",
}
REMOTE_CODE_PROCESSOR_AUTO_MAP = {"AutoImageProcessor": "image_processing.GloRoImageProcessor"}

_PACKAGE_DIR = Path(__file__).resolve().parent
_PACKAGE = __name__.rsplit(".", 1)[0]
_RELATIVE_IMPORT = re.compile(r"^(?P<indent>[ \t]*)from[ \t]+(?P<dots>\.+)(?P<name>[\w.]*)[ \t]+import\b", re.M)
_ABSOLUTE_SELF_IMPORT = re.compile(rf"^[ \t]*(from|import)[ \t]+{_PACKAGE}\b", re.M)


# --- remote code --------------------------------------------------------------------------------------
def _module_file(dotted: str) -> Path:
    relative = Path(*dotted.split(".")[1:])
    package_init = _PACKAGE_DIR / relative / "__init__.py"
    if package_init.is_file():
        return package_init
    module = (_PACKAGE_DIR / relative).with_suffix(".py")
    if module.is_file():
        return module
    raise ImportError(f"cannot bundle {dotted!r}: no module file under {_PACKAGE_DIR}")


def _flat_name(dotted: str) -> str:
    """``hf_gloro.lipschitz.conv`` → ``lipschitz_conv``; a package maps to its own name (``lipschitz``)."""
    return "_".join(dotted.split(".")[1:])


def _resolve(current: str, dots: str, name: str) -> str:
    is_package = _module_file(current).name == "__init__.py"
    base = current.split(".") if is_package else current.split(".")[:-1]
    levels = len(dots) - 1
    if levels >= len(base):
        raise ImportError(f"relative import {dots}{name} in {current} leaves the package")
    base = base[: len(base) - levels]
    if not name:
        raise ImportError(f"`from {dots} import …` in {current} cannot be bundled; import from a module instead")
    return ".".join([*base, *name.split(".")])


def remote_code_sources() -> dict[str, str]:
    """Flattened, self-contained sources of the model code: ``{file name: text}``.

    Every module reachable by relative imports from :data:`REMOTE_CODE_ENTRY_MODULES` becomes one file in a
    single folder (``hf_gloro/lipschitz/conv.py`` → ``lipschitz_conv.py``), with its relative imports
    rewritten to ``from .<flat name> import …``, the only form transformers' dynamic-module loader follows.
    """
    sources: dict[str, str] = {}
    pending = [f"{_PACKAGE}.{name}" for name in REMOTE_CODE_ENTRY_MODULES]
    seen: set[str] = set()
    while pending:
        dotted = pending.pop()
        if dotted in seen:
            continue
        seen.add(dotted)
        text = _module_file(dotted).read_text(encoding="utf-8")
        if _ABSOLUTE_SELF_IMPORT.search(text):
            raise ImportError(f"{dotted} imports {_PACKAGE} absolutely; remote code must use relative imports")

        def rewrite(match: re.Match, current=dotted) -> str:
            target = _resolve(current, match["dots"], match["name"])
            pending.append(target)
            return f"{match['indent']}from .{_flat_name(target)} import"

        header = f"# Bundled from {dotted} by hf_gloro.hub.write_remote_code; edits here are not hf-gloro's.\n"
        sources[f"{_flat_name(dotted)}.py"] = header + _RELATIVE_IMPORT.sub(rewrite, text)
    return dict(sorted(sources.items()))


def write_remote_code(directory: str | os.PathLike) -> list[str]:
    """Write the self-contained model code into a saved model folder and add ``auto_map`` entries.

    ``directory`` must already hold ``config.json`` (and, if present, ``preprocessor_config.json`` is
    updated too). Returns the file names written. Loading then needs ``trust_remote_code=True`` and
    ``torch``, ``timm``, ``transformers`` installed, but not hf-gloro.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: save the model before writing its remote code")
    sources = remote_code_sources()
    for name, text in sources.items():
        (directory / name).write_text(text, encoding="utf-8")
    _add_auto_map(config_path, REMOTE_CODE_AUTO_MAP)
    processor_path = directory / "preprocessor_config.json"
    if processor_path.is_file():
        _add_auto_map(processor_path, REMOTE_CODE_PROCESSOR_AUTO_MAP)
    return list(sources)


def _add_auto_map(path: Path, entries: dict[str, str]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data["auto_map"] = {**data.get("auto_map", {}), **entries}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


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
    processor = image_processor or gloro_image_processor(config.num_channels, config.image_size)
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
