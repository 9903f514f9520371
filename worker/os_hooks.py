"""Linux process hooks shared by the worker and its helper processes (no-ops elsewhere)."""

from __future__ import annotations

import sys


def die_with_parent(signum: int) -> None:
    """Have the kernel send `signum` to this process when the thread that started it exits (its parent's
    main thread, for the worker's own processes). The caller checks afterwards that its parent is still the
    one it expects: a parent that died before this call sends nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
