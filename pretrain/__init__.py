"""twinview.pretrain: config, data, models, objectives, the training engine, export and the CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("twinview")  # one source: pyproject.toml
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
