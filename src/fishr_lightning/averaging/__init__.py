"""Weight averaging for domain generalisation: SWAD's loss valley (``loss_valley``, pure Python),
BatchNorm statistics for averaged weights (``batchnorm``, pure torch; ``BatchNormUpdate``, Lightning) and
``SWADCallback`` (Lightning)."""

from fishr_lightning.averaging.loss_valley import LossValley, LossValleyError, SWADWindow, swad_window

__all__ = ["LossValley", "LossValleyError", "SWADWindow", "swad_window"]
