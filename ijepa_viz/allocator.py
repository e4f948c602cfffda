"""The CPU memory allocator: keep freed tensor memory in the process (`tune_cpu_allocator`).

A module of its own because it acts on the whole process, not on a model: `ijepa-viz` calls it once for every
command, and `evaluate` calls it before extracting features on a CPU.
"""
from __future__ import annotations

import os
import sys

__all__ = ["tune_cpu_allocator"]

_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Keep freed tensor memory in the process instead of handing it back to the OS (glibc's malloc only).

    With glibc's defaults every tensor above its mmap threshold (128 KB, raised up to 32 MB as big blocks are
    freed) is a fresh mmap, and every freed block at the top of the heap is handed back; the next forward pass
    then pays a page fault for each 4 KB it writes, e.g. the (8192, 768) output of an MLP layer. PyTorch's
    performance guide suggests jemalloc or tcmalloc for this; glibc's `mallopt` gets the same effect without
    a preloaded library: no mmap (M_MMAP_MAX = 0), no trimming (M_TRIM_THRESHOLD at its maximum) and the heap
    grown 64 MB at a time (M_TOP_PAD). The price: the process keeps its peak memory until it exits.

    Measured on two AVX2 threads (benchmarks/README.md, "Evaluation time"): the `cpu-tiny` forward at batch 128
    went from 11,000-74,000 minor page faults per batch to none; alternated runs put the demo's feature
    extraction 1.27x faster and the `cpu-tiny` training step 1.13x. Called by `ijepa-viz` itself and by
    `evaluate`; set IJEPA_VIZ_MALLOC=system to leave malloc alone. Returns whether it changed anything (False
    off Linux/glibc, when turned off, or when already done)."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or os.environ.get("IJEPA_VIZ_MALLOC", "").lower() == "system" \
            or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # glibc's <malloc.h> parameter numbers
    _ALLOCATOR_TUNED = bool(mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 2 ** 31 - 1)
                            and mallopt(m_top_pad, 64 << 20))
    return _ALLOCATOR_TUNED
