"""glibc's malloc, set up for an engine running on the CPU.

A step on the CPU allocates and frees tens of megabytes of temporaries (a decode batch's
gathered histories, prefill activations). glibc serves blocks above its mmap threshold
(128 KiB, raised on the fly up to 32 MiB) with fresh ``mmap`` pages and gives them back with
``munmap`` when freed, and trims the heap top once 128 KiB of it is free. So every step
faults in, zeroes and unmaps the same memory again; the unmapping also flushes TLBs, and the
host's own work after the forward runs the slower for it.

Measured on a 2-core CPU VM (tiny Llama, 256 running decodes, PyTorch path, one thread): the
forward took 10-36 ms with glibc's defaults, depending on whether its automatic threshold had
grown past the step's temporaries, and 10-12 ms with freed memory kept. SmolLM2, 64 prompts
of 200 tokens, 24 new tokens each: 61.5 -> 66-67 tokens/s (two runs each). The price is
resident memory: the heap keeps what the largest steps needed, and a little more while freed
neighbours coalesce (a loop of 64 MiB temporaries settles about 0.45 GiB higher; the engine
benchmark above ended at 650-677 MiB resident either way).

``keep_freed_memory`` raises both thresholds to 1 GiB (blocks up to 1 GiB come from the heap,
and up to 1 GiB of free heap stays mapped), once per process, through ``mallopt``. Nothing is
changed when the process already chose its allocator: a glibc malloc variable or tunable in
the environment, or another malloc (jemalloc, tcmalloc, mimalloc) preloaded; then that
setting is what runs, and the status says so.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Optional

THRESHOLD = 1 << 30  # bytes
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_status: Optional[str] = None


def _users_choice(environ) -> Optional[str]:
    """What in the environment already chose the allocator's behaviour, or None."""
    for name in _USER_VARIABLES:
        if name in environ:
            return f"{name} set in the environment"
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    preload = environ.get("LD_PRELOAD", "")
    for name in _OTHER_ALLOCATORS:
        if name in preload:
            return f"{name} preloaded"
    return None


def keep_freed_memory(environ=None, libc=None) -> str:
    """Raise glibc's mmap and trim thresholds (see the module docstring) unless the
    environment already set up the allocator; returns what was done, in words. Runs once per
    process (later calls return the first call's status). ``environ`` and ``libc`` replace
    ``os.environ`` and the C library (tests)."""
    global _status
    if _status is not None and environ is None and libc is None:
        return _status
    environ = os.environ if environ is None else environ
    choice = _users_choice(environ)
    if choice is not None:
        status = f"left as configured ({choice})"
    elif libc is None and (platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"):
        status = "left as it is (not glibc)"
    else:
        lib = libc if libc is not None else ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = lib.mallopt(_M_MMAP_THRESHOLD, THRESHOLD) == 1 and lib.mallopt(_M_TRIM_THRESHOLD, THRESHOLD) == 1
        status = "glibc: freed memory up to 1 GiB kept mapped" if ok else "left as it is (mallopt refused)"
    if libc is None:
        _status = status
    return status
