# Stage 1: the prepared training set of a dataset (uint8 [N, C, 32, 32] + labels, safetensors) and its
# metadata. prepare_data writes one version per input key (els/inputs.py: a manifest of the content
# hashes of an image folder's files, or of the hashes that pin a torchvision set's raw files), so a
# failed job never touches a good version; select_data copies the version of the current key to
# the paths the later stages read. Raw files: data.root, then torchvision's download, then
# data.local_dirs, then (FashionMNIST, root only) apt-get install dataset-fashion-mnist; everything
# read is verified (see els/data.py).


rule prepare_data:
    input:
        manifest=PREPARED_MANIFEST,
    output:
        train=PREPARED,
        meta=PREPARED_META,
    log:
        "logs/prepare_data/{dataset}/{key}.log",
    benchmark:
        "logs/benchmarks/prepare_data/{dataset}/{key}.tsv"
    conda:
        "../envs/els.yaml"
    threads: stage("data", "threads")
    resources:
        mem_mb=stage("data", "mem_mb"),
        runtime=stage("data", "runtime"),
        # where the raw files are looked for (data.*), never what they hold (each is verified
        # against its pinned hash): a resource, not a param, so moving them does not rerun
        els_data=json.dumps(DATA),
        # the image folder's place, likewise: its content is pinned by the manifest (the input)
        els_folder=lambda wc: dataset_config(wc).get("path") or "",
    params:
        dataset=lambda wc: (
            "imagefolder"
            if dataset_config(wc).get("source", "torchvision") == "imagefolder"
            else wc.dataset
        ),
        channels=lambda wc: dataset_config(wc).get("channels"),
    script:
        "../scripts/prepare_data.py"


rule select_data:
    input:
        train=prepared_of(PREPARED),
        meta=prepared_of(PREPARED_META),
    output:
        train=TRAIN,
        meta=META,
    log:
        "logs/select_data/{dataset}.log",
    benchmark:
        "logs/benchmarks/select_data/{dataset}.tsv"
    conda:
        "../envs/els.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../scripts/select_data.py"
