"""Rule evaluate_r2: per seed r and r^2 of the CNN sample against every compared machine's
(its machine, the ideal score, cnn.evaluation.machines), medians, one row per machine, scatter and
grid; see els.cnn.stages.stage_evaluate."""

import json
import sys

from els.cnn import stages

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    section = snakemake.params.cnn
    # the evaluation needs no weights: the class count only completes the settings
    settings = stages.resolve_settings(section, snakemake.wildcards.model, num_classes=0)
    summary = stages.stage_evaluate(
        settings,
        snakemake.input.cnn,
        snakemake.input.machines,
        snakemake.output.table,
        snakemake.output.summary,
        snakemake.output.scatter,
        snakemake.output.grid,
        snakemake.output.machines,
        snakemake.output.paper,
        pipeline_samples=snakemake.params.pipeline_samples,
    )
    print(json.dumps(summary, default=str), file=log)
