"""Ship the MONAI bundle (``bundle/configs``, ``bundle/docs``) inside the package of a non-editable install.

The bundle stays at the repository root, where ``python -m monai.bundle run --config_file
bundle/configs/train.json`` and MONAI's bundle tools expect it. A wheel (``pip install .``) gets a
copy as ``monai_mtl/bundle/``, where :data:`monai_mtl.runs.CONFIG_DIR` finds it, so ``python -m
monai_mtl cv`` and the other commands run from any folder. An editable install reads the
repository's own ``bundle/``. Everything else is in ``pyproject.toml``.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

BUNDLE = Path(__file__).resolve().parent / "bundle"


class BuildWithBundle(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "monai_mtl" / "bundle"
        shutil.rmtree(target, ignore_errors=True)
        for part in ("configs", "docs"):
            shutil.copytree(BUNDLE / part, target / part, ignore=shutil.ignore_patterns("*.pyc", "__pycache__"))


setup(cmdclass={"build_py": BuildWithBundle})
