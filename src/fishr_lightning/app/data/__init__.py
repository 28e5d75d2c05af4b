"""The app's data: dataset specs (``specs``, no torch), image folders, the MNIST variants, the embedded
synthetic default, ``load_domains``, DomainBed's splits and batches (``datamodule``) and ``fishr-download``."""
