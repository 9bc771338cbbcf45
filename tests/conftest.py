import pytest
import torch


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
