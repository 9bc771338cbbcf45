# ELS reproduction pipeline: data -> index (or zoo stats) -> sample -> neighbours -> figures/summary.
#   snakemake --cores all --workflow-profile workflow/profiles/default [--configfile FILE]
# See README.md (config keys, output layout, partial reruns).


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/index.smk"
include: "workflow/rules/stats.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/neighbours.smk"
include: "workflow/rules/figures.smk"


if config.get("cnn"):

    include: "workflow/rules/cnn.smk"


rule all:
    default_target: True
    input:
        all_targets(),
        rules.cnn_all.input if config.get("cnn") else [],
