"""Build hook: the wheel carries the repository's recipes and configs (`stages/`, `conf/`).

They stay at the top of the repository, the sources of truth; building copies them into
`aac_lightning/_shipped/` inside the wheel, where `aac_lightning.utils.shipped` finds them by name.
Editable installs read the checkout's folders directly. Everything else is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("conf", "stages")


class BuildPyWithRecipes(build_py):
    """`build_py` that also copies conf/ and stages/ (YAML files only) into the built package."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        here = Path(__file__).resolve().parent
        for name in SHIPPED:
            source = here / name
            if not source.is_dir():
                raise FileNotFoundError(f"building the wheel needs the folder '{source}' (the shipped {name})")
            target = Path(self.build_lib) / "aac_lightning" / "_shipped" / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithRecipes})
