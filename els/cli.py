"""The `els` command: one sample or one machine comparison through the pipeline itself.

`els sample` and `els compare` run the Snakemake workflow for exactly the files of one (dataset,
class, seed), so the cache, the start-up checks and the outputs are the pipeline's own: a second call
for the same sample runs nothing, and the files land where `make run` puts them. The config is the
pipeline's (config.yaml in the working directory, else the one shipped with the workflow) with the
requested class, seed and machine added to the dataset's entry, written to .snakemake/els/cli.yaml.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from pathlib import Path

import yaml

from . import settings

WORKFLOW_DIR = Path(__file__).resolve().parents[1]
SNAKEFILE = WORKFLOW_DIR / "Snakefile"
PROFILE = WORKFLOW_DIR / "workflow" / "profiles" / "default"
CLI_CONFIG = Path(".snakemake") / "els" / "cli.yaml"

EXAMPLES = """\
examples:
  els sample --dataset FashionMNIST --class 3 --seed 0 --machine bbels
  els sample --dataset FashionMNIST --class 3 --seed 0 --machine els --dry-run
  els compare --dataset FashionMNIST --class 3 --seed 0
  els compare --dataset FashionMNIST --class 3 --seed 1 --machines ls,bbels --cores 2
  els check configs/paper_fashion_mnist.yaml

The files land under results/ of the working directory (--directory), as with `make run`.
"""


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "check":
        return settings.main(args.configs)
    try:
        config, origin = load_config(args)
        targets = plan_targets(args, config)
    except (settings.ConfigFileError, ValueError) as err:
        print(f"els {args.command}: {err}", file=sys.stderr)
        return 2
    workdir = Path(args.directory)
    merged = workdir / CLI_CONFIG
    merged.parent.mkdir(parents=True, exist_ok=True)
    merged.write_text(
        f"# written by `els {args.command}` from {origin}; rewritten on every call\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    command = snakemake_command(workdir, merged, args, targets)
    print("running:", " ".join(command), flush=True)
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        print(f"els {args.command}: snakemake failed (exit {result.returncode})", file=sys.stderr)
        return result.returncode
    if args.dry_run:
        return 0
    print("PNGs:")
    for target in targets:
        if target.endswith(".png"):
            print(f"  {(workdir / target).resolve()}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="els",
        description="Sample with the Equivariant Local Score machines through the pipeline.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = top.add_subparsers(dest="command", required=True)
    sample = commands.add_parser(
        "sample",
        help="one sample: its PNG, its pair figure (with the nearest training images) and, when "
        "the config keeps them, its trajectory and provenance figures",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare = commands.add_parser(
        "compare",
        help="the machines side by side from the same noise for one (class, seed)",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for sub in (sample, compare):
        sub.add_argument("--dataset", required=True, help="a key of the config's datasets:")
        sub.add_argument(
            "--class", dest="cls", required=True, help="class id, or 'all' when unconditional"
        )
        sub.add_argument("--seed", type=int, required=True, help="the noise seed (>= 0)")
        sub.add_argument(
            "--config",
            help="the pipeline config (default: config.yaml here, else the workflow's own)",
        )
        sub.add_argument("--directory", default=".", help="working directory (results/ lands here)")
        sub.add_argument("--cores", default="all", help="CPU cores for Snakemake (default all)")
        sub.add_argument("--dry-run", action="store_true", help="list the jobs, run nothing")
    sample.add_argument("--machine", required=True, help="ideal, ls, els, bbels (or a zoo kind)")
    compare.add_argument(
        "--machines",
        help="comma-separated machines (default: the config's comparison.machines, else every "
        "machine the dataset has a schedule for)",
    )
    check = commands.add_parser("check", help="check config files as the workflow would")
    check.add_argument("configs", nargs="+")
    return top


def load_config(args) -> tuple[dict, str]:
    if args.config:
        path = Path(args.config)
    elif (Path(args.directory) / "config.yaml").is_file():
        path = Path(args.directory) / "config.yaml"
    else:
        path = WORKFLOW_DIR / "config.yaml"
    config = settings.load_yaml(path)
    settings.validate(copy.deepcopy(config), [str(path)])
    return config, str(path)


def plan_targets(args, config: dict) -> list[str]:
    """Add the request to the dataset's entry (in place) and return the files to make."""
    datasets = config.get("datasets") or {}
    if args.dataset not in datasets:
        raise ValueError(
            f"--dataset {args.dataset!r} is not in the config's datasets "
            f"({', '.join(datasets) or 'none'})"
        )
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    ds = datasets[args.dataset]
    conditional = ds.get("conditional", True)
    if conditional == (args.cls == "all") or (conditional and not args.cls.isdigit()):
        wanted = "a class id (0, 1, ...)" if conditional else "'all' (the dataset is unconditional)"
        raise ValueError(f"--class must be {wanted}, got {args.cls!r}")
    machines = machines_of_request(args, ds)
    unknown = [m for m in machines if m not in settings.machine_kinds()]
    if unknown:
        raise ValueError(
            f"unknown machine(s) {unknown}; choose from {', '.join(settings.machine_kinds())}"
        )
    missing = [m for m in machines if m not in (ds.get("schedules") or {})]
    if missing:
        raise ValueError(
            f"datasets.{args.dataset}.schedules has no schedule for {missing}; add one to the config"
        )
    if conditional:
        ds["classes"] = _with(ds.get("classes"), int(args.cls))
    ds["seeds"] = _with(ds.get("seeds"), args.seed)
    keys = {"dataset": args.dataset, "cls": args.cls, "seed": args.seed}
    if args.command == "compare":
        comp = {"seeds": [args.seed], "machines": machines}
        if conditional:
            comp["classes"] = [int(args.cls)]
        ds["comparison"] = comp
        return ["results/figures/{dataset}/comparison/{cls}/seed{seed}.png".format(**keys)]
    (machine,) = machines
    ds["machines"] = _with(ds.get("machines"), machine)
    sampling = {**settings.defaults("sampling"), **(config.get("sampling") or {})}
    patterns = [
        "results/samples/{dataset}/{machine}/{cls}/seed{seed}.png",
        "results/figures/{dataset}/pairs/{machine}/{cls}/seed{seed}.png",
    ]
    if sampling["trajectory"]:
        patterns.append("results/figures/{dataset}/trajectories/{machine}/{cls}/seed{seed}.png")
    if sampling["provenance"]:
        patterns.append("results/figures/{dataset}/provenance/{machine}/{cls}/seed{seed}.png")
    return [p.format(machine=machine, **keys) for p in patterns]


def machines_of_request(args, ds: dict) -> list[str]:
    if args.command == "sample":
        return [args.machine]
    if args.machines:
        return [m.strip() for m in args.machines.split(",") if m.strip()]
    if (ds.get("comparison") or {}).get("machines"):
        return list(ds["comparison"]["machines"])
    return [m for m in settings.machine_kinds() if m in (ds.get("schedules") or {})]


def _with(values, value) -> list:
    values = list(values or [])
    return values if value in values else [*values, value]


def snakemake_command(workdir: Path, config: Path, args, targets: list[str]) -> list[str]:
    if not SNAKEFILE.is_file():
        raise SystemExit(
            f"els: the workflow is not next to the package ({SNAKEFILE} is missing); install the "
            "repository with `pip install -e .` to use `els sample` / `els compare`"
        )
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(SNAKEFILE),
        "--directory",
        str(workdir),
        "--configfile",
        str(config.resolve()),
        "--workflow-profile",
        str(PROFILE),
        "--cores",
        str(args.cores),
    ]
    if args.dry_run:
        command.append("--dry-run")
    return command + targets


if __name__ == "__main__":
    sys.exit(main())
