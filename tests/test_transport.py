"""The transport contract, checked on every transport: routing, round trips and byte accounting.

The engine's equivalence tests (test_engine.py) prove a transport inside whole training steps;
these pin down each primitive on its own, so that a broken one is named.
"""

import pytest
import ray
import torch

from coordinator.engine.transport import TRANSPORTS, make_transport

CPU = torch.device("cpu")


@pytest.fixture(params=sorted(TRANSPORTS))
def transport(request, ray_session):
    return make_transport(request.param)


@ray.remote
def sender(transport, tensor):
    """A stand-in for a tower's method: what it returns is what `send` made."""
    return transport.send(tensor)


def feature_map(seed, batch=2, channels=6, size=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=gen).contiguous(memory_format=torch.channels_last)


def test_all_gather_hands_every_tower_every_output_in_tower_order(transport):
    outputs = [sender.remote(transport, feature_map(t, channels=3 + t)) for t in range(3)]
    delivered = transport.all_gather(outputs)
    assert len(delivered) == 3
    for own in range(3):
        got = transport.receive(delivered[own], own, CPU)
        assert [t.shape[1] for t in got.tensors] == [3, 4, 5]  # tower order, whoever receives
        assert all(torch.equal(got.tensors[t], feature_map(t, channels=3 + t)) for t in range(3))
        assert got.foreign_bytes == sum(2 * (3 + t) * 25 * 4 for t in range(3) if t != own)
        assert got.wait_seconds >= 0


def test_feature_maps_arrive_channels_last_and_vectors_as_they_were(transport):
    [[piece]] = transport.all_gather([sender.remote(transport, feature_map(7))])
    [received] = transport.receive([piece], 0, CPU).tensors
    assert received.is_contiguous(memory_format=torch.channels_last)  # the layout the towers compute in
    vector = torch.arange(12.0).reshape(3, 4)
    [[piece]] = transport.all_gather([sender.remote(transport, vector)])
    assert torch.equal(transport.receive([piece], 0, CPU).tensors[0], vector)


def test_reduce_scatter_hands_each_tower_the_pieces_of_its_own_output(transport):
    # partials[src][dst]: tower src's gradient for tower dst's output, marked as 10 * src + dst.
    partials = [[sender.remote(transport, torch.full((2, 3), 10.0 * src + dst)) for dst in range(3)] for src in range(3)]
    delivered = transport.reduce_scatter(partials)
    for dst in range(3):
        got = transport.receive(delivered[dst], dst, CPU)
        assert [t[0, 0].item() for t in got.tensors] == [10.0 * src + dst for src in range(3)]
        assert torch.equal(transport.reduce(got), torch.full((2, 3), 30.0 + 3 * dst))  # the sum over sources
        assert got.foreign_bytes == 2 * 2 * 3 * 4  # two other towers' pieces


def test_reduce_does_not_write_into_what_it_received(transport):
    [[piece]] = transport.all_gather([sender.remote(transport, torch.ones(2, 2))])
    got = transport.receive([piece, piece], 0, CPU)
    assert torch.equal(transport.reduce(got), torch.full((2, 2), 2.0))
    assert torch.equal(got.tensors[0], torch.ones(2, 2))


def test_the_loss_gathers_logits_and_scatters_their_gradient(transport):
    logits = [torch.randn(4, 5), torch.randn(4, 6)]
    gathered = transport.gather([sender.remote(transport, t) for t in logits])
    assert all(torch.equal(a, b) for a, b in zip(gathered, logits))
    handed = transport.scatter(logits)
    assert len(handed) == 2
    for t in range(2):
        assert torch.equal(transport.receive(handed[t], t, CPU).tensors[0], logits[t])  # each tower its own piece only


def test_the_batch_reaches_a_tower_as_it_was_put(transport):
    images = feature_map(3, batch=2, channels=3, size=9)
    [received] = transport.receive(transport.put_images(images), 0, CPU).tensors
    assert torch.equal(received, images)


def test_an_unknown_transport_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown transport 'nccl-over-smoke'.*object_store"):
        make_transport("nccl-over-smoke")
