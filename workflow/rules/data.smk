# Stage 1: the prepared training set of a dataset (uint8 [N, C, 32, 32] + labels, safetensors) and its
# metadata. Raw files: data.root, then torchvision's download, then data.local_dirs, then (FashionMNIST,
# root only) apt-get install dataset-fashion-mnist; everything read is verified (see els/data.py).
# How the files are found (data.*) is read by the script, not a param: changing it does not rerun.


rule prepare_data:
    output:
        train=TRAIN,
        meta=META,
    log:
        "logs/prepare_data/{dataset}.log",
    benchmark:
        "logs/benchmarks/prepare_data/{dataset}.tsv"
    conda:
        "../envs/els.yaml"
    threads: stage("data", "threads")
    resources:
        mem_mb=stage("data", "mem_mb"),
        runtime=stage("data", "runtime"),
    params:
        dataset=lambda wc: (
            "imagefolder"
            if dataset_config(wc).get("source", "torchvision") == "imagefolder"
            else wc.dataset
        ),
        folder=lambda wc: dataset_config(wc).get("path"),
        channels=lambda wc: dataset_config(wc).get("channels"),
    script:
        "../scripts/prepare_data.py"
