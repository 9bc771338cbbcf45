"""Where a workflow run's time went: the Snakemake benchmark files of its jobs
(logs/benchmarks/{rule}/.../*.tsv, one per job) summed per rule, and per machine for the rules whose
jobs are per machine.

Writes OUT (CSV): rule, machine, jobs, wall_s (the jobs' summed wall time), cpu_s (their summed CPU time as
Snakemake's benchmark polling saw it: a lower bound), share_of_wall; the last row is the total.

    .venv/bin/python benchmarks/workflow_jobs.py logs/benchmarks results/benchmarks/workflow_jobs.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

# rules whose benchmark files are logs/benchmarks/{rule}/{dataset}/{machine}/...
PER_MACHINE = ("build_index", "sample_batch", "finish_seed")


def jobs_by_rule(benchmarks: Path) -> pd.DataFrame:
    rows = []
    for path in sorted(Path(benchmarks).rglob("*.tsv")):
        row = pd.read_csv(path, sep="\t").iloc[-1]
        parts = path.relative_to(benchmarks).parts
        machine = parts[2] if parts[0] in PER_MACHINE and len(parts) > 3 else ""
        rows.append(
            {
                "rule": parts[0],
                "machine": machine,
                "wall_s": float(row["s"]),
                "cpu_s": float(row["cpu_time"]),
            }
        )
    if not rows:
        raise SystemExit(f"no Snakemake benchmark files (*.tsv) under {benchmarks}")
    jobs = pd.DataFrame(rows)
    table = (
        jobs.groupby(["rule", "machine"])
        .agg(jobs=("wall_s", "size"), wall_s=("wall_s", "sum"), cpu_s=("cpu_s", "sum"))
        .sort_values("wall_s", ascending=False)
        .reset_index()
    )
    total = pd.DataFrame(
        [
            {
                "rule": "total",
                "machine": "",
                "jobs": len(jobs),
                "wall_s": jobs.wall_s.sum(),
                "cpu_s": jobs.cpu_s.sum(),
            }
        ]
    )
    table = pd.concat([table, total], ignore_index=True)
    table["share_of_wall"] = table.wall_s / jobs.wall_s.sum()
    return table.round({"wall_s": 1, "cpu_s": 1, "share_of_wall": 3})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("benchmarks", type=Path, help="a run's logs/benchmarks folder")
    p.add_argument("out", type=Path, help="the CSV to write")
    args = p.parse_args(argv)
    table = jobs_by_rule(args.benchmarks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
