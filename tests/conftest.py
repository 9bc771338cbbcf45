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


@pytest.fixture(scope="session")
def slurm_session():
    """Why SLURM cannot be used (None when it can), for every SLURM test of the session; a local
    SLURM this fixture started (tests/slurm_local.py) is stopped when the session ends."""
    from slurm_local import ensure_slurm, stop_slurm

    reason, started_as = ensure_slurm()
    yield reason
    if started_as is not None:
        stop_slurm(started_as)
