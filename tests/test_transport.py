"""The transport contract, checked on every transport: routing, round trips, byte accounting, failures.

The engine's equivalence tests (test_engine.py) prove a transport inside whole training steps;
these pin down each primitive on its own, so that a broken one is named. Peers are real actors
linked as the engine links its towers (Transport.connect), and the test plays the coordinator.
"""

import os
import signal
import time

import pytest
import ray
import torch

from coordinator.engine.transport import (
    TRANSPORTS,
    CollectiveTransport,
    Exchange,
    ExchangeError,
    ObjectStoreTransport,
    make_transport,
)

CPU = torch.device("cpu")
TIMEOUT = 3.0  # seconds an exchange waits for a peer in these tests


@ray.remote(num_cpus=0)
class Peer:
    """A stand-in for a tower actor: its own copy of the transport, and the calls a tower makes."""

    def __init__(self, transport, index):
        torch.set_num_threads(1)
        self.transport, self.index = transport, index

    def host_rendezvous(self):
        return self.transport.host_rendezvous()

    def join_exchange(self, address, generation, world):
        self.transport.join(address, self.index, world, generation)

    def pid(self):
        return os.getpid()

    def send(self, *tensors):
        sent = [self.transport.send(t) for t in tensors]
        return sent[0] if len(sent) == 1 else tuple(sent)

    def receive(self, delivered, point="conv3"):
        got = self.transport.receive(delivered, self.index, CPU, point)
        return got.tensors, got.foreign_bytes, got.wait_seconds, self.transport.reduce(got)


def peers_for(transport, count):
    peers = [Peer.remote(transport, t) for t in range(count)]
    ray.get([p.pid.remote() for p in peers])  # started, as the engine's towers are before it links them
    transport.connect(peers, generation=0)
    return peers


@pytest.fixture(params=sorted(TRANSPORTS))
def transport(request, ray_session):
    return make_transport(request.param, "cpu", timeout=TIMEOUT)


def feature_map(seed, batch=2, channels=6, size=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=gen).contiguous(memory_format=torch.channels_last)


def test_all_gather_hands_every_tower_every_output_in_tower_order(transport):
    peers = peers_for(transport, 3)
    outputs = [p.send.remote(feature_map(t, channels=4)) for t, p in enumerate(peers)]
    delivered = transport.all_gather(outputs)
    assert len(delivered) == 3
    got = ray.get([p.receive.remote(delivered[t]) for t, p in enumerate(peers)])
    for own, (tensors, foreign, wait, _) in enumerate(got):
        assert len(tensors) == 3
        assert all(torch.equal(tensors[t], feature_map(t, channels=4)) for t in range(3))  # tower order, whoever receives
        assert foreign == 2 * (2 * 4 * 25 * 4)  # two other towers' maps
        assert wait >= 0


def test_feature_maps_arrive_channels_last_and_vectors_as_they_were(transport):
    [peer] = peers_for(transport, 1)
    [[received], *_] = ray.get(peer.receive.remote(transport.all_gather([peer.send.remote(feature_map(7))])[0]))
    assert torch.equal(received, feature_map(7))
    assert received.is_contiguous(memory_format=torch.channels_last)  # the layout the towers compute in
    vector = torch.arange(12.0).reshape(3, 4)
    [[received], *_] = ray.get(peer.receive.remote(transport.all_gather([peer.send.remote(vector)])[0]))
    assert torch.equal(received, vector)


def test_reduce_scatter_hands_each_tower_the_sum_of_the_pieces_of_its_own_output(transport):
    peers = peers_for(transport, 3)
    # partials[src][dst]: tower src's gradient for tower dst's output, marked as 10 * src + dst.
    partials = [
        p.send.options(num_returns=3).remote(*[torch.full((2, 3), 10.0 * src + dst) for dst in range(3)])
        for src, p in enumerate(peers)
    ]
    delivered = transport.reduce_scatter(partials)
    got = ray.get([p.receive.remote(delivered[dst], "fc6") for dst, p in enumerate(peers)])
    for dst, (_, foreign, _, total) in enumerate(got):
        assert torch.equal(total, torch.full((2, 3), 30.0 + 3 * dst))  # the sum over sources
        assert foreign == 2 * 2 * 3 * 4  # two other towers' pieces


def test_object_store_reduce_does_not_write_into_what_it_received(ray_session):
    transport = ObjectStoreTransport()
    ref = ray.put(transport.encode(torch.ones(2, 2)))
    got = transport.receive(Exchange("reduce_scatter", [ref, ref]), 0, CPU)
    assert torch.equal(transport.reduce(got), torch.full((2, 2), 2.0))
    assert torch.equal(got.tensors[0], torch.ones(2, 2))


def test_the_loss_gathers_logits_and_scatters_their_gradient(transport):
    logits = [torch.randn(4, 5), torch.randn(4, 6)]
    gathered = transport.gather([ray.put(transport.encode(t)) for t in logits])  # what the last segment returns
    assert all(torch.equal(a, b) for a, b in zip(gathered, logits))
    handed = transport.scatter(logits)
    assert len(handed) == 2
    for t in range(2):
        assert torch.equal(transport.receive(handed[t], t, CPU).tensors[0], logits[t])  # each tower its own piece only


def test_the_batch_reaches_a_tower_as_it_was_put(transport):
    images = feature_map(3, batch=2, channels=3, size=9)
    [received] = transport.receive(transport.put_images(images), 0, CPU).tensors
    assert torch.equal(received, images)


def test_a_peer_that_never_sends_fails_the_exchange_naming_it_after_the_timeout(transport):
    peers = peers_for(transport, 2)

    @ray.remote
    def never(seconds):
        time.sleep(seconds)

    outputs = [peers[0].send.remote(torch.ones(2, 2)), never.remote(60)]
    start = time.monotonic()
    with pytest.raises(ExchangeError, match=r"tower 0: the all-gather at fc7 timed out after 3 s waiting for tower\(s\) \[1\]"):
        ray.get(peers[0].receive.remote(transport.all_gather(outputs)[0], "fc7"))
    assert time.monotonic() - start < 30  # the timeout, not the sender's minute


def test_a_peer_whose_part_failed_fails_the_exchange_at_once(transport):
    peers = peers_for(transport, 2)

    @ray.remote
    def failing():
        raise ValueError("segment 1 broke")

    outputs = [peers[0].send.remote(torch.ones(2, 2)), failing.remote()]
    start = time.monotonic()
    with pytest.raises(ValueError, match="segment 1 broke"):
        ray.get(peers[0].receive.remote(transport.all_gather(outputs)[0]))
    assert time.monotonic() - start < TIMEOUT  # no waiting out the timeout


def test_collective_a_peer_killed_inside_the_collective_fails_it_and_a_new_generation_rejoins(ray_session):
    transport = CollectiveTransport("gloo", timeout=30)
    peers = peers_for(transport, 2)
    outputs = [p.send.remote(torch.full((2, 2), float(t))) for t, p in enumerate(peers)]
    delivered = transport.all_gather(outputs)
    waiting = peers[0].receive.remote(delivered[0])  # enters the collective; peer 1 never will
    time.sleep(1.0)
    os.kill(ray.get(peers[1].pid.remote()), signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(ExchangeError, match="tower 0: the all-gather at conv3 failed"):
        ray.get(waiting)
    assert time.monotonic() - start < 20  # the closed connection is seen, well before the 30 s timeout
    with pytest.raises(ExchangeError, match="refused: the group broke earlier"):
        ray.get(peers[0].receive.remote(delivered[0]))
    # A replacement joins the next generation, and the survivor with it.
    peers[1] = Peer.remote(transport, 1)
    ray.get(peers[1].pid.remote())
    transport.connect(peers, generation=1)
    outputs = [p.send.remote(torch.full((2, 2), float(t))) for t, p in enumerate(peers)]
    got = ray.get([p.receive.remote(d) for p, d in zip(peers, transport.all_gather(outputs))])
    assert all(torch.equal(tensors[1], torch.full((2, 2), 1.0)) for tensors, *_ in got)


def test_collective_refuses_to_exchange_before_joining(ray_session):
    transport = CollectiveTransport("gloo", timeout=TIMEOUT)
    peer = Peer.remote(transport, 0)  # never connected
    with pytest.raises(ExchangeError, match="has not joined a group"):
        ray.get(peer.receive.remote(transport.all_gather([peer.send.remote(torch.ones(1))])[0]))


def test_auto_is_nccl_collective_with_a_gpu_each_and_the_object_store_elsewhere():
    gpu = make_transport("auto", "gpu")
    assert isinstance(gpu, CollectiveTransport) and gpu.describe() == "collective (nccl)" and gpu.graph_channel == "accelerator"
    assert make_transport("auto", "shared-gpu").describe() == "object_store"  # NCCL takes one rank per GPU
    assert make_transport("auto", "cpu").describe() == "object_store"  # faster than Gloo here: docs/performance.md
    assert make_transport("collective", "cpu").describe() == "collective (gloo)"
    assert make_transport("collective", "shared-gpu", timeout=5).timeout == 5


def test_an_unknown_transport_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown transport 'nccl-over-smoke': choose one of auto, object_store, collective"):
        make_transport("nccl-over-smoke")
