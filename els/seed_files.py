"""One seed's files out of its sample batch (rule finish_seed): the sample file and PNG, its nearest
training images, the pair and trajectory figures and the provenance (tensors, mosaic numbers,
figure). One job per seed does them all, so the batch file and the training set are read once and
the interpreter starts once, instead of once per file kind."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .figures import (
    machine_label,
    pair_figure,
    percent,
    plot_provenance,
    plural,
    trajectory_figure,
)
from .io import read_safetensors, write_json, write_png, write_safetensors, write_sample
from .neighbours import nearest_overall_and_in_class, training_subset
from .provenance import mosaic_summary

PROVENANCE_NAMES = ("source_image", "source_row", "source_col", "source_weight", "n_eff")


@dataclass(frozen=True)
class SeedKey:
    dataset: str
    machine: str
    cls: str  # a class id or "all"
    seed: int

    @property
    def class_id(self) -> int | None:
        return None if self.cls == "all" else int(self.cls)

    def title(self) -> str:
        return f"{self.dataset} {machine_label(self.machine)}, class {self.cls}, seed {self.seed}"


@dataclass(frozen=True)
class BatchEntry:
    """One seed's place in a sample batch file: the file's tensors and metadata and its index."""

    path: str
    tensors: Mapping[str, torch.Tensor]
    meta: Mapping[str, str]
    i: int

    @classmethod
    def read(cls, path: str | os.PathLike, seed: int) -> BatchEntry:
        tensors, meta = read_safetensors(path)
        seeds = json.loads(meta["seeds"])
        if seed not in seeds:
            raise ValueError(f"{path} holds seeds {seeds}, not seed {seed}")
        return cls(str(path), tensors, meta, seeds.index(seed))

    def get(self, name: str) -> torch.Tensor | None:
        """The seed's entry of a batch tensor (None when the batch has no such tensor)."""
        return self.tensors[name][self.i] if name in self.tensors else None

    def steps(self) -> tuple[list[float], list[int]]:
        """t and k of every reverse step."""
        return json.loads(self.meta["t"]), json.loads(self.meta["k"])


def write_seed_sample(paths: Mapping[str, str], entry: BatchEntry, key: SeedKey) -> None:
    """The seed's sample file (els.io.write_sample layout) and its PNG."""
    meta = entry.meta
    per_seed = {k: v for k, v in meta.items() if k not in ("format", "seeds", "noise_keys")}
    write_sample(
        paths["sample"],
        noise=entry.get("noise"),
        image=entry.get("image"),
        trajectory_x=entry.get("trajectory_x"),
        trajectory_denoised=entry.get("trajectory_denoised"),
        metadata={
            **per_seed,
            "seed": str(key.seed),
            "noise_key": json.loads(meta["noise_keys"])[entry.i],
            "batch_seeds": meta["seeds"],
            "batch_file": entry.path,
        },
    )
    write_png(paths["png"], entry.get("image"))


def write_neighbours(
    paths: Mapping[str, str],
    image: torch.Tensor,
    train: torch.Tensor,
    labels: torch.Tensor,
    names: list[str],
    key: SeedKey,
    max_train_per_class: int | None,
) -> dict:
    """The nearest training image over the whole set and within the class (JSON record + the two
    images); returns the record."""
    cls = key.class_id
    overall, in_class = nearest_overall_and_in_class(image, train, labels, cls)
    # was the in-class neighbour among the images the machine was built from?
    used = training_subset(labels, cls, max_train_per_class)
    record = {
        "dataset": key.dataset,
        "machine": key.machine,
        "class": key.cls,
        "seed": key.seed,
        "class_name": "all" if cls is None else names[cls],
        "nn_index": overall.index,
        "nn_class": overall.label,
        "nn_class_name": names[overall.label],
        "nn_distance": overall.distance,
        "nn_index_in_class": in_class.index,
        "nn_distance_in_class": in_class.distance,
        "nn_in_class_used_for_training": bool((used == in_class.index).any()),
        "n_train": int(used.numel()),
    }
    write_safetensors(
        paths["neighbour_images"],
        {"nearest": train[overall.index], "nearest_in_class": train[in_class.index]},
        {
            "format": "els.neighbours",
            "nn_index": str(overall.index),
            "nn_index_in_class": str(in_class.index),
        },
    )
    write_json(paths["neighbours"], record)
    return record


def write_pair_figure(
    path: str, image: torch.Tensor, train: torch.Tensor, nn: Mapping, key: SeedKey
) -> None:
    """Sample | nearest training image in its class | nearest in the whole set."""
    overall = (
        train[nn["nn_index"]],
        f"nearest in the whole set\n#{nn['nn_index']} ({nn['nn_class_name']}), "
        f"L2 = {nn['nn_distance']:.2f}",
    )
    if key.cls == "all":  # one training set: the two neighbours are the same image
        panels, cls = [overall], "all classes"
    else:
        used = "" if nn["nn_in_class_used_for_training"] else ",\nnot in the machine's images"
        in_class = (
            train[nn["nn_index_in_class"]],
            f"nearest in class {key.cls}\n#{nn['nn_index_in_class']}, "
            f"L2 = {nn['nn_distance_in_class']:.2f}{used}",
        )
        if nn["nn_index_in_class"] == nn["nn_index"]:
            overall = (overall[0], "nearest in the whole set:\nthe same image")
        panels, cls = [in_class, overall], f"class {key.cls} ({nn['class_name']})"
    pair_figure(
        path,
        image,
        panels,
        title=f"{key.dataset} {machine_label(key.machine)}: {cls}, seed {key.seed}",
    )


def write_trajectory_figure(path: str, entry: BatchEntry, key: SeedKey) -> None:
    """x and the predicted clean image at every reverse step, with t and k."""
    if "trajectory_x" not in entry.tensors:
        raise ValueError(
            f"{entry.path} holds no trajectory (sampling.trajectory was false when it was "
            "sampled); delete it to resample, or set sampling.trajectory: false"
        )
    t, k = entry.steps()
    trajectory_figure(
        path,
        t,
        k,
        entry.get("trajectory_x"),
        entry.get("trajectory_denoised"),
        noise=entry.get("noise"),
        title=key.title(),
    )


def write_provenance(
    paths: Mapping[str, str], entry: BatchEntry, machine_images: torch.Tensor, key: SeedKey
) -> dict:
    """The seed's provenance tensors, its mosaic numbers (JSON) and the provenance figure.
    `machine_images` are the training images the machine was built from (source_image indexes
    them). Returns the mosaic numbers."""
    if "provenance_n_eff" not in entry.tensors:
        raise ValueError(
            f"{entry.path} holds no provenance (sampling.provenance was false when it was "
            "sampled); delete it to resample, or set sampling.provenance: false"
        )
    prov = {name: entry.get(f"provenance_{name}").contiguous() for name in PROVENANCE_NAMES}
    write_safetensors(
        paths["provenance"],
        prov,
        {
            "format": "els.provenance",
            "t": entry.meta["t"],
            "k": entry.meta["k"],
            "seed": str(key.seed),
        },
    )
    numbers = mosaic_summary(prov["source_image"], prov["source_weight"])
    write_json(
        paths["provenance_summary"],
        {"dataset": key.dataset, "machine": key.machine, "class": key.cls, "seed": key.seed}
        | numbers,
    )
    plot_provenance(
        paths["provenance_figure"],
        entry.get("image"),
        *(prov[name] for name in PROVENANCE_NAMES),
        *entry.steps(),
        machine_images,
        title=f"{key.title()}: {plural(numbers['n_sources'], 'source image')}, the top one "
        f"supplies {percent(numbers['top_source_share'])} of the pixels",
    )
    return numbers
