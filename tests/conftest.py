import os

# Set before Ray or timm import: no hub retries, no token auth on local test clusters.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
# Test-only fault injection (glora_ray.faults): a per-session plan file, named before Ray starts so
# every Ray worker inherits the variable; tests write a plan into it with helpers.injected_faults.
import tempfile  # noqa: E402

os.environ["GLORA_RAY_FAULTS"] = os.path.join(tempfile.mkdtemp(prefix="glora-faults-"), "faults.json")

import logging

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (start and stop cost ~6 s each)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, object_store_memory=512 * 2**20,
                 include_dashboard=False, logging_level=logging.WARNING)
        # As the pipelines' init_ray does: this process's Ray Train controllers and Tune trials find
        # this instance, never another local one (a driver subprocess's, a bench's).
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield ray
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="module")
def problem():
    """The shared tiny search problem (helpers.Problem): a supernet with non-zero adapters, its
    numpy state, 64 images and labels from a fixed random teacher subnet, so subnets closer to the
    teacher score higher, accuracies differ and a search has a signal."""
    import numpy as np

    from glora_ray.checkpoint import numpy_state
    from helpers import Problem, randomize_adapters, tiny_spec

    spec = tiny_spec()
    net = spec.build().eval()
    randomize_adapters(net, seed=1)  # subnets differ only when the support tensors are non-zero
    state = numpy_state(net)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((64, 3, 16, 16)).astype(np.float32)
    net.set_subnet(net.sample_genes(rng))
    with torch.inference_mode():
        labels = net(torch.from_numpy(images)).argmax(-1).numpy().astype(np.int64)
    return Problem(spec, net, state, images, labels)
