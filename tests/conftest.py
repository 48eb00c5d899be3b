import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Each new dtype/flag combination compiles kernels once (then the on-disk
# cache serves it): no deadline, and a bounded number of examples for CI.
settings.register_profile(
    "ci", max_examples=int(os.environ.get("NUMBA_BN_EXAMPLES", "60")),
    deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")

# Tolerances against the float64 reference, per input dtype.
TOLERANCE = {np.float16: 2e-2, np.float32: 2e-5, np.float64: 1e-10}


@pytest.fixture
def rng():
    return np.random.default_rng(20261123)


@pytest.fixture
def tiny_launches(monkeypatch):
    """GPU launch settings shrunk so that a few elements already span
    several blocks, a ragged last block and grid-stride loops."""
    from numba_bn import config
    monkeypatch.setattr(config, "threads_per_block", 4)
    monkeypatch.setattr(config, "channel_lanes", 2)
    monkeypatch.setattr(config, "reduction_blocks", 6)
    monkeypatch.setattr(config, "element_blocks", 3)


@pytest.fixture(autouse=True)
def launches_the_hardware_accepts():
    """Under the CUDA simulator, fail a test any of whose kernel launches
    numba-cuda's hardware launcher would refuse (``launch_rules``)."""
    import numba
    if not numba.config.ENABLE_CUDASIM:
        yield
        return
    from . import launch_rules
    with launch_rules.recording() as launches:
        yield launches
    refused = launch_rules.refusals(launches)
    if refused:
        pytest.fail("the hardware launcher would refuse:\n" + "\n".join(refused))
