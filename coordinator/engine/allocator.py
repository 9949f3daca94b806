"""How a process's allocator (glibc's malloc) treats freed memory: two policies for two workloads."""

from __future__ import annotations

import ctypes
import platform

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Apply (parameter, value) pairs; True where the allocator is glibc's and took them all."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return all(bool(libc.mallopt(parameter, value)) for parameter, value in settings)


def keep_freed_memory_in_heap() -> bool:
    """Make this process's allocator keep freed memory for reuse (a tower's).

    A CPU tower allocates and frees the same large tensors every step (conv1's output is tens of
    MB). By default glibc serves each block over 32 MiB with fresh pages from the kernel, which
    are faulted in and zeroed again on first touch, step after step. Served from the heap and
    kept there, they are reused from the third step on. The cost: the step's peak memory stays
    resident. Both are measured in docs/performance.md, "Training step".
    """
    return _mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))


def return_freed_memory() -> bool:
    """Make this process's allocator give large freed blocks back to the kernel (the server's).

    The server decodes images and builds request tensors (618 KB an image) in up to 32 handler
    threads at once. glibc raises its mmap threshold each time such a block is freed, after which
    they come from per-thread arenas and stay there, fragmented, and the heap grows under load. A
    fixed 128 KiB threshold serves every large block with its own pages, returned on free, and two
    arenas bound the rest (docs/performance.md, "Serving beside training").
    """
    return _mallopt((M_MMAP_THRESHOLD, 128 << 10), (M_ARENA_MAX, 2))
