"""What produced a trained model, as JSON beside its weights, and the check that shipped weights are
the ones the JSON describes.

The JSON holds the settings (model, training, data), the steps, the wall time, the machine and code
it ran on and the sha256 of the weights file; `verify_weights` loads the weights (safetensors only:
no pickle) into the architecture of the file's own config (a strict load: every tensor's name and
shape) and checks the sha256 and the architecture against the JSON.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path

import torch

from ..io import file_sha256, write_json
from .models import load_model, parameter_count, read_metadata

PROVENANCE_FORMAT = "els-cnn-provenance-1"


def code_version(where: str | Path | None = None) -> str:
    """The git commit of the checkout the code runs from ('+dirty' when tracked files differ), or
    'unknown' outside a git checkout."""
    where = Path(where) if where else Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_provenance(
    path: str | Path,
    weights: str | Path,
    settings,
    info: dict,
    *,
    device: str = "cpu",
) -> dict:
    """The provenance JSON of `weights` trained with `settings` (els.cnn.stages.CnnSettings);
    info: stage_train's result (steps, seconds, final_loss, images, parameters)."""
    record = {
        "format": PROVENANCE_FORMAT,
        "name": settings.name,
        "weights_file": Path(weights).name,
        "weights_sha256": file_sha256(weights),
        "dataset": settings.dataset,
        "classes": list(settings.classes),
        "max_train_per_class": settings.max_train_per_class,
        "conditional": settings.conditional,
        "model_config": asdict(settings.model),
        "train_config": asdict(settings.train),
        "seed": settings.train.seed,
        "steps": int(info["steps"]),
        "training_images": int(info["images"]),
        "parameters": int(info["parameters"]),
        "final_loss": float(info["final_loss"]),
        "wall_seconds": round(float(info["seconds"]), 1),
        "device": device,
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "code_version": code_version(),
        "data_fingerprint": read_metadata(weights).get("data_fingerprint"),
    }
    write_json(path, record)
    return record


def verify_weights(weights: str | Path, provenance: str | Path | None = None) -> dict:
    """Load shipped weights and check them: a safetensors model file of this package, every
    tensor's shape that of the architecture in its own header, and (with the JSON) the sha256 and
    the architecture recorded there. Returns the provenance record (or {}). Raises ValueError."""
    weights = Path(weights)
    if weights.suffix != ".safetensors":
        raise ValueError(f"{weights}: shipped weights must be a .safetensors file")
    record = {}
    if provenance is not None:
        record = json.loads(Path(provenance).read_text())
        if record.get("format") != PROVENANCE_FORMAT:
            raise ValueError(f"{provenance}: not a model provenance file")
        digest = file_sha256(weights)
        if digest != record["weights_sha256"]:
            raise ValueError(
                f"{weights}: sha256 {digest} is not the {record['weights_sha256']} of {provenance}"
            )
    try:  # a strict load: every tensor present, with the shape of the architecture in the header
        model = load_model(weights)
    except RuntimeError as err:
        raise ValueError(f"{weights}: does not fit its own architecture: {err}") from None
    if record:
        if asdict(model.config) != {
            **record["model_config"],
            "channel_mult": tuple(record["model_config"]["channel_mult"]),
        }:
            raise ValueError(f"{weights}: its architecture differs from {provenance}'s")
        if parameter_count(model) != record["parameters"]:
            raise ValueError(f"{weights}: parameter count differs from {provenance}'s")
    return record


def provenance_path(weights: str | Path) -> Path:
    """models/X.safetensors -> models/X.json"""
    return Path(os.fspath(weights)).with_suffix(".json")
