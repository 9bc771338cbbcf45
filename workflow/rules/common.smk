# Config validation, paths, input functions and wildcard constraints. The logic lives in els.config.
import json
from pathlib import Path

import els.config as plan
from els import settings

# the workflow's own folder (Snakefile, scales/): workflow.basedir is the user's Snakefile's folder
# when this workflow is used as a module, so it is found from this file
WORKFLOW_DIR = Path(workflow.current_basedir.get_path_or_uri(secret_free=True)).parents[
    1
]
# the schema fills in every default, so the code below reads config values without fallbacks
plan.start_checks(config, workflow.configfiles, WORKFLOW_DIR)

DATA = config["data"]
SAMPLING = config["sampling"]
BATCH_SEEDS = SAMPLING["batch_seeds"]
TRAJECTORY = SAMPLING["trajectory"]
PROVENANCE = SAMPLING["provenance"]


def stage(name, key):
    """threads / mem_mb / runtime (minutes) of a stage: config `resources.<stage>` (schema defaults)."""
    return config["resources"][name][key]


wildcard_constraints:
    dataset=r"[A-Za-z][A-Za-z0-9_]*",
    machine="|".join(settings.machine_kinds()),
    cls=r"\d+|all",
    seed=r"\d+",
    k=r"\d+",
    batch=r"seeds\d+-\d+",
    key=r"[0-9a-f]{16}",


PREPARED_MANIFEST = "results/data/{dataset}/inputs/{key}/inputs.json"
PREPARED = "results/data/{dataset}/inputs/{key}/train.safetensors"
PREPARED_META = "results/data/{dataset}/inputs/{key}/meta.json"
TRAIN = "results/data/{dataset}/train.safetensors"
META = "results/data/{dataset}/meta.json"
INDEX = "results/index/{dataset}/{machine}/{cls}.safetensors"
STATS = "results/stats/{dataset}/{cls}.safetensors"
BATCH = "results/samples/{dataset}/{machine}/{cls}/batches/{batch}.safetensors"
SAMPLE = "results/samples/{dataset}/{machine}/{cls}/seed{seed}.safetensors"
SAMPLE_PNG = "results/samples/{dataset}/{machine}/{cls}/seed{seed}.png"
NEIGHBOURS = "results/neighbours/{dataset}/{machine}/{cls}/seed{seed}.json"
NEIGHBOUR_IMAGES = "results/neighbours/{dataset}/{machine}/{cls}/seed{seed}.safetensors"
PAIR = "results/figures/{dataset}/pairs/{machine}/{cls}/seed{seed}.png"
TRAJECTORY_FIG = "results/figures/{dataset}/trajectories/{machine}/{cls}/seed{seed}.png"
PROVENANCE_FILE = "results/provenance/{dataset}/{machine}/{cls}/seed{seed}.safetensors"
PROVENANCE_JSON = "results/provenance/{dataset}/{machine}/{cls}/seed{seed}.json"
PROVENANCE_FIG = "results/figures/{dataset}/provenance/{machine}/{cls}/seed{seed}.png"
GRID = "results/figures/{dataset}/grid_{machine}.png"
COMPARISON = "results/figures/{dataset}/comparison/{cls}/seed{seed}.png"
SUMMARY = "results/summary.csv"

SAMPLES = plan.planned_samples(config)
# the content-hash key of each dataset's inputs (els/inputs.py); checks the data named in the config
DATA_KEYS = plan.data_keys(config)


def prepared_of(pattern):
    """Input function: a file (PREPARED or PREPARED_META) of the dataset's current input key."""

    def path(wildcards):
        if wildcards.dataset not in DATA_KEYS:
            raise plan.ConfigError(
                f"dataset {wildcards.dataset!r} is not in the config (datasets: or cnn.dataset)"
            )
        return pattern.format(
            dataset=wildcards.dataset, key=DATA_KEYS[wildcards.dataset]
        )

    return path


# the samples with a dominant training image per pixel (every machine but wiener)
PROVENANCE_SAMPLES = [s for s in SAMPLES if plan.has_provenance(s.machine)]


def key_paths(pattern, keys):
    return [
        pattern.format(dataset=s.dataset, machine=s.machine, cls=s.cls, seed=s.seed)
        for s in keys
    ]


BATCH_BENCHMARK = "logs/benchmarks/sample_batch/{dataset}/{machine}/{cls}/{batch}.tsv"


def batch_benchmarks(keys):
    """The sample_batch benchmark (wall time) of every sample's batch, in the order of keys."""
    return [
        BATCH_BENCHMARK.format(
            dataset=s.dataset,
            machine=s.machine,
            cls=s.cls,
            batch=plan.batch_name(int(s.seed), BATCH_SEEDS),
        )
        for s in keys
    ]


def dataset_config(wildcards):
    """The dataset's config entry; {} for a dataset only other stages use (e.g. the CNN's data)."""
    return (config.get("datasets") or {}).get(wildcards.dataset, {})


def schedule_of(wildcards):
    return plan.schedule_file(config, wildcards.dataset, wildcards.machine)


def index_patch_sizes(wildcards):
    """The k of every patch size the schedule of (dataset, machine) uses ([0] for ideal)."""
    return plan.index_patch_sizes(config, wildcards.dataset, wildcards.machine)


def machine_inputs(wildcards):
    """What a sampling job reads: the class's PatchIndex for a patch machine, its statistics (and
    the training images they are checked against) for a zoo denoiser (els.zoo)."""
    if not plan.uses_stats(wildcards.machine):
        return {"index": INDEX.format(**wildcards)}
    return {
        "stats": STATS.format(dataset=wildcards.dataset, cls=wildcards.cls),
        # the job checks the statistics against the training images (refuses stale ones)
        "train": TRAIN.format(dataset=wildcards.dataset),
    }


def batch_of_seed(wildcards):
    return BATCH.format(
        dataset=wildcards.dataset,
        machine=wildcards.machine,
        cls=wildcards.cls,
        batch=plan.batch_name(int(wildcards.seed), BATCH_SEEDS),
    )


def grid_inputs(wildcards):
    ds = dataset_config(wildcards)
    keys = [
        plan.SampleKey(wildcards.dataset, wildcards.machine, c, int(s))
        for c in plan.class_labels(ds)
        for s in ds["seeds"]
    ]
    return key_paths(SAMPLE, keys)


def comparison_inputs(wildcards):
    machines = plan.comparison(dataset_config(wildcards))[2]
    keys = [
        plan.SampleKey(wildcards.dataset, m, wildcards.cls, int(wildcards.seed))
        for m in machines
    ]
    return {
        "samples": key_paths(SAMPLE, keys),
        "neighbours": key_paths(NEIGHBOURS, keys),
        "neighbour_images": key_paths(NEIGHBOUR_IMAGES, keys),
        "meta": META.format(dataset=wildcards.dataset),
    }


def figure_targets():
    targets = key_paths(PAIR, SAMPLES)
    if TRAJECTORY:
        targets += key_paths(TRAJECTORY_FIG, SAMPLES)
    if PROVENANCE:
        targets += key_paths(PROVENANCE_FIG, PROVENANCE_SAMPLES)
    for name, ds in (config.get("datasets") or {}).items():
        targets += [GRID.format(dataset=name, machine=m) for m in ds["machines"]]
        classes, seeds, _ = plan.comparison(ds)
        targets += [
            COMPARISON.format(dataset=name, cls=c, seed=s)
            for c in classes
            for s in seeds
        ]
    return targets


def all_targets():
    return [SUMMARY, *figure_targets()] if SAMPLES else []


def seed_outputs(provenance):
    """The output files of finish_seed: the figures are report items (workflow/report/*.rst)."""
    outputs = {
        "sample": SAMPLE,
        "png": SAMPLE_PNG,
        "neighbours": NEIGHBOURS,
        "neighbour_images": NEIGHBOUR_IMAGES,
        "pair": report(
            PAIR,
            caption="../report/pair.rst",
            category="{dataset} samples and nearest training images",
            subcategory="{machine}",
            labels={"class": "{cls}", "seed": "{seed}"},
        ),
    }
    if TRAJECTORY:
        outputs["trajectory"] = report(
            TRAJECTORY_FIG,
            caption="../report/trajectory.rst",
            category="{dataset} trajectories",
            subcategory="{machine}",
            labels={"class": "{cls}", "seed": "{seed}"},
        )
    if provenance:
        outputs["provenance"] = PROVENANCE_FILE
        outputs["provenance_summary"] = PROVENANCE_JSON
        outputs["provenance_figure"] = report(
            PROVENANCE_FIG,
            caption="../report/provenance.rst",
            category="{dataset} patch-mosaic provenance",
            subcategory="{machine}",
            labels={"class": "{cls}", "seed": "{seed}"},
        )
    return outputs
