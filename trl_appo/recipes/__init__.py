"""The shipped recipe YAMLs (package data), found without a repository checkout.

    trl-appo recipes                      # list them
    trl-appo recipes --copy my-recipes    # copy them (training + accelerate YAMLs) into a folder
    trl-appo train --config cpu/demo.yaml # a shipped name works from any directory

The files live in this folder (``trl_appo/recipes/<setting>/<variant>.yaml``); a checkout's ``recipes/`` folder
links to them, so ``recipes/cpu/demo.yaml`` and ``cpu/demo.yaml`` name the same file. Stdlib only: the CLI uses this
module for ``--help`` and ``recipes`` without importing torch or TRL.
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["recipes_dir", "list_recipes", "find_recipe", "copy_recipes"]


def recipes_dir() -> Path:
    """The folder holding the shipped recipes (inside the installed package)."""
    return Path(__file__).resolve().parent


def list_recipes(include_accelerate: bool = False) -> list[str]:
    """Names of the shipped recipes, e.g. ``cpu/demo.yaml`` (``accelerate/*.yaml`` only when asked)."""
    root = recipes_dir()
    names = sorted(str(p.relative_to(root)) for p in root.glob("*/*.yaml"))
    return [n for n in names if include_accelerate or not n.startswith("accelerate/")]


def find_recipe(name: str | Path) -> Path | None:
    """Resolve ``--config NAME``: an existing path first, else a shipped recipe.

    ``NAME`` may be a path (``./my.yaml``), a shipped name with or without the ``recipes/`` prefix and the
    ``.yaml`` suffix (``recipes/cpu/demo.yaml``, ``cpu/demo.yaml``, ``cpu/demo``). Returns None when nothing matches.
    """
    path = Path(name)
    if path.is_file():
        return path
    text = str(name).replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    if text.startswith("recipes/"):
        text = text[len("recipes/"):]
    root = recipes_dir()
    for candidate in (text, text + ".yaml"):
        shipped = root / candidate
        if candidate and shipped.is_file() and shipped.suffix == ".yaml":
            return shipped
    return None


def copy_recipes(dest: str | Path, overwrite: bool = False) -> list[Path]:
    """Copy every shipped YAML (training and accelerate) into ``dest/<setting>/<variant>.yaml``.

    Existing files are kept unless ``overwrite``; returns the paths written.
    """
    root, dest = recipes_dir(), Path(dest)
    written = []
    for name in list_recipes(include_accelerate=True):
        target = dest / name
        if target.exists() and not overwrite:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / name, target)
        written.append(target)
    return written
