import atexit
import os
import shutil
import tempfile

# Tests run their own throwaway local Ray: no token file is written to ~/.ray for them.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.pop("RAY_ADDRESS", None)
# The servers tests start write their jobs' TensorBoard logs here, not into the user's cache.
os.environ["ALEXNET_MP_LOGS"] = tempfile.mkdtemp(prefix="alexnet-mp-test-logs-")
atexit.register(shutil.rmtree, os.environ["ALEXNET_MP_LOGS"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

# A small-width, small-image network that keeps every structural feature of the full one.
SMALL = dict(num_classes=10, width=0.125, image_size=99)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # Logical CPUs, as the server's own Ray has: a serving pair, a training job of two replica
    # groups (or a second model), and room for data loading beside them.
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    # No ray.shutdown() here: Ray's own exit handler runs it after pytest has printed its report.
    # Shut down earlier, a failure's traceback that still holds an ObjectRef would touch a dead
    # core worker while being printed, and the process would exit without a summary.


@pytest.fixture(scope="session")
def learning_patterns(tmp_path_factory):
    """The built-in dataset at 60 training and 30 held-out images a class, made once a session
    for the tests that measure learning (test_learning, test_finetune)."""
    from coordinator.data.patterns import generate

    return generate(tmp_path_factory.mktemp("patterns") / "p", train_per_class=60, val_per_class=30)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()
