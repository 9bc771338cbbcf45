# Stage 2: one PatchIndex per (dataset, machine, class or `all`, k of the machine's schedule), built
# once from the class's first max_train_per_class training images (k0 for the ideal score).


rule build_index:
    input:
        train=TRAIN,
    output:
        index=INDEX,
    log:
        "logs/build_index/{dataset}/{machine}/{cls}/k{k}.log",
    benchmark:
        "logs/benchmarks/build_index/{dataset}/{machine}/{cls}/k{k}.tsv"
    conda:
        "../envs/els.yaml"
    threads: stage("index", "threads")
    resources:
        mem_mb=stage("index", "mem_mb"),
        runtime=stage("index", "runtime"),
    params:
        max_train_per_class=lambda wc: dataset_config(wc).get("max_train_per_class"),
    script:
        "../scripts/build_index.py"
