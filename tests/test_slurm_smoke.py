"""Smoke tests for the local single-node SLURM of workflow/slurm/.

The ``slurm`` tests need a running SLURM: one that answers is used, else the local one is started
(``bash workflow/slurm/start.sh``) when we are root. Without one they skip with the reason, except
under ``CI=true``, where they fail with start.sh's output and the daemons' logs (slurm_local.py).
Account and partition: $SLURM_ELS_ACCOUNT (default ``els``), $SLURM_ELS_PARTITION
(default ``debug``), as set up by start.sh.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from slurm_local import ACCOUNT, PARTITION, SLURM_DIR, unavailable

FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


@pytest.fixture(scope="session")
def slurm(slurm_session) -> None:
    """A usable SLURM (conftest.py's slurm_session starts the local one where it can); skip with
    the reason otherwise, or under CI fail with the logs (slurm_local.unavailable)."""
    if slurm_session is not None:
        unavailable(slurm_session)


def _sacct(jobid: str, fields: str) -> list[str]:
    res = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", jobid, "-o", fields],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, f"sacct failed: {res.stderr}"
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    return lines[0].split("|") if lines else []


def _sacct_final(jobid: str, fields: str = "State,ExitCode", timeout: float = 60) -> list[str]:
    """Poll sacct until the job has a final state and every field is filled in.

    Accounting lags the job a little: slurmdbd may record the end of a short job
    before its start record (partition, ...) arrives.
    """
    end = time.monotonic() + timeout
    row: list[str] = []
    while time.monotonic() < end:
        row = _sacct(jobid, fields)
        if row and row[0].split()[0] in FINAL_STATES and all(row):
            return row
        time.sleep(0.5)
    if row and row[0].split()[0] in FINAL_STATES:
        return row
    pytest.fail(f"sacct shows no final state for job {jobid} after {timeout}s: {row}")


def _sbatch_wait(
    tmp_path: Path, script: str, *extra: str
) -> tuple[str, subprocess.CompletedProcess]:
    out = tmp_path / "slurm-%j.out"
    res = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--wait",
            "-A",
            ACCOUNT,
            "-p",
            PARTITION,
            "-J",
            "els-pytest",
            "-t",
            "2",
            "-o",
            str(out),
            "-D",
            str(tmp_path),
            *extra,
            "--wrap",
            script,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    m = re.match(r"^(\d+)", res.stdout.strip())
    assert m, f"sbatch gave no job id: rc={res.returncode} out={res.stdout!r} err={res.stderr!r}"
    return m.group(1), res


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
def test_sbatch_wait_job_completes_and_sacct_reports_completed(tmp_path: Path) -> None:
    jobid, res = _sbatch_wait(
        tmp_path,
        "echo hello-from-$SLURM_JOB_ID; echo cpus=$SLURM_CPUS_PER_TASK > cpus.txt",
        "--mem=100",
        "--cpus-per-task=2",
        "--ntasks=1",
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / f"slurm-{jobid}.out").read_text().strip() == f"hello-from-{jobid}"
    assert (tmp_path / "cpus.txt").read_text().strip() == "cpus=2"

    state, exit_code, account, partition, cpus, req_mem = _sacct_final(
        jobid, "State,ExitCode,Account,Partition,AllocCPUS,ReqMem"
    )
    assert state == "COMPLETED"
    assert exit_code == "0:0"
    assert account == ACCOUNT
    assert partition == PARTITION
    assert int(cpus) == 2  # cons_tres: cores are consumable
    assert req_mem.startswith("100M")  # CR_Core_Memory: --mem is granted and recorded


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
def test_failing_job_is_reported_failed_by_sacct(tmp_path: Path) -> None:
    jobid, res = _sbatch_wait(tmp_path, "exit 3", "--mem=50")
    assert res.returncode != 0
    state, exit_code = _sacct_final(jobid)
    assert state == "FAILED"
    assert exit_code == "3:0"


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
def test_snakemake_plugin_prerequisites() -> None:
    """What snakemake-executor-plugin-slurm queries before it submits anything."""
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    # account check: sacctmgr -n -s list user USER format=account%256
    accounts = subprocess.run(
        ["sacctmgr", "-n", "-s", "list", "user", user, "format=account%256"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert accounts.returncode == 0, accounts.stderr
    assert ACCOUNT in accounts.stdout.split(), accounts.stdout
    # partition check: sinfo -o %P (default partition marked with '*')
    parts = subprocess.run(["sinfo", "-o", "%P"], capture_output=True, text=True, timeout=30)
    assert PARTITION in [p.rstrip("*") for p in parts.stdout.split()[1:]], parts.stdout
    # status query: sacct --clusters all ... must work
    sacct = subprocess.run(
        [
            "sacct",
            "-X",
            "--parsable2",
            "--clusters",
            "all",
            "--noheader",
            "--format=JobIdRaw,State",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert sacct.returncode == 0, sacct.stderr


@pytest.mark.parametrize("script", ["install.sh", "start.sh", "stop.sh"])
def test_slurm_scripts_are_valid_bash(script: str) -> None:
    path = SLURM_DIR / script
    assert path.is_file()
    assert os.access(path, os.X_OK), f"{script} is not executable"
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_an_unusable_slurm_is_a_skip_outside_ci_and_a_failure_with_its_logs_under_ci(
    monkeypatch, tmp_path
):
    import slurm_local

    (tmp_path / "slurmctld.log").write_text("error: something the daemon said\n")
    monkeypatch.setattr(slurm_local, "LOG_DIR", tmp_path)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no partition"):
        slurm_local.unavailable("sinfo answered but lists no partition")
    for value in ("true", "1"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.fail.Exception) as failure:
            slurm_local.unavailable("sinfo answered but lists no partition")
        message = str(failure.value)
        assert "no partition" in message and "something the daemon said" in message
