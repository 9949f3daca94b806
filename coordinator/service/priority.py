"""CPU priority inside the server's process: on Linux each thread has its own, and a new thread
takes its creator's.

The server's threads all run at its priority (a thread lowered while it holds the GIL holds every
other one back). A job's thread drives the training towers, so it must never take the priority
of whichever thread asked for it: the ThreadStarter starts it at the server's own.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable


class ThreadStarter:
    """Starts threads at the priority of the thread that made it, whichever thread asks."""

    def __init__(self):
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._start_each, name="thread-starter", daemon=True).start()

    def start(self, target: Callable, args: tuple = (), name: str = "") -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name or None, daemon=True)
        outcome: queue.SimpleQueue = queue.SimpleQueue()
        self._requests.put((thread, outcome))
        error = outcome.get()
        if error is not None:
            raise error
        return thread

    def _start_each(self) -> None:
        while True:
            thread, outcome = self._requests.get()
            try:
                thread.start()
                outcome.put(None)
            except Exception as exc:  # "can't start new thread": the caller's to raise; this one goes on
                outcome.put(exc)
