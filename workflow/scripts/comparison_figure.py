"""Rule comparison_figure: every comparison machine from the same noise, each with its nearest image."""

from els.config import log_to
from els.figures import comparison_figure, machine_label
from els.io import read_json, read_safetensors, read_sample

with log_to(snakemake.log[0]):
    wc = snakemake.wildcards
    names = read_json(snakemake.input.meta)["class_names"]
    columns = []
    for machine, sample_path, nn_path, images_path in zip(
        snakemake.params.machines,
        snakemake.input.samples,
        snakemake.input.neighbours,
        snakemake.input.neighbour_images,
        strict=True,
    ):
        nn = read_json(nn_path)
        index, distance = nn["nn_index_in_class"], nn["nn_distance_in_class"]
        columns.append(
            {
                "label": machine_label(machine),
                "sample": read_sample(sample_path).image,
                "neighbour": read_safetensors(images_path)[0]["nearest_in_class"],
                "neighbour_title": f"#{index}\nL2 = {distance:.3f}",
            }
        )
    cls = "all classes" if wc.cls == "all" else f"class {wc.cls} ({names[int(wc.cls)]})"
    comparison_figure(
        snakemake.output[0],
        columns,
        title=f"{wc.dataset}, {cls}, seed {wc.seed}: the same noise through each machine",
    )
