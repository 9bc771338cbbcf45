"""Rule pair_figure: sample | nearest training image in its class | nearest in the whole set."""

from els.config import log_to
from els.figures import machine_label, pair_figure
from els.io import read_json, read_safetensors, read_sample

with log_to(snakemake.log[0]):
    wc = snakemake.wildcards
    sample = read_sample(snakemake.input.sample)
    nn = read_json(snakemake.input.neighbours)
    neighbours, _ = read_safetensors(snakemake.input.neighbour_images)
    overall = (
        neighbours["nearest"],
        f"nearest in the whole set\n#{nn['nn_index']} ({nn['nn_class_name']}), "
        f"L2 = {nn['nn_distance']:.2f}",
    )
    if wc.cls == "all":  # one training set: the two neighbours are the same image
        panels, cls = [overall], "all classes"
    else:
        used = "" if nn["nn_in_class_used_for_training"] else ",\nnot in the machine's images"
        in_class = (
            neighbours["nearest_in_class"],
            f"nearest in class {wc.cls}\n#{nn['nn_index_in_class']}, "
            f"L2 = {nn['nn_distance_in_class']:.2f}{used}",
        )
        if nn["nn_index_in_class"] == nn["nn_index"]:
            overall = (overall[0], "nearest in the whole set:\nthe same image")
        panels, cls = [in_class, overall], f"class {wc.cls} ({nn['class_name']})"
    pair_figure(
        snakemake.output[0],
        sample.image,
        panels,
        title=f"{wc.dataset} {machine_label(wc.machine)}: {cls}, seed {wc.seed}",
    )
