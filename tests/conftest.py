import os
import shutil

import pytest
import torch

# Without a GPU the Triton kernel (els/triton_kernel.py) runs in Triton's interpreter, which must be
# chosen before triton is imported (tests/test_machines.py runs it against the loop implementation).
if not torch.cuda.is_available():
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


@pytest.fixture(scope="session", autouse=True)
def _installed_slurm_is_up(request):
    """Where SLURM is installed, its controller is up for the whole session: Snakemake's SLURM
    plugin runs `scontrol show config` whenever snakemake starts, and with SLURM installed but its
    controller down that call waits 10 s; with it up each of the tests' many snakemake runs starts
    in about 2 s. (Where SLURM is not installed, scontrol is missing and costs nothing.)"""
    if shutil.which("scontrol") is not None:
        request.getfixturevalue("slurm_session")
