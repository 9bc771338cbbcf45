# Config validation, paths, input functions and wildcard constraints. The logic lives in els.config.
from pathlib import Path

from snakemake.utils import min_version, validate

import els.config as plan

min_version("8.20")

validate(config, "../schemas/config.schema.yaml")
plan.check_config(config)

DATA = config.setdefault("data", {})
SAMPLING = config.setdefault("sampling", {})
BATCH_SEEDS = int(SAMPLING.get("batch_seeds", 2))
TRAJECTORY = bool(SAMPLING.get("trajectory", True))
PROVENANCE = bool(SAMPLING.get("provenance", True))

STAGE_DEFAULTS = {
    "data": {"threads": 1, "mem_mb": 4000, "runtime": 30},
    "index": {"threads": 1, "mem_mb": 4000, "runtime": 60},
    "stats": {"threads": 1, "mem_mb": 4000, "runtime": 30},
    "sample": {"threads": 2, "mem_mb": 8000, "runtime": 720},
    "neighbours": {"threads": 1, "mem_mb": 2000, "runtime": 10},
    "figures": {"threads": 1, "mem_mb": 2000, "runtime": 10},
}


def stage(name, key):
    """threads / mem_mb / runtime (minutes) of a stage: config `resources.<stage>`, else defaults."""
    return (
        (config.get("resources") or {})
        .get(name, {})
        .get(key, STAGE_DEFAULTS[name][key])
    )


wildcard_constraints:
    dataset=r"[A-Za-z][A-Za-z0-9_]*",
    machine="|".join(plan.MACHINES),
    cls=r"\d+|all",
    seed=r"\d+",
    k=r"\d+",
    batch=r"seeds\d+-\d+",


TRAIN = "results/data/{dataset}/train.safetensors"
META = "results/data/{dataset}/meta.json"
INDEX = "results/index/{dataset}/{machine}/{cls}/k{k}.safetensors"
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


def index_files(wildcards):
    """Every index the schedule of (dataset, machine) needs, for this class."""
    ks = plan.index_patch_sizes(config, wildcards.dataset, wildcards.machine)
    return {
        f"k{k}": INDEX.format(
            dataset=wildcards.dataset, machine=wildcards.machine, cls=wildcards.cls, k=k
        )
        for k in ks
    }


def zoo_stats_files(wildcards):
    """The class's statistics for a zoo denoiser (els.zoo), none for a patch machine."""
    if not plan.uses_stats(wildcards.machine):
        return {}
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
