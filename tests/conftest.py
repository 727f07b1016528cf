import os

import pytest
import torch

def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU, skipped without one (tests/test_cuda.py; "
                                       "bash bench/gpu_check.sh runs them on a GPU)")


# Tests run on CPU with the threads CI has; keep them deterministic.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    "Run a module's tests on one thread: for tiny shapes it is the fastest, and kind to a shared CPU."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
