"""The app's training: the LightningModule, backbones, DomainBed's hyperparameter registry and one run
(``run``, the ``fishr-train`` entry point)."""
