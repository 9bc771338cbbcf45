"""Smoke tests for the local single-node SLURM of workflow/slurm/.

The ``slurm`` tests need a running SLURM (``bash workflow/slurm/start.sh``, as root);
they skip, with the reason, when ``sinfo`` is missing or does not answer.
Account and partition: $SLURM_ELS_ACCOUNT (default ``els``), $SLURM_ELS_PARTITION
(default ``debug``), as set up by start.sh.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "workflow" / "slurm"
ACCOUNT = os.environ.get("SLURM_ELS_ACCOUNT", "els")
PARTITION = os.environ.get("SLURM_ELS_PARTITION", "debug")
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


def _slurmctld_address() -> tuple[str, int] | None:
    """(host, port) of slurmctld from slurm.conf, or None when it cannot be read."""
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    try:
        text = conf.read_text()
    except OSError:
        return None
    host = port = None
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        key, _, value = line.partition("=")
        key, value = key.strip().lower(), value.strip()
        if key in ("slurmctldhost", "controlmachine") and host is None:
            m = re.match(r"^([^(\s]+)(?:\(([^)]+)\))?", value)
            if m:
                host = m.group(2) or m.group(1)
        elif key == "slurmctldport":
            port = int(re.match(r"\d+", value).group(0))
    return (host, port or 6817) if host else None


def _slurm_unavailable_reason() -> str | None:
    if shutil.which("sinfo") is None:
        return "sinfo not found: SLURM is not installed (run workflow/slurm/install.sh)"
    for tool in ("sbatch", "sacct", "sacctmgr"):
        if shutil.which(tool) is None:
            return f"{tool} not found: SLURM client tools incomplete"
    # Fast probe first: sinfo needs ~10 s to give up on a stopped slurmctld.
    addr = _slurmctld_address()
    if addr is not None:
        try:
            socket.create_connection(addr, timeout=3).close()
        except OSError as exc:
            return (
                f"slurmctld not reachable at {addr[0]}:{addr[1]} ({exc.strerror or exc}); "
                "start it with workflow/slurm/start.sh"
            )
    try:
        res = subprocess.run(
            ["sinfo", "-h", "-o", "%P %a %T"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s (start SLURM with workflow/slurm/start.sh)"
    if res.returncode != 0:
        err = (res.stderr or res.stdout).strip().splitlines()
        detail = err[-1] if err else f"exit {res.returncode}"
        return f"sinfo failed (start SLURM with workflow/slurm/start.sh): {detail}"
    if not res.stdout.strip():
        return "sinfo answered but lists no partition"
    return None


@pytest.fixture(scope="session")
def slurm() -> None:
    """Skip (with the reason) unless a SLURM cluster answers; checked once, lazily."""
    reason = _slurm_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


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
