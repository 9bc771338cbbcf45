"""Rule pair_figure: sample | nearest training image (whole training set)."""

from els.config import log_to
from els.figures import machine_label, pair_figure
from els.io import read_json, read_safetensors, read_sample

with log_to(snakemake.log[0]):
    wc = snakemake.wildcards
    sample = read_sample(snakemake.input.sample)
    nn = read_json(snakemake.input.neighbours)
    neighbours, _ = read_safetensors(snakemake.input.neighbour_images)
    cls = "all classes" if wc.cls == "all" else f"class {wc.cls} ({nn['class_name']})"
    pair_figure(
        snakemake.output[0],
        sample.image,
        neighbours["nearest"],
        title=f"{wc.dataset} {machine_label(wc.machine)}: {cls}, seed {wc.seed}",
        sample_title="sample",
        neighbour_title=(
            f"nearest: #{nn['nn_index']} ({nn['nn_class_name']})\nL2 = {nn['nn_distance']:.3f}"
        ),
    )
