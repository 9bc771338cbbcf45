"""The local single-node SLURM of workflow/slurm/ for the tests: is it up, start it, and what a test
does when it cannot be used.

Without a usable SLURM the SLURM tests skip with the reason, except under CI (``CI`` set to
``true``/``1``, as CI services do): there the cluster is part of what is tested (.ci/run installs
it), so a SLURM that cannot start fails the test, with start.sh's output and the daemons' logs.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "workflow" / "slurm"
ACCOUNT = os.environ.get("SLURM_ELS_ACCOUNT", "els")
PARTITION = os.environ.get("SLURM_ELS_PARTITION", "debug")
# where start.sh keeps the daemons' logs (workflow/slurm/templates/els.env)
LOG_DIR = Path(os.environ.get("SLURM_ELS_DIR", "/var/lib/slurm-els")) / "log"
LOG_TAIL = 3000  # characters of each log in a failure message


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def daemon_logs() -> str:
    """The tail of every log of the local SLURM's daemons (empty when there are none)."""
    if not LOG_DIR.is_dir():
        return f"(no SLURM log folder {LOG_DIR})"
    parts = []
    for path in sorted(LOG_DIR.glob("*.log")):
        text = path.read_text(errors="replace")
        parts.append(f"--- {path} (last {LOG_TAIL} characters)\n{text[-LOG_TAIL:]}")
    return "\n".join(parts) or f"(no logs in {LOG_DIR})"


def unavailable(reason: str) -> None:
    """Skip the calling test because SLURM cannot be used; under CI, fail it with the logs."""
    if in_ci():
        pytest.fail(f"CI: the local SLURM cannot be used: {reason}\n{daemon_logs()}", pytrace=False)
    pytest.skip(reason)


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


def unavailable_reason() -> str | None:
    """Why the SLURM clients cannot reach a working cluster now; None when they can."""
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


def as_root() -> list[str] | None:
    """How to run a command as root here: [] when we are root, ['sudo', '-n'] when sudo works
    without a password, None otherwise."""
    if os.geteuid() == 0:
        return []
    if (
        shutil.which("sudo")
        and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0
    ):
        return ["sudo", "-n"]
    return None


def ensure_slurm() -> tuple[str | None, list[str] | None]:
    """(why SLURM cannot be used or None, the root prefix if this call started it).

    A SLURM that answers is used as it is; else the local one is started with
    workflow/slurm/start.sh when we are root (or have password-less sudo) and apt-get exists (CI:
    .ci/run installs it)."""
    reason = unavailable_reason()
    if reason is None:
        return None, None
    root = as_root()
    if root is None or shutil.which("apt-get") is None:
        return f"{reason} (not root and no apt-get/sudo, so not starting one)", None
    start = subprocess.run(
        [*root, "bash", str(SLURM_DIR / "start.sh")], capture_output=True, text=True, timeout=900
    )
    if start.returncode != 0:
        output = (start.stdout + start.stderr)[-LOG_TAIL:]
        return (
            f"{reason}; workflow/slurm/start.sh failed (exit {start.returncode}):\n{output}",
            None,
        )
    reason = unavailable_reason()
    return (f"SLURM started but does not answer: {reason}" if reason else None), root


def stop_slurm(root: list[str]) -> None:
    subprocess.run([*root, "bash", str(SLURM_DIR / "stop.sh")], capture_output=True, timeout=300)
