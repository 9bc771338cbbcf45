"""The workflow on a real SLURM, under faults, reruns and bad inputs (tiny config of tests/tiny_workflow.py).

- SLURM (``-m slurm``): the tiny workflow through ``workflow/profiles/slurm`` on the local
  single-node SLURM of workflow/slurm/ (started when we are root and it is not up; skipped with
  the reason otherwise, a failure with SLURM's logs under CI=true: tests/slurm_local.py); every job is COMPLETED in ``sacct`` with the rule's resources, and
  every output is byte-identical to the local reference run.
- Faults: SIGKILL of a running sampling job, and of the Snakemake process, each at the worst moment
  (the output complete under its temporary name, not yet renamed into place); no partial or
  unconfirmed file is taken as finished, and the rerun gives the same bytes as an uninterrupted run.
  A writer killed mid-write leaves the previous file intact.
- Determinism: ``--cores 1`` vs ``--cores 2`` (byte-identical), seeds batched together vs alone
  (the same noise, images within 1e-6).
- Bad inputs, through ``snakemake`` for config-level errors and through ``els.data`` for
  data-level ones: each message names the problem; a failed run leaves finished outputs as they
  were.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from slurm_local import ACCOUNT, PARTITION, unavailable
from tiny_workflow import (
    DATASET,
    SLURM_PROFILE,
    assert_same_files,
    copy_results,
    environment,
    kill_group,
    make_workdir,
    read_audit,
    reference_audit,
    reference_run,
    result_files,
    run_snakemake,
    shared_root,
    start_snakemake,
    tiny_config,
    wait_for,
    write_config,
    write_image_folder,
)

from els.io import read_safetensors

pytestmark = pytest.mark.slow

BATCH = f"results/samples/{DATASET}/bbels/0/batches/seeds0-1.safetensors"
SEEDS = [f"results/samples/{DATASET}/bbels/0/seed{s}.safetensors" for s in (0, 1)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return shared_root(tmp_path_factory) / "images"


def fresh_workdir(tmp_path: Path, images: Path, reference, **sampling) -> Path:
    """A workdir with the tiny config and the reference's prepared data and index (with mtimes)."""
    workdir = make_workdir(tmp_path / "work", tiny_config(images, **sampling))
    copy_results(reference.workdir, workdir, "data", "index")
    return workdir


def snapshot(workdir: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under results/."""
    return {
        name: (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for name, path in result_files(workdir).items()
    }


def temporaries(workdir: Path) -> list[str]:
    return sorted(str(p.relative_to(workdir)) for p in (workdir / "results").rglob("*.tmp"))


# ----------------------------------------------------------------------------- the reference run


def test_reference_run_writes_every_output_atomically(reference, tmp_path_factory):
    """Every file under results/ was renamed into place (tmp-then-rename) and never opened for
    writing under its final name, by any process of the run (Python audit hooks)."""
    audit = reference_audit(tmp_path_factory)
    outputs = {str(p) for p in result_files(reference.workdir).values()}
    # the 11 jobs' outputs and the data's input manifest (results/data/Tiny/inputs/<key>/inputs.json)
    assert len(outputs) == 19, sorted(outputs)
    renamed = {e["path"] for e in audit if e["event"] == "rename"}
    written_in_place = {e["path"] for e in audit if e["event"] == "write"} & outputs
    assert written_in_place == set(), f"opened for writing under the final name: {written_in_place}"
    assert outputs <= renamed, f"not renamed into place: {sorted(outputs - renamed)}"
    assert temporaries(reference.workdir) == []


def test_killed_writer_leaves_the_previous_file_and_no_partial_one(tmp_path):
    """SIGKILL in the middle of els.io.write_with (half the bytes written): the file keeps its old
    content; only the hidden temporary is left, and the next write removes it."""
    target = tmp_path / "out" / "sample.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"old complete content")
    script = f"""
import os, signal
from els.io import write_with
def writer(tmp):
    with open(tmp, "wb") as f:
        f.write(b"new partial cont")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
write_with({str(target)!r}, writer)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old complete content"
    leftovers = [p.name for p in target.parent.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].startswith(".sample.safetensors.")
    from els.io import write_text

    write_text(target, "rewritten")
    assert sorted(p.name for p in target.parent.iterdir()) == ["sample.safetensors"]
    assert target.read_text() == "rewritten"


# ----------------------------------------------------------------------------- SLURM

# The plugin checks job states first after this many seconds, then 10 s later each time nothing
# finished: a bit more than a tiny job takes keeps every step of the chain at about this long.
STATUS_INIT_S = os.environ.get("ELS_SLURM_TEST_STATUS_INIT_S", "12")


SLURM_TEST = "test_tiny_workflow_on_slurm_is_byte_identical_to_the_local_run"


@pytest.fixture(scope="module", autouse=True)
def slurm_run(request, tmp_path_factory):
    """The tiny workflow through workflow/profiles/slurm, started in the background when this
    module starts (if its SLURM test is selected), so that its queue and status-check waits overlap
    the other tests; the SLURM test, last in the module, waits for it."""
    state: dict = {}
    if not any(item.name == SLURM_TEST for item in request.session.items):
        yield state
        return
    reason = request.getfixturevalue("slurm_session")
    if reason is not None:
        state["skip"] = reason
        yield state
        return
    images = shared_root(tmp_path_factory) / "images"
    workdir = make_workdir(tmp_path_factory.mktemp("slurm") / "work", tiny_config(images))
    log = workdir.parent / "snakemake.log"
    process = start_snakemake(
        workdir,
        "--profile",
        str(SLURM_PROFILE),
        "--jobs",
        "4",
        "--default-resources",
        f"slurm_account={ACCOUNT}",
        f"slurm_partition={PARTITION}",
        "--slurm-init-seconds-before-status-checks",
        STATUS_INIT_S,
        "--seconds-between-status-checks",
        "1",
        log=log,
        profile=None,
    )
    state.update(process=process, workdir=workdir, log=log, start=time.monotonic())

    def watch():
        process.wait()
        state["seconds"] = time.monotonic() - state["start"]

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    state["watcher"] = watcher
    yield state
    if process.poll() is None:  # the test did not wait for it (failed or deselected early)
        kill_group(process)
        jobs = re.findall(r"submitted with SLURM jobid (\d+)", log.read_text())
        if jobs:
            subprocess.run(["scancel", *jobs], capture_output=True, timeout=60)


def sacct_rows(jobids: list[str], timeout: float = 60) -> dict[str, dict[str, str]]:
    """sacct fields of the jobs, once every one has a final state and its fields filled in."""
    fields = ["JobID", "State", "ExitCode", "Comment", "AllocCPUS", "ReqMem", "Timelimit"]
    end = time.monotonic() + timeout
    rows: dict[str, dict[str, str]] = {}
    while time.monotonic() < end:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", ",".join(jobids), "-o", ",".join(fields)],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        rows = {
            line.split("|")[0]: dict(zip(fields, line.split("|"), strict=True))
            for line in out.splitlines()
            if line.strip()
        }
        if set(rows) == set(jobids) and all(
            r["State"] not in ("PENDING", "RUNNING", "COMPLETING") and all(r.values())
            for r in rows.values()
        ):
            break
        time.sleep(0.5)
    return rows


# ----------------------------------------------------------------------------- faults


def _pause_env(tmp_path: Path, workdir: Path, target: str) -> tuple[dict[str, str], Path, Path]:
    audit, release = tmp_path / "audit.jsonl", tmp_path / "release"
    env = environment(audit, workdir / "results")
    env["ELS_AUDIT_PAUSE"] = str(workdir / target)
    env["ELS_AUDIT_RELEASE"] = str(release)
    return env, audit, release


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (this container's init reaps orphans lazily)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return not re.search(r"^State:\s+Z", status, re.M)


def _paused(audit: Path):
    return next((e for e in read_audit(audit) if e["event"] == "paused"), None)


def test_sigkill_of_a_running_sampling_job_then_rerun(reference, images, tmp_path):
    """The sample_batch job is SIGKILLed with its output complete under the temporary name: the
    run fails, nothing is under the final name, and the rerun gives the reference's bytes."""
    workdir = fresh_workdir(tmp_path, images, reference)
    env, audit, _ = _pause_env(tmp_path, workdir, BATCH)
    snakemake = start_snakemake(workdir, "--cores", "1", *SEEDS, log=tmp_path / "run1.log", env=env)
    try:
        paused = wait_for(lambda: _paused(audit), 240, "sample_batch to reach its rename")
        os.kill(paused["pid"], signal.SIGKILL)
        assert snakemake.wait(timeout=120) != 0
    finally:
        kill_group(snakemake)
    log = (tmp_path / "run1.log").read_text()
    assert "Error in rule sample_batch" in log, log[-3000:]
    assert not (workdir / BATCH).exists() and not any((workdir / s).exists() for s in SEEDS)
    assert len(temporaries(workdir)) == 1  # the complete-but-unconfirmed file, never renamed
    rerun = run_snakemake(workdir, "--cores", "1", *SEEDS)
    assert re.search(r"sample_batch\s+1\n", rerun.output), rerun.output[-3000:]
    assert temporaries(workdir) == []  # the stale temporary was cleared by the rerun's writer
    assert_same_files(reference.workdir, workdir, only="samples")


def test_sigkill_of_snakemake_then_rerun(reference, images, tmp_path):
    """Snakemake itself is SIGKILLed while sample_batch is about to rename its output; the orphaned
    job then finishes and renames a complete file into place. The file was never confirmed, so the
    rerun (after --unlock, as Snakemake asks) recomputes it instead of trusting it, and the results
    equal the reference's."""
    workdir = fresh_workdir(tmp_path, images, reference)
    env, audit, release = _pause_env(tmp_path, workdir, BATCH)
    snakemake = start_snakemake(workdir, "--cores", "2", *SEEDS, log=tmp_path / "run1.log", env=env)
    try:
        paused = wait_for(lambda: _paused(audit), 240, "sample_batch to reach its rename")
        os.kill(snakemake.pid, signal.SIGKILL)
        snakemake.wait(timeout=60)
        release.touch()
        wait_for(lambda: (workdir / BATCH).exists(), 60, "the orphaned job to finish")
        wait_for(lambda: not alive(paused["pid"]), 60, "the job to exit")
    finally:
        release.touch()
        kill_group(snakemake)
    # Snakemake had marked the batch incomplete when the job started; nothing confirmed it since
    marker = base64.urlsafe_b64encode(BATCH.encode()).decode()
    assert (workdir / ".snakemake" / "incomplete" / marker).exists()
    locked = run_snakemake(workdir, "--cores", "2", *SEEDS, check=False)
    if locked.returncode != 0:  # the killed Snakemake's lock
        assert "--unlock" in locked.output and "Directory cannot be locked" in locked.output
        run_snakemake(workdir, "--cores", "2", "--unlock", *SEEDS)
        rerun = run_snakemake(workdir, "--cores", "2", *SEEDS)
    else:
        rerun = locked
    # rerun-incomplete: the complete-looking but unconfirmed batch is recomputed, not trusted
    assert re.search(r"sample_batch\s+1\n", rerun.output), rerun.output[-3000:]
    assert "reason: Forced execution" in rerun.output
    assert temporaries(workdir) == []
    assert_same_files(reference.workdir, workdir, only="samples")


# ----------------------------------------------------------------------------- determinism


def test_one_core_gives_the_same_bytes_as_two(reference, images, tmp_path):
    workdir = fresh_workdir(tmp_path, images, reference)
    run_snakemake(workdir, "--cores", "1", *SEEDS)
    assert_same_files(reference.workdir, workdir, only="samples")


def test_the_pipelines_sample_is_the_librarys_sample(reference, images, tmp_path):
    """The batch file equals els.sample on the saved index with the pipeline's noise."""
    import els
    from els.noise import noise_for
    from els.scales import read_scales

    batch, _ = read_safetensors(reference.workdir / BATCH)
    index = els.PatchIndex.load(reference.workdir / f"results/index/{DATASET}/bbels/0.safetensors")
    shape = index.images.shape[1:]
    noise = torch.stack([noise_for(DATASET, "0", s, shape) for s in (0, 1)])
    direct = els.sample(
        "bbels",
        None,
        read_scales(reference.workdir / "scales" / "tiny.txt"),
        noise,
        index=index,
        disable=True,
    )
    assert torch.equal(batch["image"], direct)


def test_seeds_sampled_alone_equal_seeds_sampled_together(reference, images, tmp_path):
    """Seeds 0 and 1 sampled in one job (batch seeds0-1) and each alone (batches seeds0-0, seeds1-1),
    in float32 (the default dtype): the same noise, images within 1e-6 (in fact bit-identical: the
    products run per image, see els/csrc/patch_softmax.h), the same metadata but for the seeds."""
    workdir = fresh_workdir(tmp_path, images, reference)
    batches = f"results/samples/{DATASET}/bbels/0/batches"
    run_snakemake(
        workdir,
        "--cores",
        "2",
        *(f"{batches}/seeds{b}.safetensors" for b in ("0-1", "0-0", "1-1")),
    )
    together, together_meta = read_safetensors(workdir / batches / "seeds0-1.safetensors")
    assert together_meta["dtype"] == "float32"
    for seed in (0, 1):
        alone, alone_meta = read_safetensors(workdir / batches / f"seeds{seed}-{seed}.safetensors")
        assert json.loads(alone_meta["seeds"]) == [seed]
        assert torch.equal(alone["noise"][0], together["noise"][seed])
        assert float((alone["image"][0] - together["image"][seed]).abs().max()) <= 1e-6
        per_batch = ("seeds", "noise_keys")
        assert {k: v for k, v in alone_meta.items() if k not in per_batch} == {
            k: v for k, v in together_meta.items() if k not in per_batch
        }


# ----------------------------------------------------------------------------- bad config


def _bad_config_cases(images: Path) -> dict[str, tuple[dict, str | None, str | tuple[str, ...]]]:
    """name -> (config, schedule file text or None, text(s) the message must contain)."""

    def config(**changes) -> dict:
        cfg = json.loads(json.dumps(tiny_config(images)))
        for dotted, value in changes.items():
            *parents, key = dotted.split("__")
            node = cfg
            for parent in parents:
                node = node[parent]
            if value is None:
                node.pop(key)
            else:
                node[key] = value
        return cfg

    mnist = {
        "source": "torchvision",
        "classes": [3, 12],
        "seeds": [0],
        "machines": ["bbels"],
        "schedules": {"bbels": "scales/tiny.txt"},
    }
    return {
        "unknown config key": (
            config(sampling__devise="cpu"),
            None,
            "sampling.devise: unknown key; allowed here: batch_seeds, device, dtype,",
        ),
        "wrong type": (
            config(sampling__batch_seeds="two"),
            None,
            "sampling.batch_seeds: 'two' is not of type integer",
        ),
        "even k": (
            config(),
            "5 4 3\n",
            "datasets.Tiny.schedules.bbels: scales/tiny.txt: entry 1 is 4; patch sizes must be odd and positive",
        ),
        "zero k": (
            config(),
            "5 3 0\n",
            "datasets.Tiny.schedules.bbels: scales/tiny.txt: entry 2 is 0; patch sizes must be odd and positive",
        ),
        "negative k": (
            config(),
            "5 -3 3\n",
            "datasets.Tiny.schedules.bbels: scales/tiny.txt: entry 1 is -3; patch sizes must be odd and positive",
        ),
        "schedule too short": (
            config(),
            "5\n",
            "datasets.Tiny.schedules.bbels: scales/tiny.txt: needs at least 2 patch sizes, got 1",
        ),
        "schedule not integers": (
            config(),
            "5 three 3\n",
            "datasets.Tiny.schedules.bbels: scales/tiny.txt, line 1: 'three' is not an integer patch size",
        ),
        "schedule file missing": (
            config(datasets__Tiny__schedules={"bbels": "scales/missing.txt"}),
            None,
            "datasets.Tiny.schedules.bbels: schedule file scales/missing.txt does not exist",
        ),
        "class id out of range": (
            config(datasets={"MNIST": mnist}),
            None,
            "datasets.MNIST: class ids [12] do not exist; MNIST has classes 0..9",
        ),
        "unknown dataset": (
            config(datasets={"CelebB": {**mnist, "classes": [0]}}),
            None,
            "datasets.CelebB: source 'torchvision' needs the dataset key to be one of MNIST, FashionMNIST, CIFAR10",
        ),
        "unknown machine": (
            config(datasets__Tiny__machines=["bbels", "vae"]),
            None,
            "datasets.Tiny.machines[1]: 'vae' is not allowed; choose one of ideal, ls, els, bbels,",
        ),
    }


@pytest.fixture(scope="module")
def bad_config_runs(reference, images, tmp_path_factory):
    """Each bad config through `snakemake -n` in a copy of the finished reference workdir (two at a
    time): name -> (Run, results before, results after)."""
    root = tmp_path_factory.mktemp("bad_configs")
    cases = _bad_config_cases(images)

    def one(name: str):
        cfg, schedule, _ = cases[name]
        workdir = root / name.replace(" ", "_")
        shutil.copytree(reference.workdir, workdir, symlinks=True)
        write_config(workdir, cfg)
        if schedule is not None:
            (workdir / "scales" / "tiny.txt").write_text(schedule)
        before = snapshot(workdir)
        run = run_snakemake(workdir, "--cores", "2", check=False)
        return name, (run, before, snapshot(workdir))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, cases))


@pytest.mark.parametrize("name", sorted(_bad_config_cases(Path("/images"))))
def test_bad_config_is_a_clear_error_and_loses_nothing(bad_config_runs, images, name):
    run, before, after = bad_config_runs[name]
    expected = _bad_config_cases(images)[name][2]
    assert run.returncode != 0
    for text in (expected,) if isinstance(expected, str) else expected:
        assert text in run.output, run.output[-3000:]
    assert after == before  # no finished output deleted, rewritten or touched


# ----------------------------------------------------------------------------- bad data


def _gray(path: Path, size=(32, 32), value=100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, dtype=np.uint8), mode="L").save(path)


def _idx_gz(path: Path, magic: int, array: np.ndarray) -> None:
    import gzip
    import struct

    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _prepare(tmp_path: Path, dataset: str, **kwargs):
    from els.data import prepare_dataset

    return prepare_dataset(
        dataset, tmp_path / "raw", tmp_path / "prepared" / "train.safetensors", **kwargs
    )


def test_dataset_missing_without_network_or_local_copy_says_how_to_get_it(tmp_path, monkeypatch):
    """No network (every connection refused) and no local copy: the message lists what was tried
    and how to get the files (the Debian package for FashionMNIST, a local folder, the network)."""
    import socket

    from els.data import DatasetUnavailable

    def refuse(*args, **kwargs):
        raise OSError("Network is unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(DatasetUnavailable) as error:
        _prepare(tmp_path, "FashionMNIST", local_dirs=[tmp_path / "nowhere"], allow_apt=False)
    message = str(error.value)
    assert "Could not obtain the FashionMNIST training files" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "data.local_dirs" in message and "train-images-idx3-ubyte.gz" in message
    assert "Network is unreachable" in message
    assert not (tmp_path / "prepared" / "train.safetensors").exists()


def test_truncated_raw_file_is_refused(tmp_path):
    from els.data import DatasetCorrupt

    local = tmp_path / "local" / "fashion-mnist"
    _idx_gz(local / "train-images-idx3-ubyte.gz", 2051, np.zeros((10, 28, 28)))
    _idx_gz(local / "train-labels-idx1-ubyte.gz", 2049, np.zeros(10))
    data = (local / "train-images-idx3-ubyte.gz").read_bytes()
    (local / "train-images-idx3-ubyte.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetCorrupt) as error:
        _prepare(tmp_path, "FashionMNIST", local_dirs=[local.parent], allow_download=False)
    assert "train-images-idx3-ubyte.gz: cannot decompress" in str(error.value)
    assert "truncated or corrupted" in str(error.value)


def test_corrupted_raw_file_fails_its_checksum(tmp_path):
    """A FashionMNIST file whose content is not the recorded one (a corrupted copy)."""
    from els.data import RECORDED_SHA256, DatasetCorrupt

    local = tmp_path / "local" / "fashion-mnist"
    _idx_gz(local / "train-images-idx3-ubyte.gz", 2051, np.zeros((10, 28, 28)))
    _idx_gz(local / "train-labels-idx1-ubyte.gz", 2049, np.zeros(10))
    with pytest.raises(DatasetCorrupt) as error:
        _prepare(tmp_path, "FashionMNIST", local_dirs=[local.parent], allow_download=False)
    recorded = RECORDED_SHA256["FashionMNIST"]["train-images-idx3-ubyte"]
    assert (
        f"does not match the recorded FashionMNIST train-images-idx3-ubyte sha256 {recorded}"
        in (str(error.value))
    )


@pytest.mark.parametrize(
    "case,expected",
    [
        ("mixed sizes", "differ in size"),
        ("unreadable file", "cannot read image"),
        ("no images", "no images found in"),
        ("class without images", "has no images"),
    ],
)
def test_bad_image_folder_is_refused_with_the_file_named(tmp_path, case, expected):
    from els.data import DatasetError

    folder = tmp_path / "images"
    write_image_folder(folder, classes=2, per_class=2)
    if case == "mixed sizes":
        _gray(folder / "c1" / "big.png", size=(40, 32))
        named = folder / "c1" / "big.png"
    elif case == "unreadable file":
        (folder / "c0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        named = folder / "c0" / "broken.png"
    elif case == "no images":
        shutil.rmtree(folder)
        folder.mkdir()
        (folder / "notes.txt").write_text("no images here")
        named = folder
    else:
        (folder / "c2").mkdir()
        (folder / "c2" / "readme.txt").write_text("nothing")
        named = folder / "c2"
    with pytest.raises(DatasetError) as error:
        _prepare(tmp_path, "imagefolder", folder=folder, channels=1)
    assert expected in str(error.value) and str(named) in str(error.value), str(error.value)
    assert not (tmp_path / "prepared" / "train.safetensors").exists()


def test_class_id_beyond_an_image_folder_is_refused(reference):
    """An image folder's classes are only known once it is prepared: build_index and sample_batch
    load the class with els.data.load_prepared, which names the valid ids."""
    from els.data import load_prepared

    train = reference.workdir / "results" / "data" / DATASET / "train.safetensors"
    with pytest.raises(ValueError) as error:
        load_prepared(train, cls=5, max_per_class=4)
    assert f"class 5 is out of range for {train}: valid classes are 0..1 (0=c0, 1=c1)" in str(
        error.value
    )


def test_failed_run_with_a_bad_dataset_keeps_the_finished_outputs(reference, images, tmp_path):
    """A finished workdir, then a config that adds a dataset whose images differ in size: the
    prepare_data job fails with the message in Snakemake's output, and every finished output is
    left as it was (bytes and mtime)."""
    workdir = tmp_path / "work"
    shutil.copytree(reference.workdir, workdir, symlinks=True)
    broken = tmp_path / "broken"
    write_image_folder(broken, classes=1, per_class=2)
    _gray(broken / "c0" / "odd.png", size=(28, 28))
    cfg = tiny_config(images)
    cfg["datasets"]["Broken"] = {**cfg["datasets"][DATASET], "path": str(broken)}
    write_config(workdir, cfg)
    before = snapshot(workdir)
    run = run_snakemake(workdir, "--cores", "2", check=False)
    assert run.returncode != 0
    assert "Error in rule prepare_data" in run.output
    assert f"images in {broken} differ in size" in run.output, run.output[-3000:]
    after = snapshot(workdir)
    assert {k: v for k, v in after.items() if k in before} == before
    # the only Broken file is the manifest of its inputs, written at start-up (els/inputs.py)
    assert [k for k in after if "Broken" in k and not k.endswith("/inputs.json")] == []


# ----------------------------------------------------------------------------- SLURM (last)


@pytest.mark.slurm
def test_tiny_workflow_on_slurm_is_byte_identical_to_the_local_run(slurm_run, reference):
    """Every job ran as a SLURM job (sacct: COMPLETED, exit 0, the rule in the comment, the rule's
    resources as the allocation), SLURM's logs are where the README says, and every output file
    equals the local reference run's byte for byte (summary.csv but for its runtime columns)."""
    if "skip" in slurm_run:
        unavailable(slurm_run["skip"])
    slurm_run["watcher"].join(timeout=900)
    workdir, output = slurm_run["workdir"], slurm_run["log"].read_text()
    assert slurm_run["process"].returncode == 0, output[-6000:]
    print(f"\nSLURM run of the tiny workflow: {slurm_run['seconds']:.1f} s wall")
    jobids = re.findall(r"submitted with SLURM jobid (\d+)", output)
    # prepare_data, select_data, build_index, sample_batch, the two finish_seed jobs as one
    # group job (workflow/profiles/slurm: groups), grid_figure, summary
    assert len(jobids) == 7, output[-4000:]
    rows = sacct_rows(jobids)
    assert sorted(rows) == sorted(jobids)
    assert {r["State"] for r in rows.values()} == {"COMPLETED"}, rows
    assert {r["ExitCode"] for r in rows.values()} == {"0:0"}
    comments = sorted(r["Comment"] for r in rows.values())
    for rule in (
        "prepare_data",
        "select_data",
        "build_index",
        "sample_batch",
        "grid_figure",
        "summary",
    ):
        assert sum(c.startswith(f"rule_{rule}") for c in comments) == 1, comments
    assert sum(c.startswith("rule_seeds_finish_seed") for c in comments) == 1, comments
    # the rule's resources (config `resources:`) became the job's allocation
    batch = next(r for r in rows.values() if r["Comment"].startswith("rule_sample_batch"))
    assert batch["AllocCPUS"] == "1" and batch["ReqMem"].startswith("500M")
    assert batch["Timelimit"] == "00:10:00"
    # SLURM's own logs where the README says
    logs = sorted((workdir / "logs" / "slurm").rglob("*.log"))
    assert len(logs) == 7 and {p.stem for p in logs} == set(jobids)
    assert_same_files(reference.workdir, workdir)
    assert temporaries(workdir) == []
