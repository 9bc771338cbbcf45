import os
import shutil
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernel (els/triton_kernel.py) runs in Triton's interpreter, which must be
# chosen before triton is imported (tests/test_machines.py runs it against the loop implementation).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# `make test` runs test files side by side (pytest-xdist), each file on one worker so that its
# module fixtures are made once. The files that read one session-wide tiny workflow run
# (tests/tiny_workflow.py) go to one worker together, so the run is made once; these groups, the
# longest, are handed out first.
SHARED_RUNS = {
    "full_run": ("test_pipeline", "test_report", "test_zoo_pipeline"),
    "reference_run": ("test_cluster_and_faults", "test_data_inputs", "test_entry_points",
                      "test_safe_loading"),
}  # fmt: skip
_GROUP_OF = {stem: group for group, stems in SHARED_RUNS.items() for stem in stems}


def xdist_unit(nodeid: str) -> str:
    """The unit of work of a test for pytest-xdist: its file, or its file's shared run."""
    path = nodeid.split("::", 1)[0]
    return _GROUP_OF.get(Path(path).stem, path)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: `pytest -p no:xdist` runs without it
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class SharedRunScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return xdist_unit(nodeid)

    return SharedRunScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: xdist_unit(item.nodeid) not in SHARED_RUNS)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


# The local SLURM's lifetime is the test run's: started once by the process that runs the session
# (with pytest-xdist, the controller, before any worker starts) and stopped after the last test of
# every worker. Where SLURM is installed its controller must be up for the whole run anyway:
# Snakemake's SLURM plugin runs `scontrol show config` whenever snakemake starts, and with SLURM
# installed but its controller down that call waits 10 s; with it up each of the tests' many
# snakemake runs starts in about 2 s. (Where SLURM is not installed, scontrol is missing and costs
# nothing.) Workers learn why SLURM cannot be used, if so, from this variable:
SLURM_REASON = "ELS_TEST_SLURM_REASON"
_slurm_started_as: list = []


def _is_xdist_worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_sessionstart(session):
    if _is_xdist_worker(session.config) or shutil.which("scontrol") is None:
        return
    from slurm_local import ensure_slurm

    reason, started_as = ensure_slurm()
    os.environ[SLURM_REASON] = reason or ""
    if started_as is not None:
        _slurm_started_as.append(started_as)


def pytest_sessionfinish(session):
    if _is_xdist_worker(session.config):
        return
    from slurm_local import stop_slurm

    for root in _slurm_started_as:
        stop_slurm(root)


@pytest.fixture(scope="session")
def slurm_session():
    """Why SLURM cannot be used (None when it can), for every SLURM test of the session."""
    if SLURM_REASON in os.environ:
        return os.environ[SLURM_REASON] or None
    from slurm_local import unavailable_reason

    return unavailable_reason()
