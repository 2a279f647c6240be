"""Process memory: handing freed memory back to the OS, and reading the resident size."""
from __future__ import annotations

import ctypes
import gc
import resource
import sys


def release_freed_memory(collect: bool = True) -> None:
    """Hand memory freed by Python back to the OS (glibc keeps freed heap pages otherwise, so the
    resident size of a packed model would still count the dense weights it replaced, and a
    streamed run would keep every block it has freed)."""
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """The process's resident set size now (Linux /proc; elsewhere the peak so far)."""
    now = _status_kib("VmRSS")
    return now if now is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far.

    On Linux this is VmHWM, the high-water mark of the process's own address space. getrusage's
    ru_maxrss is not: Linux carries it across exec, so a child started by a large parent (a test
    runner holding a model) reports the parent's resident size as its own peak."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB
