# Stage 4: the nearest training image of each sample by pixel L2 distance, over the whole training set
# and within the sample's class (for class `all`: the whole set again): a JSON record and the two
# neighbour images (uint8, safetensors) for the figures.


rule neighbours:
    input:
        sample=SAMPLE,
        train=TRAIN,
    output:
        neighbours=NEIGHBOURS,
        images=NEIGHBOUR_IMAGES,
    log:
        "logs/neighbours/{dataset}/{machine}/{cls}/seed{seed}.log",
    benchmark:
        "logs/benchmarks/neighbours/{dataset}/{machine}/{cls}/seed{seed}.tsv"
    conda:
        "../envs/els.yaml"
    threads: stage("neighbours", "threads")
    resources:
        mem_mb=stage("neighbours", "mem_mb"),
        runtime=stage("neighbours", "runtime"),
    params:
        max_train_per_class=lambda wc: dataset_config(wc).get("max_train_per_class"),
    script:
        "../scripts/neighbours.py"
