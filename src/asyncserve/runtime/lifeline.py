"""Processes that end with their parent: a pool process or a server worker whose parent died exits too.

A parent killed with SIGKILL cannot stop its children, and a child of a dead parent is adopted by
init and lives on: pool processes holding memory, workers holding the port, so that the next start
fails with "Address already in use". Each such child runs a small thread that checks its parent
(``os.getppid()`` changes when the parent dies) every ``CHECK_S`` and acts at once.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

CHECK_S = 0.2
"""How often a child looks at its parent: it outlives a killed parent by at most this much."""


def follow_parent(parent: int, on_orphaned: Callable[[], None], *, check_s: float = CHECK_S) -> threading.Thread:
    """Call ``on_orphaned`` (in a daemon thread) as soon as this process's parent, ``parent``, is gone.

    The parent's pid is given, not read here: a child that starts after its parent died has already
    been adopted, and would take its new parent for the one to follow.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(check_s)
        on_orphaned()

    watcher = threading.Thread(target=watch, name="asyncserve-lifeline", daemon=True)
    watcher.start()
    return watcher


def exit_now() -> None:
    """End this process at once: a pool process has nothing to hand back once its server is gone."""
    os._exit(1)
