import os

import pytest
import torch

if not torch.cuda.is_available():
    # els.fused's Triton kernels run in Triton's interpreter on CPU tensors (tests/test_fused.py);
    # triton reads this when it is imported, so it is set before anything imports it
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
