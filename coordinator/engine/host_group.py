"""A process group for towers on one host: the pieces in shared memory, a byte through a pipe to say so.

Gloo moves CPU tensors over loopback TCP through its worker threads, which wake up for every
collective, and a step has nine of them (docs/performance.md, "Exchanges", times it against this
group). Towers of one pair share a host (one node of Ray), so here
each member writes its piece into a file of shared memory (/dev/shm) that the others map, and
tells each of them through a pipe of their own (a FIFO) that it is there; a member reads its
peers' pieces once each has told it. The pipes carry what the group needs beyond bytes:

  - a peer that dies closes its end of the pipes: the others see it at once (the hang-up);
  - a peer that hangs never writes: the others wait `timeout` seconds at most;
  - the write and the read are system calls, which order the memory on every CPU: a piece is
    whole before its byte arrives.

Each member's file holds two slots, used in turn: a member writes collective s + 2 only after
every peer has told it of s + 1, which each does only after it has read s. The file grows (a
new one, the old one removed) when a collective needs more room; every member grows alike.
"""

from __future__ import annotations

import mmap
import os
import select
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

PREFIX = "alexnet-mp-exchange"
# A member that arrives first asks again without sleeping for this long before it blocks: a peer
# that is about to arrive then costs no wake-up (tens of microseconds on a VM), and a late one
# costs this much of a core that would idle anyway.
SPIN_SECONDS = 100e-6


def shared_dir() -> Path:
    """Where the files go: /dev/shm (memory) where there is one, else the temporary folder."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


class HostGroupError(RuntimeError):
    """A collective that could not complete; `late` when the peers did not answer in time."""

    def __init__(self, message: str, late: bool = False):
        super().__init__(message)
        self.late = late


class NoRoom(HostGroupError):
    """The shared-memory folder cannot hold the exchange buffers: a setting to change, not a lost peer."""


class HostGroup:
    """`size` members on one host, met through `store` (a torch.distributed store). Collectives
    are synchronous: all_gather, reduce_scatter and all_reduce, each on a flat CPU tensor."""

    def __init__(self, store, rank: int, size: int, name: str, timeout: float):
        self.rank, self.size, self.timeout = rank, size, timeout
        self.dir, self.name = shared_dir(), f"{PREFIX}-{name}"
        _remove_files_of_dead_processes(self.dir)
        self.peers = [r for r in range(size) if r != rank]
        self.inbox: dict[int, int] = {}  # peer -> the read end of its pipe to this member
        self.outbox: dict[int, int] = {}  # peer -> the write end of this member's pipe to it
        for peer in self.peers:
            path = self._pipe(peer, rank)
            os.mkfifo(path, 0o600)
            self.inbox[peer] = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        _barrier(store, "pipes made", rank, size)
        for peer in self.peers:
            self.outbox[peer] = os.open(self._pipe(rank, peer), os.O_WRONLY | os.O_NONBLOCK)
        _barrier(store, "pipes open", rank, size)
        for peer in self.peers:
            os.unlink(self._pipe(peer, rank))  # open at both ends: nothing else needs its name
        self.turn = 0  # collectives so far: the slot in use is turn % 2
        self.capacity = 0  # bytes a slot holds
        self.version = 0  # of the files, which grow
        self.own: Optional[mmap.mmap] = None
        self.mapped: dict[int, mmap.mmap] = {}  # peer -> its file of this version, once read
        self._old: Optional[Path] = None  # this member's last file, removed once no peer reads it

    def _pipe(self, src: int, dst: int) -> str:
        return str(self.dir / f"{self.name}-{src}-to-{dst}.fifo")

    def _file(self, rank: int, version: int) -> Path:
        return self.dir / f"{self.name}-{rank}-v{version}-pid{os.getpid() if rank == self.rank else '*'}"

    # --- the collectives ---------------------------------------------------------------------------
    def all_gather(self, send: torch.Tensor) -> torch.Tensor:
        """Every member's `send`, one after another in rank order."""
        slot = self._exchange(send)
        out = send.new_empty(self.size * send.numel())
        for r, piece in enumerate(out.view(self.size, -1)):
            piece.copy_(send if r == self.rank else self._slot(r, slot, send))
        return out

    def reduce_scatter(self, send: torch.Tensor) -> torch.Tensor:
        """`send` is `size` rows, one for each member: the sum over the members of this one's row."""
        slot = self._exchange(send)
        width = send.numel() // self.size
        rows = [
            send.view(self.size, -1)[self.rank]
            if r == self.rank
            else self._slot(r, slot, send).view(self.size, -1)[self.rank]
            for r in range(self.size)
        ]
        out = rows[0].to(_wider(send.dtype), copy=True)
        for row in rows[1:]:
            out += row  # in rank order: the same sum on every run; bf16 pieces summed in float32, rounded once
        return out.to(send.dtype).view(width)

    def all_reduce(self, send: torch.Tensor) -> torch.Tensor:
        """The sum of every member's `send`."""
        slot = self._exchange(send)
        out = (send if self.rank == 0 else self._slot(0, slot, send)).to(_wider(send.dtype), copy=True)
        for r in range(1, self.size):
            out += send if r == self.rank else self._slot(r, slot, send)
        return out.to(send.dtype)

    # --- the slots and the pipes ---------------------------------------------------------------------
    def _exchange(self, send: torch.Tensor) -> int:
        """Put `send` in this member's slot, tell every peer, and wait until each has told this one."""
        self._make_room(send.numel() * send.element_size())  # first: a new file starts at slot 0
        slot = self.turn % 2
        self._slot(self.rank, slot, send).copy_(send)
        for peer in self.peers:
            os.write(self.outbox[peer], b"\0")
        self._wait_for_peers()
        self.turn += 1
        if self._old is not None:  # every peer has told of this collective: none reads the last file now
            self._old.unlink(missing_ok=True)
            self._old = None
        return slot

    def _wait_for_peers(self) -> None:
        waiting = set(self.peers)
        poller = select.poll()
        for peer in waiting:
            poller.register(self.inbox[peer], select.POLLIN)
        start = time.monotonic()
        while waiting:
            spinning = time.monotonic() - start < SPIN_SECONDS
            left = self.timeout - (time.monotonic() - start)
            events = poller.poll(0 if spinning else max(0.0, left) * 1000)
            if not events and spinning:
                continue
            if not events:
                raise HostGroupError(f"no word from member(s) {sorted(waiting)} within {self.timeout:g} s", late=True)
            for fd, event in events:
                peer = next(p for p, f in self.inbox.items() if f == fd)
                if event & select.POLLIN and os.read(fd, 1):
                    waiting.discard(peer)
                    poller.unregister(fd)
                elif event & (select.POLLHUP | select.POLLERR):
                    raise HostGroupError(f"member {peer} left the group (its process ended)")

    def _make_room(self, nbytes: int) -> None:
        """Every member calls this with the same sizes in the same order, so all grow alike."""
        if nbytes <= self.capacity:
            return
        if self.own is not None:
            self._old = self._file(self.rank, self.version)
            self._unmap()
            self.turn = 0  # the new file's slots are fresh: no peer reads them yet
        self.version += 1
        self.capacity = max(nbytes, 2 * self.capacity)
        path, size = self._file(self.rank, self.version), 2 * self.capacity
        with open(path, "w+b") as file:
            try:
                # Reserve the pages now: a full tmpfs then fails here, where touching them would kill the
                # process (SIGBUS).
                os.posix_fallocate(file.fileno(), 0, size) if hasattr(os, "posix_fallocate") else file.truncate(size)
            except OSError as error:
                path.unlink(missing_ok=True)
                raise NoRoom(
                    f"no room for {size / 1e6:.0f} MB of exchange buffers in {self.dir} ({error.strerror}): "
                    "give it more (a container's /dev/shm is 64 MB unless set), or use transport gloo"
                ) from None
            self.own = mmap.mmap(file.fileno(), size)

    def _slot(self, rank: int, slot: int, like: torch.Tensor) -> torch.Tensor:
        """Member `rank`'s slot, as a tensor shaped and typed like `like` (a view of shared memory)."""
        if rank == self.rank:
            buffer = self.own
        else:
            if rank not in self.mapped:
                [path] = self.dir.glob(self._file(rank, self.version).name)
                with open(path, "r+b") as file:
                    self.mapped[rank] = mmap.mmap(file.fileno(), 2 * self.capacity)
            buffer = self.mapped[rank]
        count, offset = like.numel(), slot * self.capacity
        return torch.frombuffer(buffer, dtype=like.dtype, count=count, offset=offset).view(like.shape)

    def _unmap(self) -> None:
        for buffer in [self.own, *self.mapped.values()]:
            if buffer is not None:
                try:
                    buffer.close()
                except BufferError:  # a view of it still lives; the mapping goes with it
                    pass
        self.own, self.mapped = None, {}

    def close(self) -> None:
        for fd in [*self.inbox.values(), *self.outbox.values()]:
            os.close(fd)
        self.inbox, self.outbox = {}, {}
        self._unmap()
        for path in (self._old, self._file(self.rank, self.version) if self.version else None):
            if path is not None:
                path.unlink(missing_ok=True)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _wider(dtype: torch.dtype) -> torch.dtype:
    """Where a sum is made: float32 for bfloat16 (8 bits of mantissa would round every addition)."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


def _barrier(store, what: str, rank: int, size: int) -> None:
    store.set(f"{what}/{rank}", "1")
    store.wait([f"{what}/{r}" for r in range(size)])


def _remove_files_of_dead_processes(folder: Path) -> None:
    """Files a killed tower could not remove (its pid is in their name)."""
    for path in folder.glob(f"{PREFIX}-*-pid*"):
        pid = path.name.rsplit("-pid", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True
