"""twinview.pretrain: config, data, models, losses, the training loop, export and the CLI."""

__version__ = "0.1.0"
