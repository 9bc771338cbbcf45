# Stage 2: one PatchIndex per (dataset, machine, class or `all`), serving every patch size of the
# machine's schedule, built from the class's first max_train_per_class training images.


rule build_index:
    input:
        train=TRAIN,
    output:
        index=INDEX,
    log:
        "logs/build_index/{dataset}/{machine}/{cls}.log",
    benchmark:
        "logs/benchmarks/build_index/{dataset}/{machine}/{cls}.tsv"
    conda:
        "../envs/els.yaml"
    threads: stage("index", "threads")
    resources:
        mem_mb=stage("index", "mem_mb"),
        runtime=stage("index", "runtime"),
    params:
        max_train_per_class=lambda wc: dataset_config(wc).get("max_train_per_class"),
        ks=index_patch_sizes,
    script:
        "../scripts/build_index.py"
