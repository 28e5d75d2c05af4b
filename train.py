"""The training app: ``python train.py [dataset=pacs] [algorithm=fishr] [key=value ...]``.

The same Hydra app as the console script ``fishr-train``; see docs/app.md (the site's page "The training app").
"""

from fishr_lightning.app.training.run import main

if __name__ == "__main__":
    main()
