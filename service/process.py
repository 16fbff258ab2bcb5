"""What every process the supervisor starts (workers, the executor) sets up first, through Linux's
prctl: die with the supervisor, and a name that `ps` and `top` show."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


def _prctl(option: int, arg: int | ctypes.c_char_p) -> None:
    with contextlib.suppress(OSError, AttributeError):  # not Linux: nothing to do
        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)


def supervised(name: bytes | None = None) -> None:
    """End this process when the supervisor dies, even by SIGKILL: a worker left behind would keep
    the port and a model executor the memory, serving nobody. SIGKILL, as the supervisor met an
    end it could not handle: a worker still starting up would wait for its executor forever.
    `name` (15 bytes at most) is what /proc/<pid>/comm shows."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the supervisor died before the line above
        os.kill(os.getpid(), signal.SIGKILL)
    if name:
        _prctl(PR_SET_NAME, ctypes.c_char_p(name[:15]))
