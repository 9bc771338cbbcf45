"""The ways in besides `make run`: the `els` command (one sample, one comparison), the workflow as a
Snakemake module of another workflow, and `make run`'s hint when Snakemake reports a lock."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from tiny_workflow import (
    DATASET,
    REPO,
    environment,
    make_workdir,
    reference_run,
    shared_root,
    tiny_config,
    write_config,
)

from els import cli

pytestmark = pytest.mark.slow

SHIPPED_SCHEDULE = "scales/FashionMNIST_ResNet_zeros_conditional.txt"


def els_command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "els.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=environment(),
        timeout=900,
    )


@pytest.fixture
def workdir(tmp_path_factory, tmp_path) -> Path:
    """A copy of the finished tiny reference workdir (results and Snakemake's records)."""
    work = tmp_path / "work"
    shutil.copytree(reference_run(tmp_path_factory).workdir, work, symlinks=True)
    return work


def test_the_console_script_is_declared_and_the_help_has_examples(capsys):
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"els": "els.cli:main"}
    for command in ([], ["sample"], ["compare"]):
        with pytest.raises(SystemExit):
            cli.main([*command, "--help"])
        out = capsys.readouterr().out
        assert "els sample --dataset FashionMNIST --class 3 --seed 0 --machine bbels" in out
        assert "els compare --dataset FashionMNIST --class 3 --seed 0" in out


def test_els_sample_runs_exactly_the_one_sample_and_prints_its_pngs(workdir):
    """Seed 1 of class 0 is in the reference run: its files are there, so nothing runs; seed 2 is
    new: only its batch and its per-seed jobs run (no grid, no summary), and the PNGs are printed."""
    args = ["sample", "--dataset", DATASET, "--class", "0", "--machine", "bbels", "--cores", "1"]
    done = els_command(*args, "--seed", "1", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Nothing to be done" in done.stdout + done.stderr
    dry = els_command(*args, "--seed", "2", "--dry-run", cwd=workdir)
    assert dry.returncode == 0, dry.stderr[-3000:]
    jobs = dry.stdout + dry.stderr
    for rule in ("sample_batch", "finish_seed"):
        assert f"rule {rule}:" in jobs
    assert "rule grid_figure:" not in jobs and "rule summary:" not in jobs
    assert "rule build_index:" not in jobs and "rule prepare_data:" not in jobs
    run = els_command(*args, "--seed", "2", cwd=workdir)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    pngs = [
        workdir / f"results/samples/{DATASET}/bbels/0/seed2.png",
        workdir / f"results/figures/{DATASET}/pairs/bbels/0/seed2.png",
    ]
    assert run.stdout.splitlines()[-3:] == ["PNGs:", *(f"  {p.resolve()}" for p in pngs)]
    assert all(p.is_file() for p in pngs)


def test_els_compare_makes_the_comparison_figure(workdir):
    run = els_command(
        "compare", "--dataset", DATASET, "--class", "0", "--seed", "0", "--cores", "1", cwd=workdir
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    figure = workdir / f"results/figures/{DATASET}/comparison/0/seed0.png"
    assert figure.is_file() and run.stdout.splitlines()[-1] == f"  {figure.resolve()}"
    assert "rule sample_batch:" not in run.stdout + run.stderr  # bbels seed 0 was sampled already


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--dataset": "Nope"}, "--dataset 'Nope' is not in the config's datasets (Tiny)"),
        ({"--class": "all"}, "--class must be a class id (0, 1, ...), got 'all'"),
        ({"--seed": "-1"}, "--seed must be >= 0, got -1"),
        ({"--machine": "els"}, "datasets.Tiny.schedules has no schedule for ['els']"),
        ({"--machine": "bbelz"}, "unknown machine(s) ['bbelz']; choose from ideal, ls"),
    ],
)
def test_els_refuses_a_bad_request_before_snakemake_runs(workdir, change, message, capsys):
    request = {"--dataset": DATASET, "--class": "0", "--seed": "0", "--machine": "bbels", **change}
    args = [item for pair in request.items() for item in pair]
    assert cli.main(["sample", *args, "--directory", str(workdir)]) == 2
    assert message in capsys.readouterr().err
    assert not (workdir / cli.CLI_CONFIG).exists()


def test_the_workflow_runs_as_a_module_from_another_directory(tmp_path_factory, tmp_path):
    """`module els: snakefile: ...; use rule * from els` in a folder without scales/: the tiny config
    runs, and a config naming a shipped schedule by its relative path resolves it in the workflow's
    folder (as the schema documents)."""
    images = shared_root(tmp_path_factory) / "images"
    work = make_workdir(tmp_path / "user", tiny_config(images))
    (work / "Snakefile").write_text(
        'configfile: "config.yaml"\n\n\n'
        "module els:\n"
        f'    snakefile: "{REPO / "Snakefile"}"\n'
        "    config: config\n\n\n"
        "use rule * from els\n"
    )
    command = [sys.executable, "-m", "snakemake", "--cores", "2", "--directory", str(work)]
    run = subprocess.run(
        [*command, "--snakefile", str(work / "Snakefile")],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=900,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert (work / f"results/figures/{DATASET}/grid_bbels.png").is_file()
    assert (work / "results/summary.csv").is_file()
    config = tiny_config(images)
    config["datasets"][DATASET]["schedules"]["bbels"] = SHIPPED_SCHEDULE
    write_config(work, config)
    assert not (work / SHIPPED_SCHEDULE).exists()
    dry = subprocess.run(
        [*command, "--snakefile", str(work / "Snakefile"), "-n", "-p"],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=300,
    )
    assert dry.returncode == 0, (dry.stdout + dry.stderr)[-4000:]
    assert "rule sample_batch:" in dry.stdout  # a new schedule: sampled again


def test_make_run_prints_the_unlock_fix_when_snakemake_reports_a_lock(workdir, tmp_path):
    """A stale lock (a killed run leaves one) makes Snakemake refuse; `make run` then says
    `make unlock`. The venv is a stand-in marked up to date, so make installs nothing."""
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").touch()
    os.utime(venv / ".installed", (4_000_000_000, 4_000_000_000))  # newer than pyproject.toml
    locks = workdir / ".snakemake" / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    # what a killed run leaves: its outputs, as Snakemake writes them (paths in the workdir)
    (locks / "0.output.lock").write_text("results/summary.csv\n")
    snakemake = (
        f"{sys.executable} -m snakemake --snakefile {REPO / 'Snakefile'} --cores 1 "
        f"--workflow-profile {REPO / 'workflow' / 'profiles' / 'default'}"
    )
    run = subprocess.run(
        [
            "make",
            "-f",
            str(REPO / "Makefile"),
            "-o",
            f"{venv}/.installed",
            "run",
            f"VENV={venv}",
            f"PY={sys.executable}",
            f"SNAKEMAKE={snakemake}",
            "CONFIG=config.yaml",
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=environment(),
        timeout=300,
    )
    assert run.returncode != 0
    assert "LockException" in run.stdout + run.stderr
    assert "clear it with: make unlock" in run.stdout
