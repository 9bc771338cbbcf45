"""Config errors a person reads at a glance (els.settings): a YAML error names the file, the line and
the column; each schema error is one line with the key path, the bad value and what is allowed; the
schema's defaults are filled in, and the machine names come from one list."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from els import settings
from els.config import ConfigError, start_checks

REPO = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((REPO / "config.yaml").read_text())


def problems(change) -> list[str]:
    """The lines of the error for the default config changed by `change` (a function)."""
    config = copy.deepcopy(DEFAULT)
    change(config)
    with pytest.raises(settings.ConfigFileError) as error:
        settings.validate(config, ["config.yaml"])
    head, *lines = str(error.value).splitlines()
    assert head == f"{len(lines)} problem(s) in config.yaml:"
    return [line.strip() for line in lines]


def fm(config) -> dict:
    return config["datasets"]["FashionMNIST"]


def test_the_default_config_is_valid_and_gets_the_schema_defaults():
    config = settings.validate(copy.deepcopy(DEFAULT))
    assert config["sampling"]["provenance"] is True  # not in config.yaml: the schema's default
    assert config["resources"]["sample"] == {"threads": 1, "mem_mb": 8000, "runtime": 720}
    partial = settings.validate({"datasets": copy.deepcopy(DEFAULT["datasets"])})
    assert partial["resources"]["sample"] == {"threads": 2, "mem_mb": 8000, "runtime": 720}
    assert partial["data"]["local_dirs"] == settings.defaults("data", "local_dirs")
    assert partial["datasets"]["FashionMNIST"]["channels"] is None


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda c: fm(c).update(seedz=[0]),
            "datasets.FashionMNIST.seedz: unknown key; allowed here: channels, classes, "
            "comparison, conditional, machines, max_train_per_class, path, schedules, seeds, source",
        ),
        (
            lambda c: c.update(sampl={}),
            "sampl: unknown key; allowed here: cnn, data, datasets, resources, sampling, zoo",
        ),
        (
            lambda c: c.update(datasets={}),
            "datasets: {} names no dataset; add at least one entry (e.g. FashionMNIST: with "
            "classes, seeds, machines, schedules; see config.yaml)",
        ),
        (
            lambda c: fm(c).update(classes=[]),
            "datasets.FashionMNIST.classes: [] lists no class; give at least one class id "
            "(e.g. [0, 1]), or set conditional: false to sample the whole set",
        ),
        (
            lambda c: fm(c).update(machines=["bbelz"]),
            "datasets.FashionMNIST.machines[0]: 'bbelz' is not allowed; choose one of "
            + ", ".join(settings.machine_kinds()),
        ),
        (
            lambda c: fm(c)["schedules"].update(bbelz="scales/x.txt"),
            "datasets.FashionMNIST.schedules: key 'bbelz' is not allowed; choose one of "
            + ", ".join(settings.machine_kinds()),
        ),
        (
            lambda c: c["sampling"].update(batch_seeds=0),
            "sampling.batch_seeds: 0 is out of range; must be at least 1",
        ),
        (
            lambda c: c["sampling"].update(memory_budget_gb=0),
            "sampling.memory_budget_gb: 0 is out of range; must be greater than 0",
        ),
        (
            lambda c: fm(c).update(seeds="0, 1"),
            "datasets.FashionMNIST.seeds: '0, 1' is not of type array",
        ),
        (
            lambda c: fm(c)["comparison"].update(seeds=[0, 0]),
            "datasets.FashionMNIST.comparison.seeds: [0, 0] repeats an item; list each once",
        ),
        (
            lambda c: fm(c).pop("machines"),
            "datasets.FashionMNIST: missing key(s) machines",
        ),
        (
            lambda c: c.update(datasets={"Fashion-MNIST": fm(c)}),
            "datasets: key 'Fashion-MNIST' is not allowed; a name must match "
            "^[A-Za-z][A-Za-z0-9_]*$",
        ),
        (
            lambda c: c["resources"]["sample"].update(gpus=1),
            "resources.sample.gpus: unknown key; allowed here: mem_mb, runtime, threads",
        ),
        (
            lambda c: c.update(cnn={"dataset": "FashionMNIST", "models": {"m": {"model": {}}}}),
            "cnn: missing key(s) classes",
        ),
    ],
)
def test_each_schema_error_is_one_line_with_path_value_and_what_is_allowed(change, expected):
    assert problems(change) == [expected]


def test_several_errors_give_one_line_each_and_never_the_schema():
    lines = problems(lambda c: (c["sampling"].update(dtype="half"), fm(c).update(seeds=[-1])))
    assert lines == [
        "datasets.FashionMNIST.seeds[0]: -1 is out of range; must be at least 0",
        "sampling.dtype: 'half' is not allowed; choose one of float32, float64",
    ]


def test_a_yaml_error_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("datasets:\n  FashionMNIST:\n\tsource: torchvision\n")
    with pytest.raises(settings.ConfigFileError) as error:
        settings.load_yaml(path)
    first, second = str(error.value).splitlines()
    assert first.startswith(f"{path}:3:1: YAML syntax error: ")
    assert first.endswith("(YAML indents with spaces, not tabs)")
    assert second == "    \tsource: torchvision"
    path.write_text("datasets: [1, 2\nsampling: {}\n")
    with pytest.raises(settings.ConfigFileError, match=rf"^{path}:2:\d+: YAML syntax error: "):
        settings.load_yaml(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(settings.ConfigFileError, match="must be a mapping of keys"):
        settings.load_yaml(path)


def test_the_command_line_check_reports_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling:\n  dtype: half\n")
    assert settings.main([str(bad)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"1 problem(s) in {bad}:",
        "  sampling.dtype: 'half' is not allowed; choose one of float32, float64",
    ]
    assert settings.main([str(REPO / "config.yaml")]) == 0


def test_start_checks_name_the_files_and_resolve_shipped_schedules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no scales/ here: the schedules come from the workflow's folder
    config = copy.deepcopy(DEFAULT)
    start_checks(config, ["config.yaml"], REPO)
    assert fm(config)["schedules"]["bbels"] == str(
        REPO / "scales" / "FashionMNIST_resnet32x6_zeros_calibrated.txt"
    )
    config["sampling"]["dtype"] = "half"
    with pytest.raises(ConfigError, match=r"^1 problem\(s\) in config.yaml:\n  sampling.dtype"):
        start_checks(config, ["config.yaml"], REPO)


def test_the_schema_lists_no_machine_names_itself():
    """The machine names live in els.MACHINES (+ the zoo's ZOO_KINDS), filled in at load time."""
    import els

    raw = yaml.safe_load(settings.SCHEMA_PATH.read_text())
    assert "enum" not in raw["$defs"]["machine"]
    assert settings.schema()["$defs"]["machine"]["enum"][: len(els.MACHINES)] == list(els.MACHINES)


def test_the_library_default_search_folders_are_the_schema_default():
    """els.data.prepare_dataset's own default (for library use) is the schema's data.local_dirs."""
    from els.data import DEFAULT_LOCAL_DIRS

    assert settings.defaults("data", "local_dirs") == list(DEFAULT_LOCAL_DIRS)
