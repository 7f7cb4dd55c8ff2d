"""Every test sees 8 virtual CPU devices (tests use subsets through ``devices=``)."""

import os

# Set, not defaulted: the tests' expectations are written for 8 devices, and a count
# left in the shell for running the examples must not change them.
os.environ["FUNCDP_NUM_CPU_DEVICES"] = "8"
os.environ.setdefault("FUNCDP_PLATFORM", "cpu")
# A hang in a collective fails a test quickly instead of stalling the suite.
os.environ.setdefault("FUNCDP_COLLECTIVE_TIMEOUT", "30")

import hypothesis  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

hypothesis.settings.register_profile(
    "ci", max_examples=12, derandomize=True, database=None, deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
    print_blob=True,
)
hypothesis.settings.register_profile(
    "dev", max_examples=200, deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.load_profile(os.environ.get("FUNCDP_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def devices():
    import funcdp

    return funcdp.local_devices()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
