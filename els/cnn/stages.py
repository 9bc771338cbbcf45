"""The CNN comparison as pipeline stages: each function reads files, calls els / els.cnn, writes files.
workflow/scripts/cnn_*.py are thin wrappers around these, so the whole chain also runs (and is tested)
without Snakemake.

Settings come from the config's `cnn:` section (see configs/cnn_tiny.yaml): shared keys, and per model
under `models:` an architecture (`model:`) and optional `train:` overrides. The machines of the
comparison use exactly the CNN's training images (same classes, same per-class subset) and the schedule
calibrated against it; every sample of a seed starts from the same noise, noise_for(dataset, class,
seed, shape).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..api import sample as machine_sample
from ..data import load_prepared
from ..io import copy_file, write_safetensors, write_with
from ..scales import read_scales
from .calibrate import DEFAULT_PATCH_SIZES, calibrate, plot_calibration
from .evaluate import (
    display_name,
    paper_table,
    plot_r2_scatter,
    plot_sample_grid,
    plot_schedules,
    r2_table,
    summarize,
)
from .models import ModelConfig, load_model, parameter_count, read_metadata, receptive_field
from .sample import sample_cnn
from .train import TrainConfig, train_noise_predictor

NoiseFn = Callable[[str, "int | str", int, tuple[int, ...]], torch.Tensor]
ALL_CLASSES = "all"  # the {class} of an unconditional model


def expand_seeds(spec) -> list[int]:
    """A list of seeds, or {start, count}."""
    if isinstance(spec, dict):
        return list(range(int(spec["start"]), int(spec["start"]) + int(spec["count"])))
    return [int(s) for s in spec]


@dataclass(frozen=True)
class CnnSettings:
    """One CNN's resolved settings (shared `cnn:` keys merged with its `models:` entry)."""

    name: str
    dataset: str
    classes: tuple[int, ...]
    max_train_per_class: int | None
    conditional: bool
    model: ModelConfig
    train: TrainConfig
    device: str
    n_steps: int
    patch_sizes: tuple[int, ...]
    calibration_seeds: tuple[int, ...]
    evaluation_seeds: tuple[int, ...]
    grid_rows: int
    # more machines sampled from the same noise and compared with the CNN (`evaluation.machines`)
    extra_machines: tuple[str, ...] = ()
    # the machine's training images per class while calibrating (None: all of the CNN's)
    calibration_max_train_per_class: int | None = None

    @property
    def machine(self) -> str:
        return self.model.machine

    @property
    def compared_machines(self) -> list[str]:
        """The CNN's machine, the ideal score, then evaluation.machines (no repeats)."""
        return list(dict.fromkeys((self.machine, "ideal", *self.extra_machines)))

    @property
    def class_labels(self) -> list[int | str]:
        """The {class} values of this model's per-class files."""
        return list(self.classes) if self.conditional else [ALL_CLASSES]

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def model_names(section: dict) -> list[str]:
    return list(section["models"])


def resolve_settings(section: dict, name: str, num_classes: int) -> CnnSettings:
    """Settings of model `name` from the config's cnn section; num_classes: of the dataset."""
    entry = section["models"][name]
    conditional = bool(section.get("conditional", True))
    model = ModelConfig.from_dict(
        {**entry["model"], "num_classes": num_classes if conditional else 0}
    )
    train = TrainConfig.from_dict({**section.get("train", {}), **entry.get("train", {})})
    calibration = section.get("calibration", {})
    evaluation = section.get("evaluation", {})
    return CnnSettings(
        name=name,
        dataset=section["dataset"],
        classes=tuple(int(c) for c in section["classes"]),
        max_train_per_class=section.get("max_train_per_class"),
        conditional=conditional,
        model=model,
        train=train,
        device=str(section.get("device", "auto")),
        n_steps=int(section.get("steps", 20)),
        patch_sizes=tuple(int(k) for k in calibration.get("patch_sizes", DEFAULT_PATCH_SIZES)),
        calibration_seeds=tuple(
            expand_seeds(calibration.get("seeds", {"start": 1000, "count": 8}))
        ),
        evaluation_seeds=tuple(expand_seeds(evaluation.get("seeds", {"start": 0, "count": 16}))),
        grid_rows=int(evaluation.get("grid_rows", 8)),
        extra_machines=tuple(evaluation.get("machines", ())),
        calibration_max_train_per_class=calibration.get("max_train_per_class"),
    )


def job_settings(
    section: dict,
    name: str,
    dataset: str,
    *,
    data_path: str | Path | None = None,
    model_path: str | Path | None = None,
) -> CnnSettings:
    """Settings for one workflow job; the dataset's class count comes from the prepared data or,
    when the job has none, from the trained model."""
    if data_path is not None:
        from ..data import class_names

        num_classes = len(class_names(data_path))
    elif model_path is not None:
        num_classes = json.loads(read_metadata(model_path)["model_config"])["num_classes"]
    else:
        raise ValueError("job_settings needs the prepared data or the model file")
    settings = resolve_settings(section, name, num_classes)
    if settings.dataset != dataset:
        raise ValueError(f"cnn.dataset is {settings.dataset!r}, the job's dataset {dataset!r}")
    return settings


def default_noise_fn() -> NoiseFn:
    from ..noise import noise_for  # the pipeline's one source of per-seed noise

    return noise_for


# ----------------------------------------------------------------------------- data


def training_set(
    settings: CnnSettings, data_path: str | Path, cls: int | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CNN's training images and labels; with cls, only that class's ('all': every class)."""
    classes = settings.classes if cls in (None, ALL_CLASSES) else (int(cls),)
    parts = [
        load_prepared(data_path, cls=c, max_per_class=settings.max_train_per_class) for c in classes
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _noise_batch(settings: CnnSettings, noise_fn: NoiseFn, cls, seeds, shape) -> torch.Tensor:
    return torch.stack(
        [noise_fn(settings.dataset, cls, s, tuple(shape)).to(torch.float32) for s in seeds]
    )


def _labels(settings: CnnSettings, cls, n: int) -> torch.Tensor | None:
    return torch.full((n,), int(cls), dtype=torch.long) if settings.conditional else None


# ----------------------------------------------------------------------------- stages


def stage_train(
    settings: CnnSettings,
    data_path: str | Path,
    work_dir: str | Path,
    model_out: str | Path,
    loss_csv_out: str | Path,
    loss_png_out: str | Path,
    *,
    progress: bool | None = None,
) -> dict:
    """Train (resuming from work_dir's checkpoint if there is one), then copy the final files out.

    work_dir keeps the checkpoint and the running loss log outside the declared outputs, which a
    workflow manager deletes when a job fails: a rerun resumes instead of starting over."""
    images, labels = training_set(settings, data_path)
    device = settings.torch_device()
    if device.type == "cuda":
        # fastest conv algorithms; GPU runs are reproducible only up to their nondeterminism anyway
        torch.backends.cudnn.benchmark = True
    result = train_noise_predictor(
        settings.model,
        settings.train,
        images,
        labels,
        work_dir,
        device=device,
        progress=progress,
    )
    work = Path(work_dir)
    for src, dst in (
        ("model.safetensors", model_out),
        ("loss.csv", loss_csv_out),
        ("loss.png", loss_png_out),
    ):
        copy_file(work / src, dst)
    return {
        "parameters": result.parameters,
        "steps": result.steps,
        "seconds": result.seconds,
        "final_loss": result.final_loss,
        "images": int(images.shape[0]),
    }


def stage_calibrate(
    settings: CnnSettings,
    data_path: str | Path,
    model_path: str | Path,
    scales_out: str | Path,
    table_out: str | Path,
    figure_out: str | Path,
    *,
    noise_fn: NoiseFn | None = None,
    progress: bool | None = None,
) -> list[int]:
    """The CNN's trajectories from the calibration seeds (per class), the machine's cosine to its
    score per step and k, the median over all samples, the best k per step -> schedule file."""
    noise_fn = noise_fn or default_noise_fn()
    device = settings.torch_device()
    model = load_model(model_path, device=device)
    pairs = []
    for cls in settings.class_labels:
        images, _ = training_set(settings, data_path, cls)
        if settings.calibration_max_train_per_class is not None:
            images = images[: settings.calibration_max_train_per_class]
        seeds = settings.calibration_seeds
        noise = _noise_batch(settings, noise_fn, cls, seeds, images.shape[1:])
        _, trajectory = sample_cnn(
            model,
            noise.to(device),
            _labels(settings, cls, len(seeds)),
            settings.n_steps,
            return_trajectory=True,
            disable=True,
        )
        pairs.append((trajectory, images))
    result = calibrate(
        pairs, settings.machine, settings.patch_sizes, device=device, progress=progress
    )
    # no timings in the file: a rerun writes the same bytes (the benchmark file has the time)
    result.write(
        scales_out,
        table_out,
        comment=f"CNN {settings.name} ({settings.model.arch}, {settings.model.padding} padding), "
        f"machine {settings.machine}, dataset {settings.dataset}, classes "
        f"{list(settings.class_labels)}, seeds {list(settings.calibration_seeds)}, machine's "
        f"training images per class: {settings.calibration_max_train_per_class or 'all'}",
    )
    plot_calibration(result, figure_out, title=f"{settings.name}: {settings.machine} vs CNN score")
    return result.scales


def stage_sample_cnn(
    settings: CnnSettings,
    model_path: str | Path,
    cls: int | str,
    out_path: str | Path,
    *,
    noise_fn: NoiseFn | None = None,
) -> None:
    """CNN samples of one class for the evaluation seeds: noise, image, seeds in one file."""
    noise_fn = noise_fn or default_noise_fn()
    device = settings.torch_device()
    model = load_model(model_path, device=device)
    shape = _image_shape(model_path)
    seeds = settings.evaluation_seeds
    noise = _noise_batch(settings, noise_fn, cls, seeds, shape)
    images = sample_cnn(
        model, noise.to(device), _labels(settings, cls, len(seeds)), settings.n_steps, disable=True
    )
    write_safetensors(
        out_path,
        {"noise": noise, "image": images, "seeds": torch.tensor(seeds)},
        {
            "dataset": settings.dataset,
            "class": str(cls),
            "model": settings.name,
            "n_steps": str(settings.n_steps),
        },
    )


def _image_shape(model_path: str | Path) -> tuple[int, ...]:
    """[C, H, W] of the images the model was trained on (recorded by training)."""
    meta = read_metadata(model_path)
    if "image_shape" not in meta:
        raise ValueError(f"{model_path} does not record the image shape it was trained on")
    return tuple(json.loads(meta["image_shape"]))


def stage_sample_machines(
    settings: CnnSettings,
    data_path: str | Path,
    scales_path: str | Path,
    cls: int | str,
    out_path: str | Path,
    *,
    noise_fn: NoiseFn | None = None,
) -> None:
    """The machine (calibrated schedule), the ideal score and evaluation.machines from the same
    noise as the CNN samples, on the CNN's training images of that class (the zoo's denoisers with
    their default parameters; scfdm's smoothing noise keyed like the pipeline's, by seed)."""
    from ..noise import noise_key
    from ..zoo import ZOO_KINDS

    noise_fn = noise_fn or default_noise_fn()
    device = settings.torch_device()
    scales = read_scales(scales_path, expected_length=settings.n_steps)
    images, _ = training_set(settings, data_path, cls)
    seeds = settings.evaluation_seeds
    noise = _noise_batch(settings, noise_fn, cls, seeds, images.shape[1:])
    out = {"noise": noise, "seeds": torch.tensor(seeds)}
    keys = [noise_key(settings.dataset, cls, s) for s in seeds]
    for kind in settings.compared_machines:
        options = {"keys": keys} if kind in ZOO_KINDS else {}
        out[kind] = machine_sample(
            kind, images, scales, noise, device=device, disable=True, **options
        ).cpu()
    write_safetensors(
        out_path,
        out,
        {
            "dataset": settings.dataset,
            "class": str(cls),
            "model": settings.name,
            "scales": " ".join(map(str, scales)),
        },
    )


def class_samples(
    settings: CnnSettings,
    cnn_paths: Sequence[str | Path],
    machine_paths: Sequence[str | Path],
    *,
    pipeline_samples: bool = False,
) -> list[tuple[int | str, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Per class: (class, the CNN's file: noise, image, seeds; each compared machine's images in
    seed order). machine_paths: one file per class (sample_machines_cnn) or, with
    pipeline_samples, the pipeline's sample file of every compared machine, class and seed
    (machine outermost, as CnnRules.machine_samples lists them). Refuses samples whose noise is
    not the CNN's."""
    from ..io import read_sample

    labels, machines = settings.class_labels, settings.compared_machines
    out = []
    for ci, (cls, cnn_path) in enumerate(zip(labels, cnn_paths, strict=True)):
        cnn = load_file(str(cnn_path))
        seeds = cnn["seeds"].tolist()
        if pipeline_samples:
            if len(machine_paths) != len(machines) * len(labels) * len(seeds):
                raise ValueError(
                    f"{len(machine_paths)} machine samples for {len(machines)} machines x "
                    f"{len(labels)} classes x {len(seeds)} seeds"
                )
            images = {}
            for mi, kind in enumerate(machines):
                first = (mi * len(labels) + ci) * len(seeds)
                paths = machine_paths[first : first + len(seeds)]
                samples = [read_sample(path) for path in paths]
                for j, (path, sample) in enumerate(zip(paths, samples, strict=True)):
                    if not torch.equal(sample.noise, cnn["noise"][j]):
                        raise ValueError(f"{path} does not start from {cnn_path}'s noise")
                images[kind] = torch.stack([sample.image for sample in samples])
        else:
            machine_file = load_file(str(machine_paths[ci]))
            if not torch.equal(cnn["noise"], machine_file["noise"]) or not torch.equal(
                cnn["seeds"], machine_file["seeds"]
            ):
                raise ValueError(
                    f"{cnn_path} and {machine_paths[ci]} do not start from the same noise"
                )
            images = {kind: machine_file[kind] for kind in machines}
        out.append((cls, cnn, images))
    return out


def stage_evaluate(
    settings: CnnSettings,
    cnn_paths: Sequence[str | Path],
    machine_paths: Sequence[str | Path],
    r2_out: str | Path,
    summary_out: str | Path,
    scatter_out: str | Path,
    grid_out: str | Path,
    machines_out: str | Path | None = None,
    paper_out: str | Path | None = None,
    *,
    pipeline_samples: bool = False,
) -> dict:
    """Per seed r, r^2 (centred, flattened images) and R^2 of the CNN sample against every
    compared machine's (the CNN's machine, the ideal score, evaluation.machines); medians; the
    scatter (r^2) and the CNN | machine | IS grid; machines_out: one row per machine (median r and
    r^2); paper_out: the medians beside the paper's (evaluate.paper_table). machine_paths: see
    class_samples."""
    import pandas as pd

    machine = settings.machine
    tables, grid = [], {"CNN": [], machine: [], "ideal": []}
    for cls, cnn, images in class_samples(
        settings, cnn_paths, machine_paths, pipeline_samples=pipeline_samples
    ):
        seeds = cnn["seeds"].tolist()
        tables.append(r2_table(cnn["image"], images, seeds=seeds, classes=[cls] * len(seeds)))
        grid["CNN"].append(cnn["image"])
        grid[machine].append(images[machine])
        grid["ideal"].append(images["ideal"])
    df = pd.concat(tables, ignore_index=True)
    df.insert(0, "model", settings.name)
    write_with(r2_out, lambda tmp: df.to_csv(tmp, index=False))
    summary = summarize(df)
    summary.insert(0, "model", settings.name)
    write_with(summary_out, lambda tmp: summary.to_csv(tmp, index=False))
    if machines_out is not None:
        rows = machine_rows(df, settings.compared_machines, settings.name)
        write_with(machines_out, lambda tmp: rows.to_csv(tmp, index=False))
    if paper_out is not None:
        paper = paper_table(df, settings.compared_machines, settings.name)
        write_with(paper_out, lambda tmp: paper.to_csv(tmp, index=False))
    plot_r2_scatter(
        df,
        scatter_out,
        x="ideal",
        y=machine,
        title=f"{settings.name}: median r² {display_name(machine)} "
        f"{df[f'r2_{machine}'].median():.3f}, IS {df['r2_ideal'].median():.3f}",
    )
    rows = _grid_rows(df, settings.grid_rows)
    columns = {k: torch.cat(v)[rows] for k, v in grid.items()}
    notes = {
        name: [f"r²={df[f'r2_{key}'].iloc[i]:.2f}" for i in rows]
        for name, key in ((machine, machine), ("ideal", "ideal"))
    }
    plot_sample_grid(
        {"CNN": columns["CNN"], display_name(machine): columns[machine], "IS": columns["ideal"]},
        grid_out,
        row_labels=[f"c{df['class'].iloc[i]} s{df['seed'].iloc[i]}" for i in rows],
        column_notes={display_name(machine): notes[machine], "IS": notes["ideal"]},
    )
    return summary.iloc[0].to_dict()


def stage_schedule_figure(
    settings: CnnSettings,
    scales_path: str | Path,
    figure_out: str | Path,
    reference_path: str | Path | None = None,
) -> None:
    """The model's schedule (k per step) and, when given, a published one beside it."""
    schedules = {f"{settings.name} (calibrated)": read_scales(scales_path)}
    if reference_path:
        schedules[f"published: {Path(reference_path).stem}"] = read_scales(reference_path)
    plot_schedules(
        schedules,
        figure_out,
        title=f"{display_name(settings.machine)} patch size per step, {settings.dataset}",
    )


def machine_rows(df, machines: Sequence[str], model: str):
    """One row per machine: median r and r^2 against the CNN over every evaluated sample."""
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "model": model,
                "machine": m,
                "label": display_name(m),
                "n": int(df[f"r2_{m}"].notna().sum()),
                "median_r": float(df[f"r_{m}"].median()),
                "median_r2": float(df[f"r2_{m}"].median()),
            }
            for m in machines
        ]
    )


def _grid_rows(df, n: int) -> list[int]:
    """Up to n rows spread over the classes (first seeds of each class in turn)."""
    order = df.groupby("class", sort=False).cumcount().sort_values(kind="stable").index
    return list(order[: min(n, len(df))])


def model_summary(settings: CnnSettings, model_path: str | Path) -> dict:
    model = load_model(model_path)
    return {
        "model": settings.name,
        "arch": settings.model.arch,
        "padding": settings.model.padding,
        "parameters": parameter_count(model),
        "receptive_field": receptive_field(settings.model),
    }


def check_outputs(root: str | Path, section: dict) -> dict:
    """What CI asserts after the chain ran for one model directory results/cnn/{dataset}/{model}:
    the calibrated schedule is valid (length, odd sizes from the configured list), every r and r^2
    is finite and in [-1, 1], the figures exist. Raises ValueError; returns the summary row."""
    import numpy as np
    import pandas as pd

    root = Path(root)
    n_steps = int(section.get("steps", 20))
    allowed = set(section.get("calibration", {}).get("patch_sizes", DEFAULT_PATCH_SIZES))
    entry = section["models"].get(root.name) or {}
    scales_path = entry.get("schedule") or root / "scales.txt"
    scales = read_scales(scales_path, expected_length=n_steps)
    if not set(scales) <= allowed:
        raise ValueError(f"{scales_path} uses {sorted(set(scales) - allowed)}, not in {allowed}")
    df = pd.read_csv(root / "r2.csv")
    cols = [c for c in df.columns if c.startswith(("r_", "r2_"))]
    values = df[cols].to_numpy(dtype=float)
    if len(df) == 0 or len(cols) < 4:
        raise ValueError(f"{root}/r2.csv has no r / r^2 values")
    if not np.isfinite(values).all() or (np.abs(values) > 1).any():
        raise ValueError(f"{root}/r2.csv has values outside [-1, 1] or not finite")
    for col in [c for c in df.columns if c.startswith("r2_")]:
        det = df[f"R2_{col[3:]}"].to_numpy(dtype=float)
        # R^2 of the raw image is never above r^2, the R^2 of the best affine fit
        if not np.isfinite(det).all() or (det > df[col].to_numpy() + 1e-9).any():
            raise ValueError(f"{root}/r2.csv: R2_{col[3:]} not finite or above {col}")
    figures = ["r2_scatter.png", "samples_grid.png", "schedule.png"]
    if not entry.get("weights"):
        figures += ["loss.png", "calibration.png"]
    for name in figures:
        if not (root / name).is_file() or (root / name).stat().st_size == 0:
            raise ValueError(f"{root}/{name} is missing or empty")
    summary = pd.read_csv(root / "r2_summary.csv")
    return {"scales": scales, **summary.iloc[0].to_dict()}
