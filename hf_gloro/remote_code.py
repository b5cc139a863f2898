"""Self-contained model code for ``trust_remote_code=True`` loading, without hf-gloro installed (stdlib only).

:func:`write_remote_code` writes, into a saved model folder, a flattened copy of the model's own code (the
modules reachable by relative imports from :data:`REMOTE_CODE_ENTRY_MODULES`: configuration, modeling, image
processing and the ``lipschitz/`` and ``models/`` code they use; not the Hub, card, CLI or training code) and adds
``auto_map`` entries to ``config.json`` / ``preprocessor_config.json``. transformers' own ``custom_object_save``
cannot do this: it copies the defining file and the *flat* files of its relative imports, and hf-gloro's model
imports sub-packages (``from .lipschitz import …``).

This module imports nothing but the standard library, so ``modeling_gloro.save_pretrained`` can use it without
pulling in the Hub client or the card code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

__all__ = [
    "REMOTE_CODE_AUTO_MAP",
    "REMOTE_CODE_ENTRY_MODULES",
    "REMOTE_CODE_PROCESSOR_AUTO_MAP",
    "remote_code_sources",
    "write_remote_code",
]

#: Entry modules of the remote-code bundle; everything they import relatively is bundled too.
REMOTE_CODE_ENTRY_MODULES = ("configuration_gloro", "modeling_gloro", "image_processing")

#: ``auto_map`` written into ``config.json`` / ``preprocessor_config.json`` with remote code.
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_gloro.GloRoConfig",
    "AutoModelForImageClassification": "modeling_gloro.GloRoForImageClassification",
}
REMOTE_CODE_PROCESSOR_AUTO_MAP = {"AutoImageProcessor": "image_processing.GloRoImageProcessor"}

#: Modules that are not model code: never shipped (a model module importing one of them cannot be bundled).
_NOT_MODEL_CODE = ("hub", "model_card", "evaluation", "cli", "trainer", "pipelines", "inputs", "data", "losses",
                   "schedules", "metrics")

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
    target = ".".join([*base, *name.split(".")])
    parts = target.split(".")
    if len(parts) > 1 and parts[1] in _NOT_MODEL_CODE:
        raise ImportError(f"{current} imports {target}, which is not model code and is never shipped as remote code")
    return target


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

        header = f"# Bundled from {dotted} by hf_gloro.remote_code.write_remote_code; edits here are not hf-gloro's.\n"
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
