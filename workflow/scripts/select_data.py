"""Rule select_data: the prepared version of the current input key -> the stable data paths."""

from els.config import log_to
from els.inputs import select

with log_to(snakemake.log[0]):
    select(
        snakemake.input.train, snakemake.input.meta, snakemake.output.train, snakemake.output.meta
    )
    print(f"{snakemake.wildcards.dataset}: selected {snakemake.input.train}")
