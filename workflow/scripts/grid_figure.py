"""Rule grid_figure: rows = classes, columns = seeds, for one (dataset, machine)."""

from els.config import log_to
from els.figures import grid_figure, machine_label
from els.io import read_json, read_sample

with log_to(snakemake.log[0]):
    wc = snakemake.wildcards
    classes, seeds = list(snakemake.params.classes), list(snakemake.params.seeds)
    keys = [(c, str(s)) for c in classes for s in seeds]  # the order of input.samples
    images = {
        key: read_sample(path).image
        for key, path in zip(keys, snakemake.input.samples, strict=True)
    }
    names = read_json(snakemake.input.meta)["class_names"]
    grid_figure(
        snakemake.output[0],
        images,
        classes,
        [str(s) for s in seeds],
        title=f"{wc.dataset} {machine_label(wc.machine)}: rows = classes, columns = seeds",
        row_labels=[c if c == "all" else f"{c} {names[int(c)]}" for c in classes],
        column_labels=[f"seed {s}" for s in seeds],
    )
