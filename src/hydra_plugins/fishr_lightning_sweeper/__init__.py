"""The training app's Hydra sweeper (``hydra/sweeper: fishr``, configs/hydra/sweeper/fishr.yaml), in the
``hydra_plugins`` namespace where Hydra looks for plugins (issue 30)."""
