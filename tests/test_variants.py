"""The network's published variants: each table against its source's lines, and each trained through
the engine against the reference. A published version of each is served by towers of its own
network in tests/test_export.py, on that module's server (served_as_its_own_network, here).

The variants share their layer shapes, so counts cannot tell them apart: the rows are rebuilt here
from the quoted lines of each source's configuration and must equal the table's rows.
"""

import configparser
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL, relative_error
from coordinator import ModelParallelAlexNet
from coordinator.training import run_spec
from coordinator.training.checkpoints import resume_spec
from towers import LRN, NETWORKS, AlexNet, Dropout, Layer, MaxPool, NetConfig, ReLU, SpatialLRN, paper_sgd
from towers.layers import CAFFE_BVLC_ALEXNET, CUDA_CONVNET_2012, NUM_CLASSES
from towers.ops import apply_then
from towers.portable import from_safetensors, to_safetensors

# github.com/computerhistory/AlexNet-Source-Code, layers/layers-145.cfg: tower a's layers (gpu=0),
# in the file's order. Lines that place or tune the CUDA kernels (partialSum, sharedBiases, gpu,
# groups, randSparse) are left out.
LAYERS_145 = """
[conv1a]
type=conv
inputs=data
channels=3
filters=48
padding=0
stride=4
filterSize=11
initW=0.01

[rnorm1a]
type=cmrnorm
inputs=conv1a
channels=48
size=5

[pool1a]
type=pool
pool=max
inputs=rnorm1a
sizeX=3
stride=2
channels=48
neuron=relu

[conv2a]
type=conv
inputs=pool1a
filters=128
padding=2
stride=1
filterSize=5
channels=48
initW=0.01
initB=1
neuron=relu

[rnorm2a]
type=cmrnorm
inputs=conv2a
channels=128
size=5

[cnorm2a]
type=rnorm
inputs=rnorm2a
channels=128
size=5

[pool2a]
type=pool
pool=max
inputs=cnorm2a
sizeX=3
stride=2
channels=128

[conv3a]
type=conv
inputs=pool2a,pool2b
filters=192,192
padding=1,1
stride=1,1
filterSize=3,3
channels=128,128
initW=0.03,0.03
neuron=relu

[conv4a]
type=conv
inputs=conv3a
filters=192
padding=1
stride=1
filterSize=3
channels=192
neuron=relu
initW=0.03
initB=1

[conv5a]
type=conv
inputs=conv4a
filters=128
padding=1
stride=1
filterSize=3
channels=192
initW=0.03
initB=1

[pool3a]
type=pool
pool=max
inputs=conv5a
sizeX=3
stride=2
channels=128
neuron=relu

[fc2048a]
type=fc
inputs=pool3a,pool3b
outputs=2048
initW=0.01,0.01
initB=1
neuron=relu

[hs1a]
type=hs
keep=0.5
inputs=fc2048a

[fc2048ba]
type=fc
inputs=hs1a,hs1b
outputs=2048
initW=0.01,0.01
initB=1
neuron=relu

[hs2a]
type=hs
keep=0.5
inputs=fc2048ba

[fc1000]
type=fc
outputs=1000
inputs=hs2a,hs2b
initW=0.01,0.01
"""

# The same repository, layers/layer-params-145.cfg: the norms' parameters.
LAYER_PARAMS_145 = """
[rnorm1a]
scale=0.0001
pow=0.75
minDiv=2

[rnorm2a]
scale=0.0001
pow=0.75
minDiv=2

[cnorm2a]
scale=0.001
pow=0.75
"""

# github.com/BVLC/caffe, models/bvlc_alexnet/train_val.prototxt: the layers from conv1 to fc8, in
# the file's order, less each learned layer's `param { lr_mult decay_mult }` blocks (the recipe's).
BVLC_ALEXNET = """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 96 kernel_size: 11 stride: 4
    weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" value: 0 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "norm1" type: "LRN" bottom: "conv1" top: "norm1"
  lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "pool1" type: "Pooling" bottom: "norm1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 256 pad: 2 kernel_size: 5 group: 2
    weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "norm2" type: "LRN" bottom: "conv2" top: "norm2"
  lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "pool2" type: "Pooling" bottom: "norm2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "conv3" type: "Convolution" bottom: "pool2" top: "conv3"
  convolution_param { num_output: 384 pad: 1 kernel_size: 3
    weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" value: 0 } } }
layer { name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }
layer { name: "conv4" type: "Convolution" bottom: "conv3" top: "conv4"
  convolution_param { num_output: 384 pad: 1 kernel_size: 3 group: 2
    weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu4" type: "ReLU" bottom: "conv4" top: "conv4" }
layer { name: "conv5" type: "Convolution" bottom: "conv4" top: "conv5"
  convolution_param { num_output: 256 pad: 1 kernel_size: 3 group: 2
    weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu5" type: "ReLU" bottom: "conv5" top: "conv5" }
layer { name: "pool5" type: "Pooling" bottom: "conv5" top: "pool5"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool5" top: "fc6"
  inner_product_param { num_output: 4096
    weight_filler { type: "gaussian" std: 0.005 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "drop6" type: "Dropout" bottom: "fc6" top: "fc6" dropout_param { dropout_ratio: 0.5 } }
layer { name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7"
  inner_product_param { num_output: 4096
    weight_filler { type: "gaussian" std: 0.005 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu7" type: "ReLU" bottom: "fc7" top: "fc7" }
layer { name: "drop7" type: "Dropout" bottom: "fc7" top: "fc7" dropout_param { dropout_ratio: 0.5 } }
layer { name: "fc8" type: "InnerProduct" bottom: "fc7" top: "fc8"
  inner_product_param { num_output: 1000
    weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" value: 0 } } }
"""
# src/caffe/proto/caffe.proto, message LRNParameter: the prototxt leaves k to its default.
CAFFE_LRN_K = "  optional float k = 5 [default = 1.];"


NAMES_145 = {
    "conv1a": "conv1",
    "conv2a": "conv2",
    "conv3a": "conv3",
    "conv4a": "conv4",
    "conv5a": "conv5",
    "fc2048a": "fc6",
    "fc2048ba": "fc7",
    "fc1000": "fc8",
}


def then_plus(row: Layer, op) -> Layer:
    return replace(row, then=row.then + (op,))


def cuda_convnet_rows(layers: str, params: str) -> tuple[Layer, ...]:
    """The table's rows as the 2012 code's files define them, from one tower's layers."""
    cfg = configparser.ConfigParser(strict=False)
    cfg.optionxform = str  # the keys are camelCase
    cfg.read_string(layers)
    cfg.read_string(params)
    rows, previous = [], None
    for name in cfg.sections():
        s = cfg[name]
        inputs = s["inputs"].split(",")
        if s["type"] in ("conv", "fc"):
            rows.append(weight_row_145(NAMES_145[name], s, inputs))
        else:
            assert inputs == [previous], f"{name} does not take {previous}: the chain is not linear"
            rows[-1] = then_plus(rows[-1], op_145(s))
        if s.get("neuron") == "relu":  # cuda-convnet applies a layer's neuron to that layer's output
            rows[-1] = then_plus(rows[-1], ReLU())
        previous = name
    return tuple(rows)


def op_145(s):
    """A parameter-free layer of the 2012 code as the table's op."""
    if s["type"] == "cmrnorm":
        return LRN(int(s["size"]), float(s["scale"]), float(s["pow"]), float(s["minDiv"]))
    if s["type"] == "rnorm":
        return SpatialLRN(int(s["size"]), float(s["scale"]), float(s["pow"]), 1.0)
    if s["type"] == "pool":
        assert s["pool"] == "max"
        return MaxPool(int(s["sizeX"]), int(s["stride"]))
    return {"hs": Dropout}[s["type"]]()


def weight_row_145(name: str, s, inputs: list[str]) -> Layer:
    def value(key: str) -> str:
        values = set(s[key].split(","))  # one per input, alike here
        assert len(values) == 1
        return values.pop()

    sees = "image" if inputs == ["data"] else "both" if len(inputs) > 1 else "own"
    init = dict(bias_init=float(s.get("initB", "0")), weight_std=float(value("initW")))
    if s["type"] == "conv":
        kernel, stride, pad = int(value("filterSize")), int(value("stride")), int(value("padding"))
        return Layer(name, "conv", 2 * int(value("filters")), sees, kernel, stride, pad, **init)
    outputs = int(s["outputs"])  # one tower's half, but fc1000's: it is whole, on one GPU
    return Layer(name, "fc", NUM_CLASSES if outputs == 1000 else 2 * outputs, sees, **init)


def prototxt_layers(text: str) -> list[dict]:
    """Caffe's text format, as much as the quoted lines use: `key: value` and `key { ... }`, nested."""
    tokens = iter(re.findall(r'"[^"]*"|[{}]|[\w.]+:?', text))

    def message() -> dict:
        fields = {}
        for token in tokens:
            if token == "}":
                break
            if token.endswith(":"):
                fields[token[:-1]] = next(tokens).strip('"')
            else:
                assert next(tokens) == "{"
                fields.setdefault(token, []).append(message())
        return fields

    return message()["layer"]


def caffe_rows(text: str, lrn_k: float) -> tuple[Layer, ...]:
    """The table's rows as bvlc_alexnet defines them; `lrn_k` is LRN's k where the prototxt leaves it out."""
    rows = []
    for layer in prototxt_layers(text):
        kind = layer["type"]
        if kind == "Convolution":
            p = layer["convolution_param"][0]
            sees = "image" if layer["bottom"] == "data" else "own" if p.get("group") == "2" else "both"
            kernel, stride, pad = int(p["kernel_size"]), int(p.get("stride", 1)), int(p.get("pad", 0))
            rows.append(Layer(layer["name"], "conv", int(p["num_output"]), sees, kernel, stride, pad, **_init(p)))
        elif kind == "InnerProduct":
            p = layer["inner_product_param"][0]
            out = NUM_CLASSES if layer["name"] == "fc8" else int(p["num_output"])
            rows.append(Layer(layer["name"], "fc", out, "both", **_init(p)))
        elif kind == "LRN":
            q = layer["lrn_param"][0]
            lrn = LRN(int(q["local_size"]), float(q["alpha"]), float(q["beta"]), float(q.get("k", lrn_k)))
            rows[-1] = then_plus(rows[-1], lrn)
        elif kind == "Pooling":
            q = layer["pooling_param"][0]
            assert q["pool"] == "MAX"
            rows[-1] = then_plus(rows[-1], MaxPool(int(q["kernel_size"]), int(q["stride"])))
        else:
            rows[-1] = then_plus(rows[-1], {"ReLU": ReLU, "Dropout": Dropout}[kind]())
    return tuple(rows)


def _init(param: dict) -> dict:
    weights, biases = param["weight_filler"][0], param["bias_filler"][0]
    assert weights["type"] == "gaussian" and biases["type"] == "constant"
    return dict(bias_init=float(biases["value"]), weight_std=float(weights["std"]))


def test_the_2012_codes_table_is_its_layers_145():
    assert CUDA_CONVNET_2012 == cuda_convnet_rows(LAYERS_145, LAYER_PARAMS_145)


def test_caffes_table_is_bvlc_alexnet():
    k = float(re.search(r"default = ([\d.]+)\]", CAFFE_LRN_K).group(1))
    assert CAFFE_BVLC_ALEXNET == caffe_rows(BVLC_ALEXNET, lrn_k=k)


def cross_map_norm_as_the_kernels_define_it(x, size, add_scale, power, min_div):
    """cuda-convnet's cmrnorm kernel (and Caffe's LRN, whose window is the same for odd sizes): each
    channel f over channels [f - size//2, f - size//2 + size) cut to the layer's, divided by
    (min_div + add_scale * sum of squares) ** power. layer.py passes add_scale = scale / size."""
    out = torch.empty_like(x)
    for f in range(x.shape[1]):
        window = x[:, max(0, f - size // 2) : min(x.shape[1], f - size // 2 + size)]
        out[:, f] = x[:, f] * (min_div + add_scale * (window**2).sum(1)) ** -power
    return out


def spatial_norm_as_the_kernel_defines_it(x, size, add_scale, power):
    """cuda-convnet's rnorm kernel: each pixel over its size x size window cut to the map, divided
    by (1 + add_scale * sum of squares) ** power. layer.py passes add_scale = scale / size**2."""
    out = torch.empty_like(x)
    h, w = x.shape[2:]
    for i in range(h):
        for j in range(w):
            rows, cols = (
                slice(max(0, i - size // 2), i - size // 2 + size),
                slice(max(0, j - size // 2), j - size // 2 + size),
            )
            out[:, :, i, j] = x[:, :, i, j] * (1 + add_scale * (x[:, :, rows, cols] ** 2).sum((2, 3))) ** -power
    return out


def test_the_norms_of_the_table_are_the_sources_norms():
    x = torch.randn(2, 12, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 30
    # cmrnorm as rnorm1a (size=5, scale=0.0001, pow=0.75, minDiv=2), and Caffe's LRN (k=1).
    for k in (2.0, 1.0):
        ours = apply_then((LRN(5, 1e-4, 0.75, k),), x, groups=1, dropout=0.0, training=False)
        assert torch.allclose(ours, cross_map_norm_as_the_kernels_define_it(x, 5, 1e-4 / 5, 0.75, k), rtol=1e-12)
    # rnorm as cnorm2a (size=5, scale=0.001, pow=0.75): SpatialLRN, which the paper's table lacks.
    ours = apply_then((SpatialLRN(5, 1e-3, 0.75, 1.0),), x, groups=1, dropout=0.0, training=False)
    expected = spatial_norm_as_the_kernel_defines_it(x, 5, 1e-3 / 25, 0.75)
    assert torch.allclose(ours, expected, rtol=1e-12) and not torch.allclose(ours, x, rtol=1e-3)
    with pytest.raises(ValueError, match="odd"):
        SpatialLRN(size=4)


def test_the_recipe_names_the_network_and_a_resume_keeps_it():
    assert run_spec("paper").recipe.network == "paper"  # the default
    assert run_spec("demo", {"network": "caffe"}).recipe.network == "caffe"
    with pytest.raises(ValueError, match=r"network must be one of paper, cuda-convnet-2012, caffe, got 'vgg"):
        run_spec("demo", {"network": "vgg" * 100})
    saved = {"recipe": {"network": "caffe", "width": 0.25}}
    assert resume_spec(saved, {"epochs": "3"}).recipe.network == "caffe"
    with pytest.raises(ValueError, match="network cannot change"):
        resume_spec(saved, {"network": "paper"})
    assert resume_spec({"recipe": {"width": 0.25}}).recipe.network == "paper"  # a checkpoint from before the variants


VARIANTS = [name for name in NETWORKS if name != "paper"]  # the paper's: tests/test_engine.py


# A rebuilt engine may change its classes and width too: one variant is rebuilt with other shapes.
OTHER_SHAPES = {"caffe": dict(num_classes=6, width=0.0625)}


def test_each_variant_trains_through_the_engine_as_the_reference_does(ray_session):
    """Two SGD steps with dropout, in float64, from each network's own initialisation: one engine,
    rebuilt in place for each variant, which starts as a new engine of that network would."""
    engine = ModelParallelAlexNet(**SMALL, seed=3, dtype=torch.float64)
    try:
        pids = [info["pid"] for info in engine.tower_info]
        for network in VARIANTS:
            net = dict(SMALL, network=network, **OTHER_SHAPES.get(network, {}))
            engine.rebuild(NetConfig(**net))
            trains_as_the_reference(engine, AlexNet(**net, seed=3).double())
        assert [info["pid"] for info in engine.tower_info] == pids  # the same processes throughout
    finally:
        engine.shutdown()


def trains_as_the_reference(engine, reference) -> None:
    """Two steps of the engine equal the reference's, from equal weights; and the reference's weights,
    through a safetensors file, load into the engine bit for bit."""
    assert engine.config.layers == reference.config.layers
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    assert all(torch.equal(engine.state_dict()[k], start[k]) for k in start)
    optimizer = paper_sgd(reference, lr=0.01)
    for step in range(2):
        gen = torch.Generator().manual_seed(step)
        images = torch.randn(4, 3, 99, 99, generator=gen, dtype=torch.float64) * 60  # the pixels' scale
        labels = torch.randint(0, reference.config.num_classes, (4,), generator=gen)
        optimizer.zero_grad()
        loss = F.cross_entropy(reference(images, dropout_seed=step), labels)
        loss.backward()
        optimizer.step()
        assert engine.train_step(images, labels, dropout_seed=step) == pytest.approx(loss.item(), rel=1e-10)
    actual, expected = engine.state_dict(), reference.state_dict()
    assert max(relative_error(actual[k], expected[k]) for k in expected) < 1e-10
    assert not torch.equal(expected["conv1.weight"], start["conv1.weight"])  # it really trained
    assert not all(torch.equal(actual[k], expected[k]) for k in expected)  # rounding apart, so the load below shows
    state, _, _ = from_safetensors(to_safetensors(expected, reference.config))
    engine.load_state_dict(state)
    assert all(torch.equal(engine.state_dict()[k], expected[k]) for k in expected)


def served_as_its_own_network(server, client, network: str, tmp_path) -> None:
    """The version served now runs on towers of `network`, and answers as that network's reference."""
    tensor = np.random.default_rng(0).normal(0, 60, (3, 227, 227)).astype(np.float32)
    response = client.classify([tensor], top_k=10)
    engine = server.classifier.engine
    assert engine.config.network == network and engine.config.layers == NETWORKS[network]
    info = client.info()
    for row, layer in zip(NETWORKS[network], info.layers):
        assert [op.split("(")[0] for op in layer.then] == [type(op).__name__ for op in row.then], layer.name
    # Its export says which network it is, and the weights in it, on that network, give Classify's numbers.
    client.export(tmp_path / f"{network}.safetensors", "safetensors")
    state, config, meta = from_safetensors((tmp_path / f"{network}.safetensors").read_bytes())
    assert config.network == meta["network_variant"] == network
    reference = AlexNet(num_classes=config.num_classes, width=config.width, network=network).eval()
    reference.load_state_dict(state)
    with torch.no_grad():
        logits = reference(torch.from_numpy(tensor)[None])
    served = {p.class_index: p.probability for p in response.results[0].top}
    expected = torch.softmax(logits, dim=1)[0]
    assert max(abs(served[i] - expected[i].item()) for i in range(10)) < 1e-5
    assert relative_error(engine.predict(torch.from_numpy(tensor)[None]), logits) < 1e-5
    # The same weights on the paper's table compute something else: the network, not the weights, differs.
    paper = AlexNet(num_classes=config.num_classes, width=config.width).eval()
    paper.load_state_dict(state)
    with torch.no_grad():
        assert relative_error(paper(torch.from_numpy(tensor)[None]), logits) > 1e-3
