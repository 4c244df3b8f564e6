"""`aac-lightning recipes`: list the shipped recipes and stage configs, which every command accepts by name.

Argument parsing and printing only; the names are :mod:`aac_lightning.utils.shipped`'s.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def recipes_command(args: Sequence[str]) -> None:
    """`aac-lightning recipes [--paths] [--show NAME]`."""
    parser = argparse.ArgumentParser(
        prog="aac-lightning recipes",
        description="List the recipes (for 'aac-lightning pipeline NAME') and stage configs (for "
        "'aac-lightning fit --config NAME') shipped with the package, with their one-line descriptions. "
        "A path to a file of your own is accepted wherever a name is.",
    )
    parser.add_argument("--paths", action="store_true", help="also print where each file is installed")
    parser.add_argument("--show", metavar="NAME", help="print one recipe or config (e.g. to copy and edit it)")
    ns = parser.parse_args(list(args))
    from aac_lightning.utils.shipped import config_names, describe, recipe_names, resolve_config, resolve_recipe

    if ns.show:
        try:
            path = resolve_recipe(ns.show)
        except FileNotFoundError:
            path = resolve_config(ns.show)
        print(path.read_text(encoding="utf-8"), end="")
        return
    for title, names, usage in (
        ("recipes", recipe_names(), "aac-lightning pipeline NAME --workdir DIR"),
        ("configs", config_names(), "aac-lightning fit --config NAME [--config NAME ...]"),
    ):
        print(f"{title} ({usage}):")
        width = max(map(len, names), default=0)
        for name, path in names.items():
            print(f"  {name:<{width}}  {describe(path)}" + (f"\n  {'':<{width}}  {path}" if ns.paths else ""))
        print()
