"""Input functions and targets of workflow/rules/cnn.smk, kept in Python so the rule file holds only
rules (snakemake --lint) and the logic is testable without Snakemake."""

from __future__ import annotations

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
TARGET_FILES = [
    "loss.png",
    "scales.txt",
    "calibration.png",
    "r2.csv",
    "r2_summary.csv",
    "r2_machines.csv",
    "r2_scatter.png",
    "samples_grid.png",
]


class CnnRules:
    """The config's `cnn:` section (None or {} when the comparison is off), as the rules need it."""

    def __init__(self, section: dict | None):
        self.section = validate_section(section) if section else {}

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
        """The {class} values of the per-class files: class ids, or 'all' for an unconditional CNN."""
        if self.section.get("conditional", True):
            return [str(c) for c in self.section.get("classes", [])]
        return ["all"]

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
            section["models"] = {wildcards.model: self.section["models"][wildcards.model]}
            return section

        return params

    def targets(self) -> list[str]:
        """Every final file of the comparison, for every model in cnn.models."""
        out = []
        for model in self.section.get("models", {}):
            root = CNN_ROOT.format(dataset=self.section["dataset"], model=model)
            out += [f"{root}/{name}" for name in TARGET_FILES]
        return out


def validate_section(section: dict) -> dict:
    """Fail at workflow start, not hours in: the config schema checks the section's keys, types and
    resources (and fills in their defaults), then every model's settings must resolve (the
    dataclasses reject unknown or invalid architecture and training keys). Returns the section
    with its defaults."""
    from ..settings import validate
    from .stages import resolve_settings

    section = validate({"cnn": dict(section)}, ["the cnn: section"])["cnn"]
    for name in section["models"]:
        settings = resolve_settings(
            section, name, num_classes=max(section.get("classes") or [0]) + 1
        )
        from ..config import MACHINES

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
