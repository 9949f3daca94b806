"""The exchanges' contract, on real actors linked as the coordinator links towers: the all-gather
and its backward, the reduce-scatter; the logits' gather; the flag that ends a step at once; a
peer that hangs or dies; a group formed again. Run over shared memory (towers on one host) and
over Gloo (towers on different hosts), the two ways a CPU pair is linked.

The engine's equivalence tests (test_engine.py) prove the exchanges inside whole steps; these
pin down each one on its own, so that a broken one is named.
"""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from coordinator.engine.exchange import exchanges
from coordinator.engine.host_group import PREFIX, shared_dir
from coordinator.engine.links import ExchangeError, ExchangePlan, Link, PeerFailed, backend_for, check_transport

CPU = torch.device("cpu")
TIMEOUT = 3.0  # seconds a collective waits for a peer in these tests


def plan_for(towers: int, channels: int = 4, size: int = 5, classes=(3, 2, 2)) -> ExchangePlan:
    """One exchange point "p" of feature maps, then the logits (each tower's classes)."""
    return ExchangePlan(
        points=("p",),
        stages=("before", "after"),
        piece=(channels * size * size,),
        classes=tuple(classes[:towers]),
        towers=towers,
        backend="gloo",
        timeout=TIMEOUT,
    )


@ray.remote(num_cpus=0)
class Peer:
    """A stand-in for a tower actor: its link to the others, and one step's exchanges."""

    def __init__(self, rank):
        torch.set_num_threads(1)
        self.rank = rank
        self.pair = Link("pair", "tower", "gloo", TIMEOUT)
        self.replicas = Link("replicas", "group", "gloo", TIMEOUT, size=1)

    def pid(self):
        return os.getpid()

    def host(self):
        return self.pair.host()

    def join(self, address, size, generation, one_host):
        self.pair.join(address, self.rank, size, generation, TIMEOUT, one_host)
        return self.pair.kind

    def step(self, plan, x, logits, weight, fail: bool = False):
        """Gather x at "p" and the logits; backward from sum(joined * weight) + 2 * sum(logits).
        With `fail`, raise before the first exchange (the step's own error)."""
        x, logits = x.clone().requires_grad_(), logits.clone().requires_grad_()
        with exchanges(plan, self.pair, self.replicas, self.rank, CPU, batch=len(x), backward=True) as step:
            if fail:
                raise ValueError("this tower's own error")
            joined = step.gather("p", x)
            every = step.gather_logits(logits)
            ((joined * weight).sum() + 2 * every.sum()).backward()
        return (
            joined.detach(),
            joined.is_contiguous(memory_format=torch.channels_last),
            every.detach(),
            x.grad,
            logits.grad,
            step.stats(),
        )


def link(peers, one_host: bool, generation: int = 0) -> list[str]:
    address = ray.get(peers[0].host.remote())
    return ray.get([p.join.remote(address, len(peers), generation, one_host) for p in peers])


def feature_map(seed, batch=2, channels=4, size=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=gen).contiguous(memory_format=torch.channels_last)


def inputs(towers, batch=2, classes=(3, 2, 2)):
    gen = torch.Generator().manual_seed(9 + batch)
    xs = [feature_map(t, batch) for t in range(towers)]
    logits = [torch.randn(batch, classes[t], generator=gen) for t in range(towers)]
    weights = [torch.randn(batch, 4 * towers, 5, 5, generator=gen) for _ in range(towers)]
    return xs, logits, weights


@pytest.fixture(params=[True, False], ids=["shared-memory", "gloo"])
def one_host(request, ray_session):
    return request.param


def test_a_step_gathers_every_piece_in_tower_order_and_its_backward_sums_each_towers_gradient(one_host):
    peers = [Peer.remote(t) for t in range(3)]
    assert link(peers, one_host) == ["shared memory" if one_host else "gloo"] * 3
    plan = plan_for(3)
    xs, logits, weights = inputs(3)
    got = ray.get([p.step.remote(plan, xs[t], logits[t], weights[t]) for t, p in enumerate(peers)])
    for t, (joined, channels_last, every, x_grad, logits_grad, stats) in enumerate(got):
        assert torch.equal(joined, torch.cat(xs, dim=1))  # every tower's piece, in tower order
        assert channels_last  # the layout the towers compute in
        assert torch.equal(every, torch.cat(logits, dim=1))  # uneven splits (3, 2, 2) too
        # reduce-scatter: the sum over the towers of each one's gradient for this tower's channels
        own = slice(4 * t, 4 * t + 4)
        assert torch.allclose(x_grad, sum(w[:, own] for w in weights))
        assert torch.equal(logits_grad, torch.full_like(logits[t], 2.0))  # its own columns, no exchange
        piece = 2 * 4 * 5 * 5 * 4  # batch x channels x 5 x 5, float32
        assert stats["exchange_bytes"][("p", "forward")] == 2 * piece  # the two other towers' pieces
        assert stats["exchange_bytes"][("p", "backward")] == 2 * piece  # their partial gradients for its own
        assert set(stats["compute_seconds"]) == {("before", "forward"), ("after", "forward"), ("after", "backward")}


def test_steps_of_every_size_read_the_slot_of_their_own_collective(one_host):
    """Shared memory grows its slots when a step needs more room, and two slots alternate:
    steps of growing and shrinking batches, each checked (a slot read one collective late fails)."""
    peers = [Peer.remote(t) for t in range(2)]
    link(peers, one_host)
    plan = plan_for(2)
    for batch in (1, 3, 2, 8, 1, 16, 5):
        xs, logits, weights = inputs(2, batch=batch)
        weights = [w[:batch] for w in weights]
        got = ray.get([p.step.remote(plan, xs[t], logits[t], weights[t]) for t, p in enumerate(peers)])
        for t, (joined, _, every, x_grad, *_) in enumerate(got):
            assert torch.equal(joined, torch.cat(xs, dim=1)) and torch.equal(every, torch.cat(logits, dim=1))
            assert torch.allclose(x_grad, sum(w[:, 4 * t : 4 * t + 4] for w in weights))


def test_shared_memory_alternates_its_two_slots_even_when_it_grows():
    """A member writes collective s + 1 while its peers may still read s: the two must never share
    a slot, through every growth of the file (a race that timing alone rarely shows)."""
    import torch.distributed as dist

    from coordinator.engine.host_group import HostGroup

    group = HostGroup(dist.HashStore(), rank=0, size=1, name="slots-test", timeout=TIMEOUT)
    try:
        slots = [(group._exchange(torch.zeros(n)), group.version) for n in (10, 30, 30, 5, 200, 200, 7, 1000, 3)]
        assert all(a != b for a, b in zip(slots, slots[1:])), slots  # (slot, file): never the same twice running
    finally:
        group.close()


def test_a_tower_that_fails_in_its_step_ends_its_peers_step_at_once_and_the_group_stays_usable(one_host):
    peers = [Peer.remote(t) for t in range(2)]
    link(peers, one_host)
    plan = plan_for(2)
    xs, logits, weights = inputs(2)
    start = time.monotonic()
    calls = [p.step.remote(plan, xs[t], logits[t], weights[t], fail=t == 1) for t, p in enumerate(peers)]
    with pytest.raises(ValueError, match="this tower's own error"):
        ray.get(calls[1])
    with pytest.raises(PeerFailed, match=r"tower 0: the all-gather at p: tower\(s\) \[1\] failed in this step"):
        ray.get(calls[0])
    assert time.monotonic() - start < TIMEOUT  # at once, not after the timeout
    # Both played the step's collectives to the end: the next step needs no new group.
    got = ray.get([p.step.remote(plan, xs[t], logits[t], weights[t]) for t, p in enumerate(peers)])
    assert all(torch.equal(joined, torch.cat(xs, dim=1)) for joined, *_ in got)


def test_a_peer_that_never_comes_fails_the_exchange_naming_it_after_the_timeout(one_host):
    peers = [Peer.remote(t) for t in range(2)]
    link(peers, one_host)
    xs, logits, weights = inputs(2)
    start = time.monotonic()
    with pytest.raises(
        ExchangeError, match=r"tower 0: the all-gather at p timed out after 3 s waiting for tower\(s\) \[1\]"
    ):
        ray.get(peers[0].step.remote(plan_for(2), xs[0], logits[0], weights[0]))
    assert time.monotonic() - start < 20


def test_a_peer_killed_inside_a_collective_fails_it_and_a_new_generation_rejoins(one_host):
    peers = [Peer.remote(t) for t in range(2)]
    link(peers, one_host)
    plan = plan_for(2)
    xs, logits, weights = inputs(2)
    waiting = peers[0].step.remote(plan, xs[0], logits[0], weights[0])  # enters the all-gather; peer 1 never will
    time.sleep(1.0)
    os.kill(ray.get(peers[1].pid.remote()), signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(ExchangeError, match=r"tower 0: the all-gather at p failed \(tower\(s\) \[1\] gone\?\)"):
        ray.get(waiting)
    assert time.monotonic() - start < TIMEOUT  # the closed pipe or socket is seen at once
    with pytest.raises(ExchangeError, match="refused: the group broke earlier"):
        ray.get(peers[0].step.remote(plan, xs[0], logits[0], weights[0]))
    peers[1] = Peer.remote(1)  # a replacement joins the next generation, and the survivor with it
    link(peers, one_host, generation=1)
    got = ray.get([p.step.remote(plan, xs[t], logits[t], weights[t]) for t, p in enumerate(peers)])
    assert all(torch.equal(joined, torch.cat(xs, dim=1)) for joined, *_ in got)


def test_a_tower_refuses_to_exchange_before_it_is_linked(ray_session):
    peer = Peer.remote(0)
    xs, logits, weights = inputs(2)
    with pytest.raises(ExchangeError, match="has not joined its pair"):
        ray.get(peer.step.remote(plan_for(2), xs[0], logits[0], weights[0]))


def test_shared_memory_leaves_no_file_behind_and_clears_those_of_killed_towers(ray_session):
    stale = shared_dir() / f"{PREFIX}-0-pair-0-0-v1-pid999999999"  # a tower killed before it could remove it
    stale.write_bytes(b"x")
    peers = [Peer.remote(t) for t in range(2)]
    link(peers, one_host=True)
    xs, logits, weights = inputs(2)
    ray.get([p.step.remote(plan_for(2), xs[t], logits[t], weights[t]) for t, p in enumerate(peers)])
    assert not stale.exists()
    ours = [
        f for f in shared_dir().glob(f"{PREFIX}-*") if any(f"pid{ray.get(p.pid.remote())}" in f.name for p in peers)
    ]
    assert len(ours) == 2  # one file of slots for each tower while the group lives
    for p in peers:
        ray.kill(p)
    time.sleep(1)
    link([Peer.remote(t) for t in range(2)], one_host=True)  # the next group's members clear what the killed ones left
    assert not any(f.exists() for f in ours)


def test_auto_is_nccl_with_a_gpu_each_and_gloo_elsewhere_and_retired_transports_read_as_auto(caplog):
    # (backend, shared memory between towers on one host)
    assert backend_for("auto", "gpu") == ("nccl", False)
    assert backend_for("auto", "shared-gpu") == ("gloo", True)  # NCCL takes one rank per GPU
    assert backend_for("auto", "cpu") == ("gloo", True)
    assert backend_for("gloo", "cpu") == ("gloo", False)
    with caplog.at_level(logging.WARNING):
        assert backend_for("object_store", "cpu") == (
            "gloo",
            True,
        )  # saved in recipes and checkpoints before the one-call step
        assert backend_for("collective", "gpu") == ("nccl", False)
    assert "transport 'object_store' was retired" in caplog.text
    with pytest.raises(ValueError, match="transport nccl needs a GPU for each tower, and these towers are on cpu"):
        backend_for("nccl", "cpu")
    with pytest.raises(ValueError, match="unknown transport 'nccl-over-smoke': choose one of auto, gloo, nccl"):
        check_transport("nccl-over-smoke")


_NO_ROOM = """
import resource, signal, torch, torch.distributed as dist
from coordinator.engine.host_group import HostGroup, NoRoom
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full /dev/shm, as a container's 64 MB would be
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
group = HostGroup(dist.HashStore(), rank=0, size=1, name="no-room-test", timeout=1)
group.all_gather(torch.zeros(1000))  # 4 KB: room
try:
    group.all_gather(torch.zeros(1_000_000))  # 4 MB: none
except NoRoom as error:
    print(error)
group.close()
"""


def test_shared_memory_without_room_says_so_instead_of_crashing():
    run = subprocess.run(
        [sys.executable, "-c", _NO_ROOM],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "no room for 8 MB of exchange buffers in" in run.stdout and "or use transport gloo" in run.stdout
