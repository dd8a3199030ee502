"""The kind of host a benchmark ran on, for every figure it prints.

The project's CPU machines come in kinds that differ up to 2x in speed (AVX2 only; AVX-512; AVX-512
with BF16/FP16), so a figure without its kind cannot be compared. ``python bench/host.py`` prints it.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def host_kind() -> str:
    """CPU model, its widest vector extension and the core count, e.g.
    ``AMD EPYC, AVX-512 (with BF16), 2 cores``."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    if "avx512f" in flags:
        extras = [name for flag, name in (("avx512_bf16", "BF16"), ("avx512_fp16", "FP16")) if flag in flags]
        isa = "AVX-512" + (f" (with {', '.join(extras)})" if extras else "")
    elif "avx2" in flags:
        isa = "AVX2, no AVX-512"
    else:
        isa = "no AVX2" if flags else "vector extensions unknown"
    return f"{model}, {isa}, {os.cpu_count()} cores"


if __name__ == "__main__":
    print(host_kind())
