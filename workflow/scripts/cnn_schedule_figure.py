"""Rule cnn_schedule_figure: the model's schedule beside the published one;
see els.cnn.stages.stage_schedule_figure."""

import sys

from els.cnn import stages

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    settings = stages.resolve_settings(snakemake.params.cnn, snakemake.wildcards.model, 0)
    stages.stage_schedule_figure(
        settings,
        snakemake.input.scales,
        snakemake.output.figure,
        snakemake.input.reference[0] if snakemake.input.reference else None,
    )
