import os

import pytest
import torch

# Tests run on CPU with the threads CI has; keep them deterministic.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
