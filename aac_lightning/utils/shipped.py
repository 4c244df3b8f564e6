"""The recipes (``stages/*.yaml``) and stage configs (``conf/**/*.yaml``) shipped with the package, by name.

``conf/`` and ``stages/`` live at the top of the repository (the sources of truth); the wheel carries
copies of both under ``aac_lightning/_shipped/`` (``setup.py`` copies them when it builds), with the
same layout, so a recipe's ``../conf/...`` paths hold in both places. A checkout (or an editable
install) reads the repository's folders directly.

Names: a recipe is named by its file stem (``sjtu_captioning``), a config by its path under ``conf/``
without ``.yaml`` (``captioning/transformer2``); ``stages/demo.yaml`` and ``conf/demo/xe.yaml`` are
accepted too, so the README's commands work from any folder. A path to an existing file always wins.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "SHIPPED_DIR_NAME",
    "config_names",
    "describe",
    "recipe_names",
    "resolve_config",
    "resolve_recipe",
    "shipped_root",
]

SHIPPED_DIR_NAME = "_shipped"


def shipped_root() -> Path:
    """The folder holding ``conf/`` and ``stages/``: inside the installed package, else the checkout."""
    package = Path(__file__).resolve().parents[1]
    for root in (package / SHIPPED_DIR_NAME, package.parent):
        if (root / "stages").is_dir() and (root / "conf").is_dir():
            return root
    raise FileNotFoundError(
        f"the shipped recipes and configs are missing: neither '{package / SHIPPED_DIR_NAME}' (an installed "
        f"wheel) nor '{package.parent}' (a checkout) holds stages/ and conf/; reinstall the package"
    )


def recipe_names() -> dict[str, Path]:
    """``{name: path}`` of the shipped recipes, sorted by name."""
    folder = shipped_root() / "stages"
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def config_names() -> dict[str, Path]:
    """``{name: path}`` of the shipped stage configs (name = path under ``conf/`` without ``.yaml``)."""
    folder = shipped_root() / "conf"
    return {path.relative_to(folder).with_suffix("").as_posix(): path for path in sorted(folder.rglob("*.yaml"))}


def describe(path: Path) -> str:
    """The first comment line of a YAML file (its one-line description), or ``description:``."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line.startswith("description:"):
                return line.partition(":")[2].strip().strip("\"'")
            if line.startswith("#"):
                return line.lstrip("#").strip().rstrip(":").rstrip()
            if line:
                break
    return ""


def _key(value: str, prefix: str) -> str:
    """``stages/demo.yaml`` / ``./stages/demo`` / ``demo`` -> ``demo``."""
    key = value.replace(os.sep, "/").removeprefix("./").removeprefix(prefix)
    return key.removesuffix(".yaml").removesuffix(".yml")


def _resolve(value: str | os.PathLike, names: dict[str, Path], prefix: str, what: str, example: str) -> Path:
    path = Path(value)
    if path.is_file():
        return path
    found = names.get(_key(str(value), prefix))
    if found is not None:
        return found
    if path.is_dir():
        raise FileNotFoundError(f"{what} '{value}' is a folder: pass a YAML file or the name of a shipped {what} (e.g. {example})")
    listing = ", ".join(names) or "(none)"
    raise FileNotFoundError(
        f"{what} '{value}' not found: neither a file nor the name of a shipped {what}; shipped {what}s: {listing} "
        "(aac-lightning recipes lists them)"
    )


def resolve_recipe(value: str | os.PathLike) -> Path:
    """An existing recipe file as given, else the shipped recipe of that name; FileNotFoundError naming it."""
    return _resolve(value, recipe_names(), "stages/", "recipe", "sjtu_captioning")


def resolve_config(value: str | os.PathLike) -> Path:
    """An existing config file as given, else the shipped config of that name; FileNotFoundError naming it."""
    return _resolve(value, config_names(), "conf/", "config", "captioning/transformer2")
