"""The package list, which pyproject.toml cannot express (everything else is there; issue 25).

Every package under ``src/`` is found, so a new subpackage ships without a list to update (an explicit list
once missed ``fishr_lightning.baselines``); the top-level ``configs/`` directory ships as
``fishr_lightning.app.configs`` (``[tool.setuptools.package-dir]``), which ``[tool.setuptools.packages.find]``
cannot add to what it finds.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages("src", include=["fishr_lightning", "fishr_lightning.*"]), "fishr_lightning.app.configs"])
