"""What the pipeline's config asks for, as plain Python (the Snakefile's input functions call these).

The config's shape is validated by workflow/schemas/config.schema.yaml; `check_config` adds the checks a
schema cannot express (dataset names, schedules that exist and fit the machine, class ids). Sampling
batches: seeds are grouped in aligned blocks of `sampling.batch_seeds` consecutive values (batch_seeds 2:
seeds 0-1, 2-3, ...). A batch job samples EVERY seed of its block in one `els.sample` call, also seeds the
config does not list yet, so a batch file is a pure function of its name: adding a seed later either
reuses its block's existing batch file (only the cheap per-seed jobs run) or adds one new batch; no
sample is ever recomputed because a seed was added. Seeds are independent of batching (noise from
els.noise, results equal to 1e-6).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .index import MACHINES as PATCH_MACHINES
from .zoo.machines import ZOO_KINDS as ZOO_MACHINES

# every machine the pipeline runs: the patch machines, then the training-free denoisers of els.zoo
# (per-class statistics instead of patch indexes)
MACHINES = PATCH_MACHINES + ZOO_MACHINES
# machines whose samples have a dominant training image per pixel (wiener has no softmax)
PROVENANCE_MACHINES = tuple(m for m in MACHINES if m != "wiener")
TORCHVISION_DATASETS = {"MNIST": 1, "FashionMNIST": 1, "CIFAR10": 3}  # name: channels
TORCHVISION_CLASSES = 10
BATCH_PATTERN = re.compile(r"seeds(\d+)-(\d+)")
IMAGE_SIZE = 32


class ConfigError(ValueError):
    """A config that passes the schema but cannot be run; the message names the key."""


@dataclass(frozen=True, order=True)
class SampleKey:
    """One sample: (dataset, machine, class label ('3' or 'all'), seed)."""

    dataset: str
    machine: str
    cls: str
    seed: int


# ----------------------------------------------------------------------------- batches


def batch_bounds(seed: int, batch_seeds: int) -> tuple[int, int]:
    """First and last seed of the aligned block of `batch_seeds` seeds that holds `seed`."""
    if batch_seeds < 1:
        raise ConfigError(f"sampling.batch_seeds must be at least 1, got {batch_seeds}")
    first = (int(seed) // batch_seeds) * batch_seeds
    return first, first + batch_seeds - 1


def batch_name(seed: int, batch_seeds: int) -> str:
    """'seeds{first}-{last}', the {batch} wildcard of the batch holding `seed`."""
    first, last = batch_bounds(seed, batch_seeds)
    return f"seeds{first}-{last}"


def seeds_of_batch(name: str) -> list[int]:
    """The seeds a batch samples: 'seeds2-3' -> [2, 3]."""
    match = BATCH_PATTERN.fullmatch(name)
    if not match or int(match[1]) > int(match[2]):
        raise ConfigError(f"{name!r} is not a batch name like 'seeds0-1'")
    return list(range(int(match[1]), int(match[2]) + 1))


# ----------------------------------------------------------------------------- what to sample


def class_labels(ds: Mapping) -> list[str]:
    """The {class} wildcards of a dataset: class ids as strings, or ['all'] when unconditional."""
    if not ds.get("conditional", True):
        return ["all"]
    return [str(c) for c in ds.get("classes") or []]


def comparison(ds: Mapping) -> tuple[list[str], list[int], list[str]]:
    """(class labels, seeds, machines) of the machine comparison; empty lists when there is none."""
    comp = ds.get("comparison")
    if not comp:
        return [], [], []
    labels = ["all"] if not ds.get("conditional", True) else [str(c) for c in comp["classes"]]
    return labels, list(comp["seeds"]), list(comp["machines"])


def planned_samples(config: Mapping) -> list[SampleKey]:
    """Every sample the config asks for: the main grid and the comparison, without duplicates."""
    keys = set()
    for name, ds in (config.get("datasets") or {}).items():
        for machine in ds["machines"]:
            for cls in class_labels(ds):
                keys.update(SampleKey(name, machine, cls, int(s)) for s in ds["seeds"])
        labels, seeds, machines = comparison(ds)
        for machine in machines:
            for cls in labels:
                keys.update(SampleKey(name, machine, cls, int(s)) for s in seeds)
    return sorted(keys)


def machines_of(ds: Mapping) -> list[str]:
    """Machines a dataset uses (main grid and comparison), in els.settings.machine_kinds() order."""
    from .settings import machine_kinds

    used = set(ds["machines"]) | set(comparison(ds)[2])
    return [m for m in machine_kinds() if m in used]


def schedule_file(config: Mapping, dataset: str, machine: str) -> str:
    """The schedule file of (dataset, machine) from `datasets.<name>.schedules`."""
    schedules = config["datasets"][dataset].get("schedules") or {}
    if machine not in schedules:
        raise ConfigError(
            f"datasets.{dataset}.schedules has no entry for machine {machine!r} (it is used by "
            f"datasets.{dataset}.machines or .comparison.machines)"
        )
    return schedules[machine]


def index_patch_sizes(
    config: Mapping, dataset: str, machine: str, root: str | Path = "."
) -> list[int]:
    """The k of every index (dataset, machine) needs: the schedule's distinct k, [0] for ideal,
    none for the zoo's denoisers (they use per-class statistics, `uses_stats`)."""
    from .api import schedule_patch_sizes

    if uses_stats(machine):
        return []
    from .scales import read_scales

    return schedule_patch_sizes(
        machine, read_scales(Path(root) / schedule_file(config, dataset, machine))
    )


def uses_stats(machine: str) -> bool:
    """Whether the machine samples from per-class statistics (els.zoo) instead of patch indexes."""
    return machine in ZOO_MACHINES


def has_provenance(machine: str) -> bool:
    return machine in PROVENANCE_MACHINES


def zoo_params(config: Mapping, machine: str) -> dict:
    """The parameters of a zoo denoiser from the config's `zoo.<machine>` ({} for a patch machine:
    the schema's defaults, which equal els.zoo's, fill the rest)."""
    if not uses_stats(machine):
        return {}
    return dict((config.get("zoo") or {}).get(machine) or {})


# ----------------------------------------------------------------------------- checks


def start_checks(config: dict, configfiles=(), workflow_dir: str | Path | None = None) -> None:
    """Everything the workflow checks before its first job, in place on `config`: the schema (and its
    defaults), schedule paths resolved (working directory, then the workflow's folder), then
    `check_config`. Raises ConfigError with every message on its own line."""
    from .settings import ConfigFileError, check_files, validate

    try:
        check_files(configfiles)
        validate(config, [str(f) for f in configfiles])
    except ConfigFileError as err:
        raise ConfigError(str(err)) from None
    if workflow_dir is not None:
        resolve_schedules(config, Path(workflow_dir))
    check_config(config)


def resolve_schedules(config: Mapping, workflow_dir: Path) -> None:
    """A relative schedule path missing from the working directory is taken from the workflow's
    folder (where scales/ ships), so a config works unchanged when the workflow is a module."""
    for ds in (config.get("datasets") or {}).values():
        schedules = ds.get("schedules") or {}
        for machine, path in schedules.items():
            if not Path(path).is_absolute() and not Path(path).exists():
                shipped = workflow_dir / path
                if shipped.exists():
                    schedules[machine] = str(shipped)


def check_config(config: Mapping, root: str | Path = ".") -> None:
    """Checks beyond the schema; raises ConfigError naming the key that is wrong."""
    from .index import check_patch_size
    from .scales import ScheduleError, read_scales
    from .zoo import check_params

    for machine in ZOO_MACHINES:
        try:
            check_params(machine, zoo_params(config, machine))
        except ValueError as err:
            raise ConfigError(f"zoo.{machine}: {err}") from None

    for name, ds in (config.get("datasets") or {}).items():
        where = f"datasets.{name}"
        source = ds.get("source", "torchvision")
        if source == "torchvision":
            if name not in TORCHVISION_DATASETS:
                raise ConfigError(
                    f"{where}: source 'torchvision' needs the dataset key to be one of "
                    f"{', '.join(TORCHVISION_DATASETS)} (CelebA or your own images: source "
                    "'imagefolder' with a path)"
                )
            channels = ds.get("channels")
            if channels is not None and channels != TORCHVISION_DATASETS[name]:
                raise ConfigError(
                    f"{where}.channels is {channels}, but {name} has {TORCHVISION_DATASETS[name]}"
                )
            if ds.get("path"):
                raise ConfigError(f"{where}.path is only used with source 'imagefolder'")
        elif not ds.get("path"):
            raise ConfigError(f"{where}: source 'imagefolder' needs path (the folder of images)")
        conditional = ds.get("conditional", True)
        comp = ds.get("comparison") or {}
        if conditional:
            if not ds.get("classes"):
                raise ConfigError(f"{where}.classes: a class-conditional dataset needs classes")
            if comp and not comp.get("classes"):
                raise ConfigError(f"{where}.comparison.classes: needed when conditional is true")
            if source == "torchvision":
                bad = [
                    c
                    for c in [*ds["classes"], *comp.get("classes", [])]
                    if c >= TORCHVISION_CLASSES
                ]
                if bad:
                    raise ConfigError(
                        f"{where}: class ids {bad} do not exist; {name} has classes 0..9"
                    )
        else:
            if ds.get("classes") or comp.get("classes"):
                raise ConfigError(
                    f"{where}: classes are only used when conditional is true (unconditional runs "
                    "sample class 'all')"
                )
        for machine in machines_of(ds):
            path = Path(root) / schedule_file(config, name, machine)
            try:
                scales = read_scales(path)
            except ScheduleError as err:
                raise ConfigError(f"{where}.schedules.{machine}: {err}") from None
            if machine != "ideal" and not uses_stats(machine):
                for k in sorted(set(scales[1:])):
                    try:
                        check_patch_size(machine, k, IMAGE_SIZE, IMAGE_SIZE)
                    except ValueError as err:
                        raise ConfigError(f"{where}.schedules.{machine} ({path}): {err}") from None


def data_keys(config: Mapping, root: str | Path = ".") -> dict[str, str]:
    """The input key of every dataset the config prepares (els.inputs), after checking the data at
    start-up: an image folder must exist and hold every class id the config names (including
    the comparison's). Raises ConfigError naming the key."""
    from .inputs import DataInputError, class_count, manifest, record

    names = dict.fromkeys(config.get("datasets") or {})
    cnn = config.get("cnn") or {}
    if cnn.get("dataset"):
        names[cnn["dataset"]] = None
    keys = {}
    for name in names:
        ds = (config.get("datasets") or {}).get(name) or {}
        try:
            content = manifest(name, ds, Path(root))
        except DataInputError as err:
            raise ConfigError(str(err)) from None
        count = class_count(content)
        if count is not None and ds.get("conditional", True):
            comp = ds.get("comparison") or {}
            for where, ids in (
                ("classes", ds.get("classes")),
                ("comparison.classes", comp.get("classes")),
            ):
                bad = [c for c in ids or [] if c >= count]
                if bad:
                    raise ConfigError(
                        f"datasets.{name}.{where}: class ids {bad} do not exist; {ds['path']} has "
                        f"{count} class(es), ids 0..{count - 1} ({', '.join(content['class_names'])})"
                    )
        keys[name] = record(name, content, Path(root))
    return keys


# ----------------------------------------------------------------------------- runtime helpers


def resolve_device(name: str):
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "sampling.device is 'cuda' but torch sees no CUDA device (use auto or cpu)"
        )
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"sampling.device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def resolve_dtype(name: str):
    import torch

    dtypes = {"float32": torch.float32, "float64": torch.float64}
    if name not in dtypes:
        raise ConfigError(f"sampling.dtype must be float32 or float64, got {name!r}")
    return dtypes[name]


@contextlib.contextmanager
def log_to(path: str | Path | None) -> Iterator[None]:
    """Send stdout, stderr (tqdm bars, warnings, tracebacks) and logging to the rule's log file."""
    if not path:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", buffering=1) as stream:
        old = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = stream
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root_logger = logging.getLogger()
        root_logger.addHandler(handler)
        root_logger.setLevel(logging.INFO)
        try:
            yield
        except BaseException:
            import traceback

            traceback.print_exc(file=stream)
            raise
        finally:
            root_logger.removeHandler(handler)
            sys.stdout, sys.stderr = old
