"""Learning on the built-in dataset, in float32 and in bfloat16, and what bf16 does to the numbers.

Two runs of the same small-width recipe and seed, one per precision, shared by the tests below:
each learns, they end within 3 points of each other, and the float32 run's weights give the
same classes evaluated in bf16. On those trained weights and real images, the bf16 step is
checked against the single-process reference under torch.autocast(bfloat16).

Tolerances. bfloat16 keeps 8 significant bits: a value rounds with a relative error of at most
u = 2^-9. The bf16 engine and the reference under autocast round at the same places (each conv
and fc layer's inputs, weights and output); they differ where an accumulation's order, or the
LRN (float32 in the engine, partly bf16 under autocast), moves a value across a rounding
boundary: one ulp, 2u, at one layer's output. Through the eight layers, a first-order bound on
the logits' relative difference is 8 x 2u = 16u = 2^-5; the loss, a smooth function of the
logits, sits within 8u = 2^-6. The weights after three SGD steps differ by the updates'
differences only: lr times a gradient that differs by its cosine, well under 1e-3 of the weights.
Against float32, bf16 moves pooling windows whose two largest inputs lie within 2u of each
other, which sends their gradient elsewhere: on trained weights and real images each gradient
keeps a cosine of at least 0.99 with float32's (on random weights and noise it need not).
"""

import dataclasses
import math
from contextlib import closing

import pytest
import torch
import torch.nn.functional as F

from conftest import relative_error
from coordinator import ModelParallelAlexNet
from coordinator.data import open_dataset
from coordinator.training import resume_spec, run_spec, train
from coordinator.training.loop import engine_for
from coordinator.training.passes import SkipLog, evaluate, training_pass, validation_pass
from towers import AlexNet, paper_sgd
from towers.precision import bf16_arithmetic, require_bf16

U = 2.0**-9  # bf16's unit roundoff
# The CI machine kind computes bf16 (AMX or AVX512-BF16); a CPU that does not gets the refusal, tested below.
needs_bf16 = pytest.mark.skipif(not bf16_arithmetic("cpu"), reason="this CPU has no bf16 arithmetic (AMX, AVX512-BF16)")
# 16 epochs with a drop at 13: both precisions converge (86-87% held-out); at 12 epochs, before
# converging, two runs that differ in their last bits end up to 12 points apart.
PLAN = dict(
    width=0.125, epochs=16, batch_size=32, lr=0.003, dropout=0.0, lr_epochs="13", seed=0, val_images=30
)  # each epoch validates on 30 images; the tests evaluate on all 300


@pytest.fixture(scope="module")
def patterns(learning_patterns):
    return open_dataset(learning_patterns / "train", learning_patterns / "val")


@pytest.fixture(scope="module")
def engines(ray_session):
    """Each run's towers, kept for the tests after it (each loads the weights it needs)."""
    made = {}
    yield made
    for engine in made.values():
        engine.shutdown()


def run(patterns, engines, precision: str) -> dict:
    events, published = [], []
    spec = run_spec("demo", {**PLAN, "precision": precision})
    engines[precision] = engine = engine_for(spec.recipe, spec.options, patterns.num_classes)
    result = train(
        patterns, spec, engine=engine, on_event=events.append, on_publish=lambda step, state: published.append(state)
    )
    # Each run evaluated as it trained, on every held-out image.
    top1, _ = evaluate(engine, validation_pass(patterns, dataclasses.replace(spec.recipe, val_images=0)), SkipLog())
    return {"result": result, "events": events, "state": published[-1], "top1": top1, "recipe": spec.recipe}


@pytest.fixture(scope="module")
def float32_run(patterns, engines):
    return run(patterns, engines, "float32")


@pytest.fixture(scope="module")
def bf16_run(patterns, engines):
    return run(patterns, engines, "bfloat16")


def test_learning_on_the_builtin_dataset(float32_run):
    """Short and small-width, but real: loss falls well below chance and held-out accuracy is high."""
    events, result = float32_run["events"], float32_run["result"]
    chance_loss = math.log(10)
    steps = [e for e in events if e.kind == "step"]
    late = [e.loss for e in steps if e.epoch == 15]
    print(f"late training loss {sum(late) / len(late):.3f}, held-out top-1 {float32_run['top1']:.1%}")
    assert sum(late) / len(late) < 0.4 * chance_loss
    assert float32_run["top1"] > 0.75  # chance is 0.1
    epochs = [e for e in events if e.kind == "epoch"]
    assert len(epochs) == 16 and all(0 <= e.top1 <= e.top5 <= 1 for e in epochs)
    assert epochs[-1].lr == pytest.approx(0.0003)  # the step schedule's drop took effect
    assert all(e.images_per_second > 0 for e in steps) and result.state == "finished"


@needs_bf16
def test_bf16_learns_as_well_as_float32_within_3_points(float32_run, bf16_run):
    print(f"held-out top-1: float32 {float32_run['top1']:.1%}, bfloat16 {bf16_run['top1']:.1%}")
    assert bf16_run["top1"] > 0.75
    assert abs(bf16_run["top1"] - float32_run["top1"]) <= 0.03
    assert all(
        v.dtype == torch.float32 for v in bf16_run["state"].values()
    )  # master weights: float32 leaves the towers


@needs_bf16
def test_a_float32_model_gives_the_same_classes_evaluated_in_bf16(patterns, engines, float32_run, bf16_run):
    held_out = list(validation_pass(patterns, dataclasses.replace(float32_run["recipe"], val_images=0)))
    classes = {}
    for precision, engine in engines.items():
        engine.load_state_dict(float32_run["state"])
        classes[precision] = torch.cat([engine.predict(b.crops).argmax(1) for b in held_out])
    agree = (classes["float32"] == classes["bfloat16"]).float().mean().item()
    print(f"the same class on {agree:.1%} of {len(classes['float32'])} held-out images")
    assert len(classes["float32"]) == 300 and agree >= 0.98


@pytest.fixture(scope="module")
def trained(patterns, engines, float32_run, bf16_run):
    """The float32 run's weights: start() loads them into the bf16 engine and a fresh reference;
    and four batches of real training images."""
    with closing(training_pass(patterns, float32_run["recipe"], epoch=3, steps=4)) as loader:
        batches = [batch for _, batch in zip(range(4), loader)]

    def start():
        engines["bfloat16"].load_state_dict(float32_run["state"])
        reference = AlexNet(num_classes=10, width=0.125, dropout=0.0, init="kaiming")
        reference.load_state_dict(float32_run["state"])
        return reference, engines["bfloat16"]

    return start, batches


@needs_bf16
def test_bf16_logits_and_loss_match_the_reference_under_autocast(trained):
    start, [batch, *_] = trained
    reference, engine = start()
    images, labels = batch.images, batch.labels
    reference.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(images).float()
    assert relative_error(engine.predict(batch.crops), expected) <= 16 * U
    reference.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_loss = F.cross_entropy(reference(images).float(), labels).item()
    loss = engine.forward_backward(batch.crops, labels, dropout_seed=0)
    engine.zero_grad()
    assert loss == pytest.approx(expected_loss, rel=8 * U)


@needs_bf16
def test_bf16_gradients_point_where_float32_gradients_do(trained):
    start, [batch, *_] = trained
    reference, engine = start()
    reference.train()
    reference.zero_grad()
    F.cross_entropy(reference(batch.images), batch.labels).backward()
    engine.take_stats()
    engine.forward_backward(batch.crops, batch.labels, dropout_seed=0)
    bf16 = engine.gradients()
    engine.zero_grad()
    cosines = {
        n: F.cosine_similarity(bf16[n].flatten().double(), p.grad.flatten().double(), dim=0).item()
        for n, p in reference.named_parameters()
    }
    assert min(cosines.values()) >= 0.99, cosines
    stats = engine.take_stats()["towers"][0]["exchange_bytes"]
    piece = (
        len(batch.labels)
        * reference.config.segments[0][-1].out_split[0]
        * reference.config.segments[0][-1].out_size ** 2
    )
    assert stats[("conv3", "forward")] == piece * 2  # bf16: two bytes a value, half of float32's


@needs_bf16
def test_three_bf16_sgd_steps_stay_with_the_reference_under_autocast(trained, float32_run):
    start, [_, *batches] = trained
    reference, engine = start()
    optimizer = paper_sgd(reference, lr=0.003, momentum=0.9, weight_decay=5e-4)
    engine.lr = 0.003
    for batch in batches:
        reference.train()
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = reference(batch.images)
        F.cross_entropy(logits.float(), batch.labels).backward()
        optimizer.step()
        engine.train_step(batch.crops, batch.labels, dropout_seed=0)
    actual, expected = engine.state_dict(), reference.state_dict()
    errors = {k: relative_error(actual[k], expected[k]) for k in expected}
    assert max(errors.values()) < 1e-3, errors
    assert all(not torch.equal(expected[k], float32_run["state"][k]) for k in expected)  # the weights moved


def test_bf16_is_refused_where_nothing_computes_it_and_a_resume_may_change_precision(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False})
    with pytest.raises(
        ValueError, match="precision bfloat16 needs bf16 arithmetic, which this CPU .* lacks: use precision float32"
    ):
        require_bf16("cpu")
    with pytest.raises(ValueError, match="unknown precision 'float16': choose one of float32, bfloat16"):
        ModelParallelAlexNet(num_classes=10, width=0.125, precision="float16")
    with pytest.raises(ValueError, match="precision bfloat16 .* takes dtype float32, not float64"):
        ModelParallelAlexNet(num_classes=10, width=0.125, precision="bfloat16", dtype=torch.float64)
    with pytest.raises(ValueError, match="precision must be one of float32, bfloat16, got 'half'"):
        run_spec("demo", {"precision": "half"})
    recipe, options = run_spec("demo")  # a run trained in float32 ...
    saved = {"recipe": dataclasses.asdict(recipe), "options": dataclasses.asdict(options)}
    assert resume_spec(saved, {"precision": "bfloat16"}).options.precision == "bfloat16"  # ... goes on in bf16
