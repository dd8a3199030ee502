"""What kind of source ``data.path`` names, told without importing any data library (config
validation uses it)."""

from __future__ import annotations

from pathlib import Path

HF_PREFIX = "hf:"
TABLE_SUFFIXES = (".parquet", ".arrow")


def is_hf_source(path: str) -> bool:
    """Whether ``data.path`` names a Hugging Face source rather than an image folder or file list."""
    if path.startswith(HF_PREFIX):
        return True
    p = Path(path).expanduser()
    if p.is_dir():
        return (
            (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()
        )
    return path.lower().endswith(TABLE_SUFFIXES)
