"""Rule neighbours: els.neighbours.nearest_train_image over the whole set and within the class."""

import torch

from els.config import log_to
from els.data import class_names, load_prepared
from els.io import read_sample, write_json, write_safetensors
from els.neighbours import nearest_train_image, training_subset

with log_to(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    wc = snakemake.wildcards
    sample = read_sample(snakemake.input.sample)
    images, labels = load_prepared(snakemake.input.train)
    names = class_names(snakemake.input.train)
    cls = None if wc.cls == "all" else int(wc.cls)
    overall = nearest_train_image(sample.image, images, labels)
    in_class = overall if cls is None else nearest_train_image(sample.image, images, labels, cls)
    # was the in-class neighbour among the images the machine was built from?
    used = training_subset(labels, cls, snakemake.params.max_train_per_class)
    result = {
        "dataset": wc.dataset,
        "machine": wc.machine,
        "class": wc.cls,
        "seed": int(wc.seed),
        "class_name": "all" if cls is None else names[cls],
        "nn_index": overall.index,
        "nn_class": overall.label,
        "nn_class_name": names[overall.label],
        "nn_distance": overall.distance,
        "nn_index_in_class": in_class.index,
        "nn_distance_in_class": in_class.distance,
        "nn_in_class_used_for_training": bool((used == in_class.index).any()),
        "n_train": int(used.numel()),
    }
    write_safetensors(
        snakemake.output.images,
        {"nearest": images[overall.index], "nearest_in_class": images[in_class.index]},
        {
            "format": "els.neighbours",
            "nn_index": str(overall.index),
            "nn_index_in_class": str(in_class.index),
        },
    )
    write_json(snakemake.output.neighbours, result)
    print(result)
