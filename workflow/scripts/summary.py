"""Rule summary: one row per (dataset, machine, class, seed) -> results/summary.csv (pandas)."""

import json

import pandas as pd

from els.config import log_to
from els.io import read_json, read_sample, write_with

with log_to(snakemake.log[0]):
    rows = []
    # mosaic numbers per sample (sampling.provenance; none for a machine without a dominant
    # training image, wiener), by (dataset, machine, class, seed)
    mosaics = {}
    for path in snakemake.input.provenance:
        record = read_json(path)
        mosaics[(record["dataset"], record["machine"], record["class"], record["seed"])] = record
    for sample_path, nn_path, timing in zip(
        snakemake.input.samples,
        snakemake.input.neighbours,
        snakemake.input.timings,
        strict=True,
    ):
        meta = read_sample(sample_path).metadata
        # wall seconds of the batch job (Snakemake's benchmark), shared equally by its seeds; the
        # one column that differs between runs (sample files themselves hold no timings)
        batch_seconds = float(pd.read_csv(timing, sep="\t")["s"].iloc[0])
        nn = read_json(nn_path)
        mosaic = mosaics.get((nn["dataset"], nn["machine"], nn["class"], nn["seed"]), {})
        rows.append(
            {
                "dataset": nn["dataset"],
                "machine": nn["machine"],
                "class": nn["class"],
                "seed": nn["seed"],
                "sample_path": sample_path,
                "png_path": sample_path.removesuffix(".safetensors") + ".png",
                "nn_index": nn["nn_index"],
                "nn_class": nn["nn_class"],
                "nn_class_name": nn["nn_class_name"],
                "nn_distance": nn["nn_distance"],
                "nn_index_in_class": nn["nn_index_in_class"],
                "nn_distance_in_class": nn["nn_distance_in_class"],
                "nn_in_class_used_for_training": nn["nn_in_class_used_for_training"],
                "n_train": int(meta["n_train"]),
                "max_train_per_class": meta["max_train_per_class"],
                "schedule": meta["schedule"],
                "steps": len(json.loads(meta["k"])),
                "runtime_s": batch_seconds / len(json.loads(meta["batch_seeds"])),
                "batch_runtime_s": batch_seconds,
                "batch_seeds": meta["batch_seeds"],
                "device": meta["device"],
                "dtype": meta["dtype"],
                "n_sources": mosaic.get("n_sources"),
                "top_source_share": mosaic.get("top_source_share"),
                "mean_dominant_weight": mosaic.get("mean_dominant_weight"),
            }
        )
    table = pd.DataFrame(rows)
    order = table["class"].map(lambda c: -1 if c == "all" else int(c))
    table = table.assign(_order=order).sort_values(["dataset", "machine", "_order", "seed"])
    table = table.drop(columns="_order")
    write_with(snakemake.output[0], lambda tmp: table.to_csv(tmp, index=False))
    print(table.to_string())
