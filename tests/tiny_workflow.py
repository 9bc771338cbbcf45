"""The smallest useful run of the whole workflow, for the cluster, fault and safe-loading tests.

A 32x32 gray image folder with two classes of 4 images each (source: imagefolder), class 0 only,
bbELS, seeds 0 and 1 sampled in one batch, a 3-step schedule that needs one patch index (k = 3),
no trajectories, no provenance, no comparison: 8 jobs (prepare_data, select_data, build_index,
sample_batch, 2 x finish_seed, grid_figure, summary). `reference_run` runs it once per test
session, locally (`--cores 2`), with tests/atomic_audit on PYTHONPATH so that every write under
results/ is recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# ELS_SNAKEFILE: run the workflow tests against another checkout (e.g. one being integrated)
SNAKEFILE = Path(os.environ.get("ELS_SNAKEFILE", REPO / "Snakefile")).resolve()
DEFAULT_PROFILE = REPO / "workflow" / "profiles" / "default"
SLURM_PROFILE = REPO / "workflow" / "profiles" / "slurm"
AUDIT_DIR = Path(__file__).resolve().parent / "atomic_audit"
DATASET = "Tiny"
SCHEDULE = [5, 3, 3]  # one index: k = 3 (scales[0] is never used)

# Files under results/ that are allowed to differ between two runs of the same config: the HTML
# report (it embeds the run's date); summary.csv is compared but for its two runtime columns
# (same_result). Every other timing lives in logs/ (rule logs, benchmarks).
RUN_DEPENDENT = ("report.html",)


def write_image_folder(folder: Path, classes: int = 2, per_class: int = 4, seed: int = 0) -> Path:
    """One subfolder per class ('c0', 'c1', ...) of 32x32 gray PNGs: a bar, horizontal for even
    classes and vertical for odd ones, at a varying position, plus a little noise."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = rng.integers(0, 30, size=(32, 32), dtype=np.uint8)
            start = 4 + 5 * i
            if c % 2 == 0:
                image[start : start + 5, 4:28] = 200 + 10 * i
            else:
                image[4:28, start : start + 5] = 200 + 10 * i
            Image.fromarray(image, mode="L").save(folder / f"c{c}" / f"img{i}.png")
    return folder


def tiny_config(image_folder: Path, **sampling) -> dict:
    return {
        "datasets": {
            DATASET: {
                "source": "imagefolder",
                "path": str(image_folder),
                "channels": 1,
                "conditional": True,
                "classes": [0],
                "seeds": [0, 1],
                "machines": ["bbels"],
                "schedules": {"bbels": "scales/tiny.txt"},
            }
        },
        "data": {"allow_download": False, "allow_apt": False, "local_dirs": []},
        "sampling": {
            "device": "cpu",
            "dtype": "float32",
            "batch_seeds": 2,
            "trajectory": False,
            "provenance": False,
            **sampling,
        },
        "resources": {
            stage: {"threads": 1, "mem_mb": 500, "runtime": 10}
            for stage in ("data", "index", "sample", "seed", "figures")
        },
    }


def make_workdir(workdir: Path, config: dict, schedule: list[int] | None = None) -> Path:
    (workdir / "scales").mkdir(parents=True, exist_ok=True)
    (workdir / "scales" / "tiny.txt").write_text(
        "# tiny test schedule\n" + " ".join(map(str, schedule or SCHEDULE)) + "\n"
    )
    write_config(workdir, config)
    return workdir


def write_config(workdir: Path, config: dict, name: str = "config.yaml") -> Path:
    path = workdir / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake_command(
    workdir: Path, *args: str, config: str = "config.yaml", profile: Path | None = DEFAULT_PROFILE
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(SNAKEFILE),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / config),
    ]
    if profile is not None:
        command += ["--workflow-profile", str(profile)]
    return command + list(args)


def environment(audit: Path | None = None, root: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if audit is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(AUDIT_DIR), env.get("PYTHONPATH")]))
        env["ELS_AUDIT_LOG"] = str(audit)
        env["ELS_AUDIT_ROOT"] = str(root)
    return env


@dataclass
class Run:
    workdir: Path
    returncode: int
    output: str
    seconds: float


def run_snakemake(
    workdir: Path,
    *args: str,
    config: str = "config.yaml",
    profile: Path | None = DEFAULT_PROFILE,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = 600,
) -> Run:
    start = time.monotonic()
    result = subprocess.run(
        snakemake_command(workdir, *args, config=config, profile=profile),
        capture_output=True,
        text=True,
        env=env or environment(),
        timeout=timeout,
    )
    run = Run(workdir, result.returncode, result.stdout + result.stderr, time.monotonic() - start)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{run.output[-6000:]}")
    return run


def start_snakemake(
    workdir: Path,
    *args: str,
    log: Path,
    env: dict[str, str] | None = None,
    profile: Path | None = DEFAULT_PROFILE,
) -> subprocess.Popen:
    """Start snakemake in its own session (so that its whole process group can be killed)."""
    stream = log.open("w")
    return subprocess.Popen(
        snakemake_command(workdir, *args, profile=profile),
        stdout=stream,
        stderr=subprocess.STDOUT,
        env=env or environment(),
        start_new_session=True,
    )


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL snakemake and every process of its session (its jobs), as a node crash would."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def children_running(parent: int, needle: str) -> list[int]:
    """pids of the descendants of `parent` whose command line contains `needle`."""
    found, frontier = [], [parent]
    while frontier:
        pid = frontier.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if needle in cmdline:
                found.append(child)
            frontier.append(child)
    return found


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def result_files(workdir: Path) -> dict[str, Path]:
    """Every file under results/ (relative path -> path), without the run-dependent ones."""
    root = workdir / "results"
    return {
        str(p.relative_to(workdir)): p
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in RUN_DEPENDENT
    }


TIMING_COLUMNS = ["runtime_s", "batch_runtime_s"]


def same_result(a: Path, b: Path) -> bool:
    """Equal bytes; summary.csv equal but for its wall-time columns (the one run-dependent thing)."""
    if a.name == "summary.csv":
        import pandas as pd

        return (
            pd.read_csv(a)
            .drop(columns=TIMING_COLUMNS)
            .equals(pd.read_csv(b).drop(columns=TIMING_COLUMNS))
        )
    return a.read_bytes() == b.read_bytes()


def assert_same_files(expected: Path, actual: Path, only: str = "") -> int:
    """Every result file (under results/`only`) is in both workdirs with equal bytes; returns how
    many were compared."""
    a = {k: v for k, v in result_files(expected).items() if k.startswith(f"results/{only}")}
    b = {k: v for k, v in result_files(actual).items() if k.startswith(f"results/{only}")}
    assert sorted(a) == sorted(b), (
        f"different files: only in reference {sorted(set(a) - set(b))}, only in rerun {sorted(set(b) - set(a))}"
    )
    different = [k for k in a if not same_result(a[k], b[k])]
    assert not different, f"files that differ from the reference run: {different}"
    return len(a)


def read_audit(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def copy_results(source: Path, target: Path, *parts: str) -> None:
    """Copy results/<part> trees (keeping mtimes) from one workdir to another."""
    for part in parts:
        shutil.copytree(source / "results" / part, target / "results" / part, dirs_exist_ok=True)


_REFERENCE: dict[str, object] = {}


def shared_root(tmp_path_factory) -> Path:
    """One folder per test session holding the image folder (shared by every workdir)."""
    if "root" not in _REFERENCE:
        root = tmp_path_factory.mktemp("tiny_workflow")
        write_image_folder(root / "images")
        _REFERENCE["root"] = root
    return _REFERENCE["root"]  # type: ignore[return-value]


def reference_run(tmp_path_factory) -> Run:
    """The tiny workflow run once per session, locally with --cores 2, audited. (The files that
    read it are conftest.py's SHARED_RUNS["reference_run"], so that pytest-xdist runs them on one
    worker and the run is made once.)"""
    if "run" not in _REFERENCE:
        root = shared_root(tmp_path_factory)
        workdir = make_workdir(root / "reference", tiny_config(root / "images"))
        audit = root / "reference-audit.jsonl"
        env = environment(audit, workdir / "results")
        _REFERENCE["run"] = run_snakemake(workdir, "--cores", "2", env=env)
        _REFERENCE["audit"] = audit
    return _REFERENCE["run"]  # type: ignore[return-value]


def reference_audit(tmp_path_factory) -> list[dict]:
    reference_run(tmp_path_factory)
    return read_audit(_REFERENCE["audit"])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the full tiny run

# the machines of the full run's comparison: the four patch machines and two of the zoo's
# (wiener: no provenance; scfdm: an image-level softmax; the rest are in tests/test_zoo.py)
FULL_COMPARISON = ["ideal", "ls", "els", "bbels", "wiener", "scfdm"]


def full_config(local_dir: Path, **sampling) -> dict:
    """MNIST-format IDX files (tests/data_factory.py, two classes of bar images) with every kind of
    output: bbELS for classes 0 and 1 x seeds 0 and 1 from the first 6 images of each class, a
    4-step schedule, trajectories, provenance, and the comparison of FULL_COMPARISON for class 1,
    seed 0."""
    schedule = "scales/tiny.txt"
    return {
        "datasets": {
            "MNIST": {
                "source": "torchvision",
                "conditional": True,
                "classes": [0, 1],
                "max_train_per_class": 6,
                "seeds": [0, 1],
                "machines": ["bbels"],
                "schedules": {m: schedule for m in FULL_COMPARISON},
                "comparison": {"classes": [1], "seeds": [0], "machines": FULL_COMPARISON},
            }
        },
        "data": {
            "root": "results/raw",
            "local_dirs": [str(local_dir)],
            "allow_download": False,
            "allow_apt": False,
        },
        "sampling": {
            "device": "cpu",
            "dtype": "float32",
            "batch_seeds": 2,
            "trajectory": True,
            **sampling,
        },
        "zoo": {"scfdm": {"n_noise": 3, "top_k": 3}},
        "resources": {"sample": {"threads": 1}},
    }


def full_run(tmp_path_factory) -> tuple[Path, dict, str]:
    """The full tiny run and its report, once per session (tests/test_pipeline.py, test_report.py,
    test_zoo_pipeline.py read it: conftest.py's SHARED_RUNS["full_run"]; a test that changes a
    workdir works on a copy_of it): (workdir, config, the runs' output)."""
    if "full" not in _REFERENCE:
        from data_factory import write_idx_dataset, write_schedule

        root = tmp_path_factory.mktemp("full")
        write_idx_dataset(root / "local" / "MNIST")
        workdir = root / "work"
        write_schedule(workdir / "scales" / "tiny.txt", [3, 3, 5, 5])
        config = full_config(root / "local")
        write_config(workdir, config)
        run = run_snakemake(workdir, "--cores", "2", timeout=1800)
        report = run_snakemake(workdir, "--cores", "2", "--report", "results/report.html")
        _REFERENCE["full"] = (workdir, config, run.output + report.output)
    return _REFERENCE["full"]  # type: ignore[return-value]


def copy_of(workdir: Path, target: Path) -> Path:
    """A copy of a finished workdir (results, logs, Snakemake's records) to change freely."""
    shutil.copytree(workdir, target, symlinks=True)
    return target
