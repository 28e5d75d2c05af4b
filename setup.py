"""The package list, which pyproject.toml cannot express (everything else is there; issue 25).

Every package under ``src/`` is found, so a new subpackage ships without a list to update (an explicit list
once missed ``fishr_lightning.baselines``); the top-level ``configs/`` directory ships as
``fishr_lightning.app.configs`` (``[tool.setuptools.package-dir]``), which ``[tool.setuptools.packages.find]``
cannot add to what it finds.
"""

from setuptools import find_packages, setup

# hydra_plugins is a namespace package (Hydra scans it for plugins: the app's sweeper), which find_packages does
# not enter: its subpackages are found from inside it.
plugins = [f"hydra_plugins.{name}" for name in find_packages("src/hydra_plugins")]
setup(
    packages=[
        *find_packages("src", include=["fishr_lightning", "fishr_lightning.*"]),
        *plugins,
        "fishr_lightning.app.configs",
    ]
)
