"""Input functions and targets of workflow/rules/cnn.smk, kept in Python so the rule file holds only
rules (snakemake --lint) and the logic is testable without Snakemake."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

CNN_ROOT = "results/cnn/{dataset}/{model}"
# the config keys each stage reads: a rule reruns only when its own keys change (a new evaluation
# seed must not retrain the CNN)
DATA_KEYS = ["dataset", "classes", "max_train_per_class", "conditional", "device"]
STAGE_KEYS = {
    "train": [*DATA_KEYS, "train"],
    "calibrate": [*DATA_KEYS, "steps", "calibration"],
    "sample": [*DATA_KEYS, "steps", "evaluation"],
    "evaluate": [*DATA_KEYS, "evaluation"],
}
# what the comparison writes for every model; a trained model adds its training and calibration
EVALUATION_FILES = [
    "r2.csv",
    "r2_summary.csv",
    "r2_machines.csv",
    "r2_paper.csv",
    "r2_scatter.png",
    "samples_grid.png",
    "schedule.png",
]
TRAINING_FILES = ["loss.png", "scales.txt", "calibration.png"]


class CnnRules:
    """The config's `cnn:` section (None or {} when the comparison is off), as the rules need it.

    A model is trained and calibrated by the pipeline unless its entry names shipped `weights` and a
    `schedule` (files in the repository): then nothing is trained, and its machines' samples are
    the main pipeline's own samples of the same (class, seed), which the config must ask for with
    the same schedule and training images (checked here, at start-up). config: the whole config;
    workflow_dir: where relative shipped paths missing from the working directory are looked for;
    pipeline_sample: the path pattern of the pipeline's samples (common.smk's SAMPLE)."""

    def __init__(
        self,
        section: dict | None,
        config: Mapping | None = None,
        workflow_dir: str | Path | None = None,
        pipeline_sample: str | None = None,
    ):
        self.pipeline_sample = pipeline_sample
        self.section = validate_section(section) if section else {}
        if self.section:
            resolve_shipped_paths(self.section, workflow_dir)
            for name in self.section["models"]:
                if self.shipped(name):
                    check_shipped(self.section, name, config or {})

    def shipped(self, model: str) -> bool:
        return "weights" in self.section["models"][model]

    def model_file(self, wildcards) -> str:
        """Input function: the shipped weights, or the ones train_cnn writes."""
        entry = self.section["models"][wildcards.model]
        if "weights" in entry:
            return entry["weights"]
        return f"{CNN_ROOT}/model.safetensors".format(**wildcards)

    def scales_file(self, wildcards) -> str:
        """Input function: the shipped schedule, or the one calibrate_schedule writes."""
        entry = self.section["models"][wildcards.model]
        if "schedule" in entry:
            return entry["schedule"]
        return f"{CNN_ROOT}/scales.txt".format(**wildcards)

    def reference_schedule(self) -> list[str]:
        """The published schedule drawn beside the model's (cnn.calibration.reference), if any."""
        reference = self.section.get("calibration", {}).get("reference")
        return [reference] if reference else []

    def machine_samples(self, wildcards) -> list[str]:
        """Input function of evaluate_r2: the comparison's machine samples. Trained model: one file
        per class (sample_machines_cnn); shipped model: the pipeline's sample of every compared
        machine, class and seed, in that order (machine outermost)."""
        if not self.shipped(wildcards.model):
            return self.per_class(f"{CNN_ROOT}/samples/machines/{{cls}}.safetensors")(wildcards)
        if self.pipeline_sample is None:
            raise ValueError("CnnRules needs pipeline_sample to compare a shipped model")
        settings = self.settings(wildcards.model)
        return [
            self.pipeline_sample.format(dataset=wildcards.dataset, machine=m, cls=c, seed=s)
            for m in settings.compared_machines
            for c in self.class_labels()
            for s in settings.evaluation_seeds
        ]

    def settings(self, model: str):
        return model_settings(self.section, model)

    @property
    def gpu(self) -> int:
        """GPUs per job: 0 on CPU-only machines (CI, the local SLURM), 1 for the full run."""
        return int(self.section.get("gpu", 0))

    @staticmethod
    def prepared_data(wildcards) -> str:
        """The pipeline's prepared training set of the dataset (written by the data rule)."""
        return f"results/data/{wildcards.dataset}/train.safetensors"

    def resource(self, stage: str, key: str) -> int:
        """threads / mem_mb / runtime of a stage: cnn.resources.<stage>.<key> (schema defaults)."""
        return int(self.section["resources"][stage][key])

    def class_labels(self) -> list[str]:
        return class_labels(self.section)

    def per_class(self, pattern: str):
        """Input function: pattern (with {dataset}, {model}, {cls}) for every class."""

        def files(wildcards) -> list[str]:
            return [
                pattern.format(dataset=wildcards.dataset, model=wildcards.model, cls=c)
                for c in self.class_labels()
            ]

        return files

    def params(self, stage: str):
        """Params function: the section as `stage` sees it, with only the job's model."""

        def params(wildcards) -> dict:
            section = {k: self.section[k] for k in STAGE_KEYS[stage] if k in self.section}
            if "calibration" in section:  # the figure's reference does not change a calibration
                section["calibration"] = {
                    k: v for k, v in section["calibration"].items() if k != "reference"
                }
            section["models"] = {wildcards.model: self.section["models"][wildcards.model]}
            return section

        return params

    def targets(self) -> list[str]:
        """Every final file of the comparison, for every model in cnn.models."""
        out = []
        for model in self.section.get("models", {}):
            root = CNN_ROOT.format(dataset=self.section["dataset"], model=model)
            names = EVALUATION_FILES if self.shipped(model) else TRAINING_FILES + EVALUATION_FILES
            out += [f"{root}/{name}" for name in names]
        return out


def class_labels(section: Mapping) -> list[str]:
    """The {class} values of the per-class files: class ids, or 'all' for an unconditional CNN."""
    if section.get("conditional", True):
        return [str(c) for c in section.get("classes", [])]
    return ["all"]


def model_settings(section: Mapping, name: str):
    """A model's resolved settings (its class count from the section's largest class id)."""
    from .stages import resolve_settings

    return resolve_settings(section, name, num_classes=max(section.get("classes") or [0]) + 1)


def resolve_shipped_paths(section: dict, workflow_dir: str | Path | None) -> None:
    """A relative shipped path (weights, schedule, calibration.reference) that is missing from the
    working directory is taken from the workflow's folder (where models/ and scales/ ship), so a
    config works unchanged when the workflow is a module."""
    if workflow_dir is None:
        return
    entries = [(m, key) for m in section["models"].values() for key in ("weights", "schedule")]
    entries.append((section.get("calibration", {}), "reference"))
    for entry, key in entries:
        path = entry.get(key)
        if path and not Path(path).is_absolute() and not Path(path).exists():
            candidate = Path(workflow_dir) / path
            if candidate.exists():
                entry[key] = str(candidate)


def check_shipped(section: dict, name: str, config: Mapping) -> None:
    """A shipped model is compared with the main pipeline's samples: the config must sample its
    machine and the other compared machines for every evaluated (class, seed), on the same
    training images, its machine with the model's schedule. Raises ValueError naming the key."""
    from ..config import planned_samples
    from ..scales import read_scales
    from .models import read_metadata

    where = f"cnn.models.{name}"
    entry = section["models"][name]
    if "schedule" not in entry:
        raise ValueError(f"{where}: shipped weights need the schedule calibrated against them")
    for key in ("weights", "schedule"):
        if not Path(entry[key]).is_file():
            raise ValueError(f"{where}.{key}: no file {entry[key]}")
    read_metadata(entry["weights"])  # a readable safetensors header, or a clear error
    dataset = section["dataset"]
    ds = (config.get("datasets") or {}).get(dataset)
    if ds is None:
        raise ValueError(
            f"{where}: a shipped model is compared with the pipeline's samples, but datasets: has "
            f"no {dataset!r}"
        )
    if ds.get("max_train_per_class") != section.get("max_train_per_class"):
        raise ValueError(
            f"{where}: datasets.{dataset}.max_train_per_class is "
            f"{ds.get('max_train_per_class')}, cnn.max_train_per_class "
            f"{section.get('max_train_per_class')}: the machines must use the CNN's training images"
        )
    settings = model_settings(section, name)
    machine_schedule = (ds.get("schedules") or {}).get(settings.machine)
    if machine_schedule is None or read_scales(machine_schedule) != read_scales(entry["schedule"]):
        raise ValueError(
            f"{where}.schedule ({entry['schedule']}) must be datasets.{dataset}.schedules."
            f"{settings.machine} (now {machine_schedule}): the pipeline's {settings.machine} "
            "samples are the comparison's"
        )
    planned = {(k.machine, k.cls, k.seed) for k in planned_samples(config) if k.dataset == dataset}
    missing = [
        f"{m} class {c} seed {s}"
        for m in settings.compared_machines
        for c in class_labels(section)
        for s in settings.evaluation_seeds
        if (m, c, s) not in planned
    ]
    if missing:
        raise ValueError(
            f"{where}: the comparison needs pipeline samples the config does not ask for (add "
            f"the machines, classes or seeds to datasets.{dataset}): {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )


def validate_section(section: dict) -> dict:
    """Fail at workflow start, not hours in: the config schema checks the section's keys, types and
    resources (and fills in their defaults), then every model's settings must resolve (the
    dataclasses reject unknown or invalid architecture and training keys). Returns the section
    with its defaults."""
    from ..settings import validate

    section = validate({"cnn": dict(section)}, ["the cnn: section"])["cnn"]
    from ..config import MACHINES

    for name in section["models"]:
        settings = model_settings(section, name)
        unknown_machines = sorted(set(settings.extra_machines) - set(MACHINES))
        if unknown_machines:
            raise ValueError(
                f"cnn.evaluation.machines: unknown {unknown_machines}; expected some of "
                f"{', '.join(MACHINES)}"
            )
        overlap = set(settings.calibration_seeds) & set(settings.evaluation_seeds)
        if overlap:
            raise ValueError(
                f"cnn.models.{name}: calibration and evaluation seeds overlap: {sorted(overlap)}"
            )
    return section
