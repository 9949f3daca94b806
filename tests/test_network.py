"""The layer table, the single-process reference, and one tower, without Ray."""

import pytest
import torch

from conftest import SMALL, relative_error
from equivalence import towers_in_process
from towers import ALEXNET_2012, LRN, AlexNet, Layer, MaxPool, NetConfig, ReLU, Tower, split_state_dict, with_lrn
from towers.ops import apply_then


def test_parameter_count_is_the_papers():
    model = AlexNet()
    assert sum(p.numel() for p in model.parameters()) == 60_965_224
    assert model.config.parameter_count() == 60_965_224


def test_spatial_sizes_after_each_stage_are_55_27_13_6():
    model = AlexNet().eval()
    sizes = {}
    x = torch.zeros(1, 3, 227, 227)
    with torch.no_grad():
        for s in model.config.shapes:
            if s.layer.kind == "fc":
                break
            x = getattr(model, s.name)(x)
            sizes[f"{s.name} out"] = x.shape[-1]
            x = apply_then(s.layer.then, x, groups=2, dropout=0.5, training=False)
            sizes[f"{s.name} block"] = x.shape[-1]
    assert sizes["conv1 out"] == 55
    assert sizes["conv1 block"] == 27
    assert sizes["conv2 block"] == 13
    assert sizes["conv3 block"] == sizes["conv4 block"] == 13
    assert sizes["conv5 block"] == 6
    assert [(s.layer_size, s.out_size) for s in model.config.shapes[:5]] == [
        (55, 27),
        (27, 13),
        (13, 13),
        (13, 13),
        (13, 6),
    ]


def test_state_dict_is_canonical_order_and_grouped_shapes():
    sd = AlexNet().state_dict()
    names = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    assert list(sd) == [f"{n}.{p}" for n in names for p in ("weight", "bias")]
    assert sd["conv2.weight"].shape == (256, 48, 5, 5)  # groups=2: each filter sees its tower's 48 channels
    assert sd["conv3.weight"].shape == (384, 256, 3, 3)  # both towers
    assert sd["conv4.weight"].shape == (384, 192, 3, 3)
    assert sd["fc6.weight"].shape == (4096, 9216)


def test_paper_initialisation():
    sd = AlexNet(seed=3).state_dict()
    for name in ("conv1", "conv3", "fc6", "fc8"):
        assert sd[f"{name}.weight"].std().item() == pytest.approx(0.01, rel=0.05)
        assert abs(sd[f"{name}.weight"].mean().item()) < 1e-3
    for name in ("conv2", "conv4", "conv5", "fc6", "fc7"):
        assert torch.all(sd[f"{name}.bias"] == 1)
    for name in ("conv1", "conv3", "fc8"):
        assert torch.all(sd[f"{name}.bias"] == 0)


def test_initialisation_is_selectable_and_seeded():
    paper, pytorch = AlexNet(**SMALL, seed=1), AlexNet(**SMALL, seed=1, init="pytorch")
    bound = 1 / (3 * 11 * 11) ** 0.5
    w = pytorch.conv1.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound  # uniform, PyTorch's default bound
    assert not torch.all(pytorch.conv2.bias == 1)
    assert torch.all(paper.conv2.bias == 1)
    assert torch.equal(AlexNet(**SMALL, seed=1).conv1.weight, paper.conv1.weight)
    assert not torch.equal(AlexNet(**SMALL, seed=2).conv1.weight, paper.conv1.weight)
    with pytest.raises(ValueError, match="init must be one of"):
        AlexNet(init="xavier")


def test_towers_start_from_the_references_weights():
    ref = AlexNet(**SMALL, seed=5)
    towers = [Tower(ref.config, t, seed=5) for t in range(2)]
    for t, expected in enumerate(split_state_dict(ref.state_dict(), ref.config)):
        for key, value in towers[t].state_dict().items():
            assert torch.equal(value, expected[key]), key


def test_lrn_never_crosses_the_tower_boundary():
    """Changing tower 1's conv1 filters must leave tower 0's normalised conv1 output untouched."""
    model = AlexNet(**SMALL, init="pytorch").eval()
    x = torch.randn(2, 3, 99, 99)
    shape = model.config.shapes[0]
    half = shape.out_split[0]

    def conv1_block(groups):
        with torch.no_grad():
            return apply_then(shape.layer.then, model.conv1(x), groups=groups, dropout=0, training=False)

    per_tower, across = conv1_block(groups=2), conv1_block(groups=1)
    with torch.no_grad():
        model.conv1.weight[half:] *= 50  # tower 1's channels become huge
    assert torch.equal(conv1_block(groups=2)[:, :half], per_tower[:, :half])
    assert not torch.equal(conv1_block(groups=2)[:, half:], per_tower[:, half:])
    # The same check has teeth: an LRN across all channels lets tower 1 reach tower 0's last channels.
    assert not torch.equal(conv1_block(groups=1)[:, :half], across[:, :half])


def test_two_towers_compute_the_reference_function_in_process():
    ref = AlexNet(**SMALL, init="pytorch").eval()
    x = torch.randn(3, 3, 99, 99)
    assert relative_error(towers_in_process(ref.config, x), ref(x)) < 1e-5


def test_exchange_points_are_conv3_fc6_fc7_fc8():
    cfg = NetConfig()
    assert [seg[0].name for seg in cfg.segments[1:]] == ["conv3", "fc6", "fc7", "fc8"]
    assert [[s.name for s in seg] for seg in cfg.segments[:2]] == [["conv1", "conv2"], ["conv3", "conv4", "conv5"]]


def test_a_variant_is_a_change_of_data():
    caffe = with_lrn(ALEXNET_2012, LRN(k=1.0))
    assert all(op.k == 1.0 for row in caffe for op in row.then if isinstance(op, LRN))
    x = torch.randn(2, 3, 99, 99)
    a = AlexNet(**SMALL, init="pytorch").eval()
    b = AlexNet(**SMALL, init="pytorch", layers=caffe).eval()
    assert not torch.allclose(a(x), b(x))
    # Pool before normalising (CaffeNet's order) on conv1 and conv2: only the table changes.
    pool_first = tuple(
        Layer(r.name, r.kind, r.out, r.sees, r.kernel, r.stride, r.pad, r.bias_init, (ReLU(), MaxPool(), LRN()))
        if r.name in ("conv1", "conv2")
        else r
        for r in ALEXNET_2012
    )
    ref = AlexNet(**SMALL, init="pytorch", layers=pool_first).eval()
    assert relative_error(towers_in_process(ref.config, x), ref(x)) < 1e-5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_classes=1), "num_classes must be at least"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(width=0), "width must be positive"),
        (dict(image_size=30), "too small"),
    ],
)
def test_bad_configs_are_refused_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NetConfig(**kwargs)


def test_odd_class_counts_split_unevenly():
    cfg = NetConfig(num_classes=7, width=0.125, image_size=99)
    assert cfg.shapes[-1].out_split == (4, 3)
    ref = AlexNet(num_classes=7, width=0.125, image_size=99, init="pytorch").eval()
    x = torch.randn(2, 3, 99, 99)
    logits = towers_in_process(ref.config, x)
    assert logits.shape == (2, 7)
    assert relative_error(logits, ref(x)) < 1e-5
