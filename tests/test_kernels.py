"""The fused ReLU -> LRN -> max-pool: gradient checks in float64, and agreement with PyTorch's ops."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import towers.kernels as kernels
from conftest import relative_error
from towers.inputs import crops_of
from towers.kernels import NormBlock, fused_norm
from towers.layers import LRN, MaxPool, ReLU
from towers.ops import fuse_norm_blocks

BLOCKS = [
    NormBlock(True, LRN(), MaxPool()),  # the paper's conv1/conv2 block
    NormBlock(False, LRN(5, 0.3, 0.6, 1.0), None),  # large alpha so the cross-channel term matters
    NormBlock(True, LRN(4, 0.5, 0.75, 1.0), MaxPool(2, 2)),  # even window: asymmetric neighbours
    NormBlock(False, LRN(3, 0.2, 0.75, 2.0), MaxPool(3, 1)),  # overlapping windows, stride 1
]
IMPLEMENTATIONS = {
    "c": lambda x, b: kernels._NormC.apply(x, b),
    "torch": kernels._norm_torch,
}


def plain_pytorch(x, block):
    if block.relu:
        x = F.relu(x)
    x = F.local_response_norm(x, block.lrn.size, block.lrn.alpha, block.lrn.beta, block.lrn.k)
    return F.max_pool2d(x, block.pool.kernel, block.pool.stride) if block.pool else x


def test_the_c_kernel_is_built_here():
    # CI machines have a C compiler: the fast path must be the one under test, not the fallback.
    assert kernels._library() is not None


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_gradcheck_float64(impl, block):
    x = (torch.randn(2, 7, 9, 9, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: IMPLEMENTATIONS[impl](t, block), (x,))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_matches_plain_pytorch_float64(impl, block):
    x = (torch.randn(3, 10, 13, 13, dtype=torch.float64) * 4).requires_grad_()
    expected = plain_pytorch(x, block)
    grad = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    actual = IMPLEMENTATIONS[impl](x, block)
    (actual_grad,) = torch.autograd.grad(actual, x, grad)
    assert relative_error(actual, expected) < 1e-12
    assert relative_error(actual_grad, expected_grad) < 1e-12


def test_float32_on_the_papers_shapes():
    block = NormBlock(True, LRN(), MaxPool())
    x = (torch.randn(4, 48, 55, 55) * 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    expected = plain_pytorch(x, block)
    actual = fused_norm(x, block)
    assert actual.shape == (4, 48, 27, 27)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(actual, expected) < 1e-6


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.pool], ids=str)
def test_ties_in_a_pooling_window_route_the_gradient_like_pytorch(block):
    # Few distinct values (and ReLU's zeros) make many windows hold their maximum twice: the
    # gradient must reach the same element max_pool2d's backward picks, the first in the window.
    x = torch.randint(-2, 3, (2, 6, 11, 11)).to(torch.float64).requires_grad_()
    expected = plain_pytorch(x, block)
    grad = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    (actual_grad,) = torch.autograd.grad(kernels._NormC.apply(x, block), x, grad)
    assert relative_error(actual_grad, expected_grad) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_inputs_give_the_gradients_pytorch_gives(dtype):
    block = NormBlock(True, LRN(), MaxPool())
    x = torch.randn(2, 6, 9, 9, dtype=dtype)
    x[0, 1, 0, 1] = x[0, 1, 2, 0] = x[1, 4, 5, 5] = float("nan")  # two in one pooling window
    grads = []
    for fn in (plain_pytorch, kernels._NormC.apply):
        leaf = x.clone().requires_grad_()
        fn(leaf, block).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], equal_nan=True)


def test_a_pooling_window_too_big_for_a_byte_still_matches_pytorch():
    # 17 x 17 = 289 positions do not fit the byte the C kernel saves per output: fused_norm must not use it.
    block = NormBlock(True, LRN(), MaxPool(17, 1))
    x = torch.randn(2, 4, 19, 19, dtype=torch.float64).requires_grad_()
    expected = plain_pytorch(x, block)
    grad = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    actual = fused_norm(x, block)
    (actual_grad,) = torch.autograd.grad(actual, x, grad)
    assert relative_error(actual, expected) < 1e-12
    assert relative_error(actual_grad, expected_grad) < 1e-12


def test_nan_propagates_like_pytorch():
    block = NormBlock(True, LRN(), MaxPool())
    x = torch.randn(1, 6, 7, 7)
    x[0, 2, 3, 3] = float("nan")
    assert torch.equal(fused_norm(x, block).isnan(), plain_pytorch(x, block).isnan())


def test_multithreaded_chunks_agree_with_one_thread():
    block = NormBlock(True, LRN(), MaxPool())
    x = torch.randn(5, 16, 15, 15).requires_grad_()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused_norm(x, block)
        (g_one,) = torch.autograd.grad(one.sum(), x)
        torch.set_num_threads(2)
        two = fused_norm(x, block)
        (g_two,) = torch.autograd.grad(two.sum(), x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two) and torch.equal(g_one, g_two)


def test_runs_of_ops_are_fused_where_they_can_be():
    lrn, pool = LRN(), MaxPool()
    assert fuse_norm_blocks((ReLU(), lrn, pool)) == [NormBlock(True, lrn, pool)]
    assert fuse_norm_blocks((ReLU(), pool, lrn)) == [ReLU(), pool, NormBlock(False, lrn, None)]
    assert fuse_norm_blocks((ReLU(), pool)) == [ReLU(), pool]


@pytest.mark.parametrize("size, normalise", [(227, True), (99, False), (7, True), (1, False)])
def test_crops_become_the_same_float_pixels_in_the_c_kernel_as_in_pytorchs_add_and_divide(size, normalise, monkeypatch):
    """The towers make float pixels from the crops that travel (towers.inputs.Crops): bit for bit
    what the data pipeline made before, in the C kernel (a block of 16 pixels at a time, and the
    rest) and in the PyTorch fallback alike."""
    rng = np.random.default_rng(size)
    mean, std = (123.68, 116.779, 103.939), (58.393, 57.12, 57.375)
    crops = crops_of(
        rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8),
        rng.normal(0, 20, (3, 3)),
        mean,
        std if normalise else None,
    )
    # The data pipeline's arithmetic before the crops travelled: float32 add, then divide.
    expected = torch.from_numpy(crops.pixels).permute(0, 3, 1, 2).float()
    expected = expected.add_(torch.as_tensor(crops.offsets)[:, :, None, None])
    if normalise:
        expected = expected.div_(torch.tensor(std, dtype=torch.float32)[None, :, None, None])
    fast = crops.to_tensor()
    assert torch.equal(fast, expected) and fast.is_contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(kernels, "_library", lambda: None)  # no compiler: PyTorch's ops
    assert torch.equal(crops.to_tensor(), expected)
