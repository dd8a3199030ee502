"""What kind of source ``data.path`` names, told without importing any data library (config
validation uses it)."""

from __future__ import annotations

import glob
from pathlib import Path

from braceexpand import braceexpand

HF_PREFIX = "hf:"
TABLE_SUFFIXES = (".parquet", ".arrow")
SHARD_SUFFIX = ".tar"


def is_shard_source(path: str) -> bool:
    """Whether ``data.path`` names WebDataset tar shards: ``/data/train-{000000..000999}.tar``,
    ``/data/train-*.tar`` or one ``.tar`` file."""
    return not path.startswith(HF_PREFIX) and path.lower().endswith(SHARD_SUFFIX)


def shard_files(path: str) -> list[str]:
    """The shard files a pattern names: braces expanded (``{000..099}``, ``{a,b}``), then globbed.

    Args:
        path: A shard pattern (see :func:`is_shard_source`).

    Returns:
        The existing files, sorted, each once.

    Raises:
        FileNotFoundError: When a name without wildcards does not exist, or nothing matches;
            the message names the first missing files.
    """
    found: set[str] = set()
    missing: list[str] = []  # names without wildcards that do not exist
    for name in braceexpand(str(Path(path).expanduser())):
        matches = glob.glob(name)
        found.update(matches)
        if not matches and not glob.has_magic(name):
            missing.append(name)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FileNotFoundError(f"data path '{path}': no shard file {', '.join(missing[:3])}{more}.")
    if not found:
        raise FileNotFoundError(f"data path '{path}': no files match.")
    return sorted(found)


def is_hf_source(path: str) -> bool:
    """Whether ``data.path`` is read through Hugging Face ``datasets`` (a hub or saved data set,
    parquet/arrow files, WebDataset shards) rather than as an image folder or file list."""
    if path.startswith(HF_PREFIX) or is_shard_source(path):
        return True
    p = Path(path).expanduser()
    if p.is_dir():
        return (
            (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()
        )
    return path.lower().endswith(TABLE_SUFFIXES)
