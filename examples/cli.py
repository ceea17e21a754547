"""Train the digits model from the command line and YAML, with LightningCLI.

    python examples/cli.py fit --config examples/cli_config.yaml
    python examples/cli.py fit --config examples/cli_config.yaml --trainer.max_epochs=3 --model.hidden=64
    python examples/cli.py fit --help

The config adds ``lightning_validate.ModeCheck`` to the trainer's callbacks by class path, with its arguments; the
model is the ``ValidationMixin`` digits classifier of ``examples/digits.py``.
"""

from __future__ import annotations

import logging
import os
import warnings

from digits import DigitsClassifier, DigitsDataModule

# --8<-- [start:cli]
from lightning.pytorch.cli import ArgsType, LightningCLI


def main(args: ArgsType = None) -> LightningCLI:
    return LightningCLI(DigitsClassifier, DigitsDataModule, args=args)


# --8<-- [end:cli]

if __name__ == "__main__":
    # Lightning 2.6.6's LightningCLI calls a jsonargparse API that jsonargparse deprecates: not about your model.
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    # Lightning's advice for large data sets; the digits fit in memory, worker processes would only add start-up.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # Lightning 2.6 uses torch's LeafSpec, deprecated in torch 2.13: not about your model.
    warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*", FutureWarning)
    # Lightning advertises its cloud services at every run ("💡 Tip: ..."): drop those lines, keep the rest.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not record.getMessage().startswith("💡 Tip"))
    main()
