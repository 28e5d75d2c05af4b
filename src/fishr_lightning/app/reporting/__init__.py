"""The app's reporting: the run's records (``records``, no torch; ``results``, the callback that writes
them), DomainBed's model selection, ``fishr-collect`` and plots."""
