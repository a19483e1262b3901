"""Whether the process that started some work is still running: a run of the instance (its
`specdraft/runner` tag) or an artifact's writer (its attempt's writer record), both `host:pid`."""

from __future__ import annotations

import os
import socket


def this_process() -> tuple[str, int]:
    return socket.gethostname(), os.getpid()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` on this host runs (a zombie does not; another user's process does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # a zombie is dead, only not yet reaped by its parent
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def maybe_alive(host: str, pid: int) -> bool:
    """False only when `host` is this one and `pid` is gone: another host's process cannot be told."""
    return host != socket.gethostname() or pid_alive(pid)
