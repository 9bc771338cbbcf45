# ELS reproduction pipeline: data -> index (or zoo stats) -> sample -> per-seed files
# (neighbours, figures) -> grids, comparison, summary.
#   snakemake --cores all --workflow-profile workflow/profiles/default [--configfile FILE]
# See README.md (config keys, output layout, partial reruns) and docs/robust-runs.md.
from snakemake.utils import min_version

from els.settings import check_files

min_version("8.20")

# Snakemake's own message for a broken YAML file names neither the file nor the line; a file given
# with --configfile is read before this line runs, so `make` and the `els` command check it first
check_files(["config.yaml"])


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/index.smk"
include: "workflow/rules/stats.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/seed.smk"
include: "workflow/rules/figures.smk"


if config.get("cnn"):

    include: "workflow/rules/cnn.smk"


rule all:
    default_target: True
    input:
        all_targets(),
        rules.cnn_all.input if config.get("cnn") else [],
