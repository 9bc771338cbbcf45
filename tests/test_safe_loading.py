"""Safe loading: nothing the pipeline reads is unpickled.

Tensors are stored as safetensors (read with ``safetensors.safe_open`` / ``load_file``, which parse
a JSON header and raw bytes), schedules and metadata as text/JSON/CSV. This module checks that:

- the sources (``els/``, ``workflow/``, ``Snakefile``, ``benchmarks/``) never call a pickle-based
  loader: no ``pickle``/``dill``/``joblib``/``cloudpickle``/``shelve``/``marshal``, no
  ``torch.load`` without ``weights_only=True``, no ``np.load``/``np.save`` with
  ``allow_pickle=True``, no ``pandas.read_pickle``/``to_pickle``, no ``torch.save`` (a pickle
  writer), no ``yaml.load`` without a safe loader, no ``yaml.unsafe_load``/``full_load``;
- the one documented exception holds: CIFAR-10's official python batches are pickles, unpickled by
  ``torchvision.datasets.CIFAR10`` only after every file's md5 matched torchvision's record
  (``els/data.py:_read_cifar10``; test_data.py checks the behaviour);
- every loader of the library refuses a pickle (plain or ``torch.save`` zip) dressed up as one of
  its files without running it;
- every file the tiny pipeline writes is safetensors, JSON, CSV, PNG, HTML or plain text
  (``test_every_pipeline_output_is_a_safe_format``, on the tiny workflow run of
  tests/tiny_workflow.py).
"""

from __future__ import annotations

import ast
import json
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PYTHON_SOURCES = sorted(
    p
    for folder in ("els", "workflow", "benchmarks")
    for p in (REPO / folder).rglob("*.py")
    if "__pycache__" not in p.parts
)
SNAKEMAKE_SOURCES = sorted([REPO / "Snakefile", *(REPO / "workflow" / "rules").glob("*.smk")])

PICKLE_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "joblib",
    "cloudpickle",
    "shelve",
    "marshal",
}
# dotted call names (after resolving import aliases) that unpickle or pickle, whatever the arguments
FORBIDDEN_CALLS = {
    "pandas.read_pickle": "pandas.read_pickle unpickles",
    "torch.save": "torch.save writes a pickle (store tensors with safetensors)",
    "yaml.unsafe_load": "yaml.unsafe_load can build arbitrary objects",
    "yaml.full_load": "yaml.full_load is not the safe loader",
    "yaml.load_all": "yaml.load_all without the safe loader",
    "numpy.lib.format.read_array": "read_array may unpickle object arrays",
}
FORBIDDEN_METHODS = {"to_pickle": "DataFrame.to_pickle writes a pickle", "read_pickle": "unpickles"}


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """'torch.load' for torch.load(...), with import aliases resolved (np -> numpy)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str, filename: str) -> list[str]:
    """Every pickle-based load/save in a Python source, as 'file:line: why'."""
    tree = ast.parse(source, filename=filename)
    aliases: dict[str, str] = {}
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0]
                )
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    problems.append(f"{filename}:{node.lineno}: imports {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            if root in PICKLE_MODULES:
                problems.append(f"{filename}:{node.lineno}: imports from {node.module}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases) or ""
        where = f"{filename}:{node.lineno}"
        if name in FORBIDDEN_CALLS:
            problems.append(f"{where}: {name}: {FORBIDDEN_CALLS[name]}")
        elif name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            problems.append(f"{where}: torch.load without weights_only=True")
        elif name in ("numpy.load", "numpy.save", "numpy.savez", "numpy.savez_compressed") and (
            _is_true(_keyword(node, "allow_pickle"))
        ):
            problems.append(f"{where}: {name} with allow_pickle=True")
        elif name == "yaml.load":
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            loader_name = _dotted(loader, aliases) if loader is not None else None
            if not loader_name or "Safe" not in loader_name:
                problems.append(f"{where}: yaml.load without yaml.SafeLoader")
        elif isinstance(node.func, ast.Attribute) and node.func.attr in FORBIDDEN_METHODS:
            problems.append(f"{where}: .{node.func.attr}(): {FORBIDDEN_METHODS[node.func.attr]}")
    return problems


SNAKEMAKE_PATTERNS = [
    (
        re.compile(
            r"\b(?:import|from)\s+(?:c?[Pp]ickle|_pickle|dill|joblib|cloudpickle|shelve|marshal)\b"
        ),
        "imports a pickle module",
    ),
    (
        re.compile(r"\btorch\.load\s*\((?![^)]*weights_only\s*=\s*True)"),
        "torch.load without weights_only=True",
    ),
    (re.compile(r"allow_pickle\s*=\s*True"), "allow_pickle=True"),
    (re.compile(r"\b(?:read_pickle|to_pickle|unsafe_load|full_load)\s*\("), "pickle/unsafe loader"),
    (re.compile(r"\btorch\.save\s*\("), "torch.save writes a pickle"),
]


# ----------------------------------------------------------------------------- the audit itself


def test_the_audit_finds_what_it_should():
    """The checker flags each forbidden form (so a clean result below means something)."""
    bad = "\n".join(
        [
            "import pickle",
            "import numpy as np, torch, yaml, pandas as pd",
            "from joblib import load",
            "torch.load('m.pt')",
            "torch.load('m.pt', weights_only=False)",
            "np.load('a.npy', allow_pickle=True)",
            "pd.read_pickle('x')",
            "df.to_pickle('x')",
            "torch.save({}, 'x')",
            "yaml.load(open('c'))",
            "yaml.unsafe_load('a: 1')",
        ]
    )
    problems = unsafe_calls(bad, "bad.py")
    flagged = {int(p.split(":")[1]) for p in problems}
    assert flagged == {1, *range(3, 12)}, problems  # every line but the plain imports
    good = "\n".join(
        [
            "import numpy as np, torch, yaml",
            "torch.load('m.pt', weights_only=True)",
            "np.load('a.npz')",
            "yaml.load(open('c'), Loader=yaml.SafeLoader)",
            "yaml.safe_load('a: 1')",
        ]
    )
    assert unsafe_calls(good, "good.py") == []
    for text, _ in SNAKEMAKE_PATTERNS:
        assert (
            text.search(
                "x = torch.load(p)\nimport pickle\nnp.load(p, allow_pickle=True)\n"
                "pd.read_pickle(p)\ntorch.save(m, p)"
            )
            is not None
        )


def test_no_python_source_pickles_or_unpickles():
    assert PYTHON_SOURCES and any(p.parent.name == "scripts" for p in PYTHON_SOURCES)
    problems = []
    for path in PYTHON_SOURCES:
        problems += unsafe_calls(path.read_text(), str(path.relative_to(REPO)))
    assert problems == [], "\n".join(problems)


def test_no_snakefile_or_rule_file_pickles_or_unpickles():
    assert (REPO / "Snakefile").is_file()
    problems = []
    for path in SNAKEMAKE_SOURCES:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, why in SNAKEMAKE_PATTERNS:
                if pattern.search(code):
                    problems.append(f"{path.relative_to(REPO)}:{lineno}: {why}")
    assert problems == [], "\n".join(problems)


def test_cifar10_pickles_are_unpickled_only_after_their_md5_matched():
    """The one pickle format read anywhere (CIFAR-10's python batches, unpickled by torchvision):
    in els/data.py the CIFAR10 dataset object is only built in _read_cifar10, after a loop that
    calls _require_md5 on every file torchvision will open."""
    source = (REPO / "els" / "data.py").read_text()
    tree = ast.parse(source)
    builders = []
    for func in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        for node in ast.walk(func):
            if isinstance(node, ast.Call):
                name = _dotted(node.func, {}) or ""
                if name == "cifar" or name.endswith("datasets.CIFAR10"):
                    if _keyword(node, "root") is not None or node.args:
                        builders.append((func, node))
    assert [func.name for func, _ in builders] == ["_read_cifar10"], [f.name for f, _ in builders]
    func, build = builders[0]
    md5_checks = [
        n
        for n in ast.walk(func)
        if isinstance(n, ast.Call) and _dotted(n.func, {}) == "_require_md5"
    ]
    assert md5_checks and all(n.lineno < build.lineno for n in md5_checks)
    download = _keyword(build, "download")
    assert isinstance(download, ast.Constant) and download.value is False


# ----------------------------------------------------------------------------- loaders refuse pickles


class _Payload:
    """Unpickling this creates the marker file: proof that something unpickled it."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_files(tmp_path: Path) -> tuple[Path, list[Path]]:
    marker = tmp_path / "UNPICKLED"
    payload = _Payload()
    payload.marker = str(marker)
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(pickle.dumps({"image": payload}))
    zipped = tmp_path / "zipped.safetensors"
    with zipped.open("wb") as f:
        torch.save({"image": payload}, f)  # the test data itself, not pipeline code
    # a safetensors-looking header length in front of a pickle
    header = tmp_path / "header.safetensors"
    body = pickle.dumps(payload)
    header.write_bytes(struct.pack("<Q", len(body)) + body)
    assert not marker.exists()
    return marker, [plain, zipped, header]


def _loaders():
    from els.cnn.models import load_model, read_metadata
    from els.data import class_names, load_prepared
    from els.index import PatchIndex
    from els.io import read_safetensors, read_sample
    from els.scales import read_scales

    def checkpoint(path):
        from els.cnn.models import ModelConfig, build_model
        from els.cnn.train import load_checkpoint

        model = build_model(ModelConfig(channels=4, num_blocks=1))
        return load_checkpoint(path, model, torch.optim.SGD(model.parameters(), lr=0.1))

    return {
        "els.io.read_safetensors": read_safetensors,
        "els.io.read_sample": read_sample,
        "els.data.load_prepared": load_prepared,
        "els.data.class_names": class_names,
        "els.index.PatchIndex.load": PatchIndex.load,
        "els.cnn.models.read_metadata": read_metadata,
        "els.cnn.models.load_model": load_model,
        "els.cnn.train.load_checkpoint": checkpoint,
        "els.scales.read_scales": read_scales,
    }


@pytest.mark.parametrize("loader", sorted(_loaders()))
def test_loaders_refuse_a_pickle_without_running_it(tmp_path, loader):
    marker, files = _pickle_files(tmp_path)
    load = _loaders()[loader]
    for path in files:
        with pytest.raises(Exception):  # noqa: B017 - any refusal will do, as long as it refuses
            load(path)
        assert not marker.exists(), f"{loader} unpickled {path.name}"


# ----------------------------------------------------------------------------- pipeline outputs

SAFETENSORS_SUFFIXES = {".safetensors"}
TEXT_SUFFIXES = {".json", ".csv", ".txt", ".tsv", ".log", ".html", ".rst", ".yaml"}


def file_kind(path: Path) -> str:
    """'safetensors', 'png', 'json', 'csv', 'html' or 'text' by content; raises if none fits."""
    data = path.read_bytes()
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if path.suffix == ".safetensors":
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        assert isinstance(header, dict)
        return "safetensors"
    text = data.decode("utf-8")  # raises on binary content
    if path.suffix == ".json":
        json.loads(text)
        return "json"
    if path.suffix == ".csv":
        return "csv"
    if path.suffix == ".html":
        assert "<html" in text[:2000].lower() or "<!doctype html" in text[:2000].lower()
        return "html"
    if path.suffix in TEXT_SUFFIXES:
        return "text"
    raise ValueError(f"{path}: unexpected file type (suffix {path.suffix!r})")


@pytest.mark.slow
def test_every_pipeline_output_is_a_safe_format(tmp_path_factory):
    """Every file under results/ after the tiny workflow (and its report) is safetensors, PNG,
    JSON, CSV, HTML or text; none is a pickle, .pt, .pkl, .npy or .npz."""
    from tiny_workflow import reference_run

    run = reference_run(tmp_path_factory)
    files = [p for p in (run.workdir / "results").rglob("*") if p.is_file()]
    assert len(files) > 10
    kinds = {}
    for path in files:
        assert path.suffix not in {".pt", ".pth", ".pkl", ".pickle", ".npy", ".npz", ".ckpt"}, path
        kinds[str(path.relative_to(run.workdir))] = file_kind(path)
    assert {"safetensors", "png", "json", "csv"} <= set(kinds.values()), kinds
