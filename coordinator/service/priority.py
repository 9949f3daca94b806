"""CPU priority inside the server's process: on Linux each thread has its own, and a new thread
takes its creator's.

With --serving-nice the gRPC handler threads (they decode the images to classify) run below the
training towers. A job started from one of them must not inherit that: its thread drives the
training towers, and at the serving priority every step waits behind the classification load.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Callable


def lower_this_thread(niceness: int) -> None:
    """Run the calling thread at `niceness` (only ever lower: raising needs privileges)."""
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)


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
