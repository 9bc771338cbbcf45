# Stage 2 for the training-free denoisers (els.zoo, docs/zoo.md): one statistics file per (dataset,
# class or `all`) -- the class's first max_train_per_class training images, their mean and covariance
# eigenbasis (float64) -- shared by every zoo machine. pca_locality's masks depend on t and are
# computed by the sampling job (see els/zoo/stats.py).


rule build_stats:
    input:
        train=TRAIN,
    output:
        stats=STATS,
    log:
        "logs/build_stats/{dataset}/{cls}.log",
    benchmark:
        "logs/benchmarks/build_stats/{dataset}/{cls}.tsv"
    conda:
        "../envs/els.yaml"
    threads: stage("stats", "threads")
    resources:
        mem_mb=stage("stats", "mem_mb"),
        runtime=stage("stats", "runtime"),
    params:
        max_train_per_class=lambda wc: dataset_config(wc).get("max_train_per_class"),
    script:
        "../scripts/build_stats.py"
