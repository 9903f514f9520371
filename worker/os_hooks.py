"""Linux process hooks shared by the worker and its helper processes (no-ops elsewhere)."""

from __future__ import annotations

import os
import sys


def die_with_parent(signum: int, parent: int) -> bool:
    """Have the kernel send `signum` to this process when the thread that started it exits (its parent's
    main thread, for the worker's own processes). False when `parent`, the parent the caller saw before,
    is already gone: it died before the request took effect, so the signal will never come."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    return os.getppid() == parent
