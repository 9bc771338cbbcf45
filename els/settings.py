"""Reading and validating the pipeline's config files; workflow/schemas/config.schema.yaml is the one
source of the config's keys, allowed values and defaults.

Errors are meant to be read at a glance: a YAML error names the file, the line and the column; every
schema error is one line with the key path, the bad value and what is allowed (never the schema).
The machine names are not written in the schema file: `machine_kinds()` fills them in when the schema
is loaded, from `els.MACHINES` plus the zoo's `ZOO_KINDS` when `els.zoo` is installed, so the schema,
the wildcards and the library share one list.

    python -m els.settings config.yaml [more.yaml ...]   # check files as the workflow would
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path

import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"
MAX_VALUE_CHARS = 60


class ConfigFileError(ValueError):
    """A config file that cannot be read, or a config the schema rejects; one line per problem."""


def machine_kinds() -> tuple[str, ...]:
    """Every machine the pipeline can run (els.config.MACHINES: the patch machines, then els.zoo's)."""
    from .config import MACHINES

    return MACHINES


# ----------------------------------------------------------------------------- YAML files


def load_yaml(path: str | Path) -> dict:
    """A config file as a dict; a syntax error (a tab, a bad indent) names the file and the line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigFileError(f"{path}: cannot read the config file ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        line = text.splitlines()[mark.line] if mark and mark.line < len(text.splitlines()) else ""
        hint = " (YAML indents with spaces, not tabs)" if "\t" in line else ""
        problem = err.problem or err.context or "invalid YAML"
        raise ConfigFileError(
            f"{where}: YAML syntax error: {problem}{hint}\n    {line.rstrip()}"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigFileError(f"{path}: YAML error: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(
            f"{path}: a config file must be a mapping of keys (datasets:, data:, ...), "
            f"not a {type(data).__name__}"
        )
    return data


def check_files(paths: Iterable[str | Path]) -> None:
    """Raise ConfigFileError naming the file and line of the first unreadable YAML file."""
    for path in paths:
        if Path(path).exists():
            load_yaml(path)


# ----------------------------------------------------------------------------- the schema


@cache
def _schema() -> dict:
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    schema["$defs"]["machine"]["enum"] = list(machine_kinds())
    return schema


def schema() -> dict:
    """The config schema with the machine names filled in (a copy: callers may change it)."""
    return copy.deepcopy(_schema())


def defaults(*path: str):
    """The schema's default at a key path, e.g. defaults('data', 'local_dirs')."""
    node = _schema()
    for key in path:
        node = _resolve(node)["properties"][key]
    return copy.deepcopy(node["default"])


def _resolve(node: Mapping) -> Mapping:
    ref = node.get("$ref")
    if not ref:
        return node
    target = _schema()["$defs"][ref.rsplit("/", 1)[-1]]
    merged = {**_resolve(target), **{k: v for k, v in node.items() if k != "$ref"}}
    if "properties" in target and "properties" in node:
        merged["properties"] = {
            key: {**target["properties"].get(key, {}), **node["properties"].get(key, {})}
            for key in {**target["properties"], **node["properties"]}
        }
    return merged


def validate(config: dict, sources: Iterable[str] = ()) -> dict:
    """Check `config` against the schema and fill in its defaults (in place); returns it.

    Raises ConfigFileError with one line per problem, headed by the files the config came from."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        lines = list(dict.fromkeys(describe(e) for e in errors))
        origin = ", ".join(map(str, sources)) or "the config"
        raise ConfigFileError(
            f"{len(lines)} problem(s) in {origin}:\n" + "\n".join(f"  {line}" for line in lines)
        )
    _fill_defaults(config, _schema())
    return config


def _fill_defaults(instance, node: Mapping) -> None:
    if not isinstance(instance, dict):
        return
    node = _resolve(node)
    for key, sub in (node.get("properties") or {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            _fill_defaults(instance[key], sub)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in instance.items():
            if key not in (node.get("properties") or {}):
                _fill_defaults(value, extra)


# ----------------------------------------------------------------------------- messages


def key_path(parts: Iterable) -> str:
    """['datasets', 'X', 'seeds', 0] -> 'datasets.X.seeds[0]'."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _short(value) -> str:
    text = (
        repr(value)
        if not isinstance(value, (dict, list))
        else yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    )
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


def describe(error) -> str:
    """One line for a jsonschema ValidationError: key path, bad value, what is allowed."""
    where = key_path(error.absolute_path)
    value, kind, expected = error.instance, error.validator, error.validator_value
    if "propertyNames" in error.schema_path:
        allowed = (
            f"choose one of {', '.join(map(str, expected))}"
            if kind == "enum"
            else f"a name must match {error.schema.get('pattern', expected)}"
        )
        return f"{where}: key {_short(value)} is not allowed; {allowed}"
    if kind == "additionalProperties":
        allowed = sorted(error.schema.get("properties") or {})
        unknown = sorted(set(value) - set(allowed)) if isinstance(value, dict) else []
        prefix = "" if where == "(top level)" else f"{where}."
        return "; ".join(
            f"{prefix}{key}: unknown key; allowed here: {', '.join(allowed)}" for key in unknown
        )
    if kind == "enum":
        return f"{where}: {_short(value)} is not allowed; choose one of {', '.join(map(str, expected))}"
    if kind == "type":
        wanted = " or ".join(expected) if isinstance(expected, list) else expected
        return f"{where}: {_short(value)} is not of type {wanted}"
    if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        bound = {
            "minimum": "at least",
            "maximum": "at most",
            "exclusiveMinimum": "greater than",
            "exclusiveMaximum": "less than",
        }[kind]
        return f"{where}: {_short(value)} is out of range; must be {bound} {expected}"
    if kind == "minItems" and where.endswith(".classes"):
        return (
            f"{where}: [] lists no class; give at least one class id (e.g. [0, 1]), or set "
            "conditional: false to sample the whole set"
        )
    if kind == "minItems":
        return f"{where}: {_short(value)} is empty; list at least {expected} item(s)"
    if kind == "minProperties":
        if where == "datasets":
            return (
                "datasets: {} names no dataset; add at least one entry (e.g. FashionMNIST: with "
                "classes, seeds, machines, schedules; see config.yaml)"
            )
        return f"{where}: {{}} is empty; give at least {expected} key(s)"
    if kind == "required":
        missing = [k for k in expected if k not in (value or {})]
        return f"{where}: missing key(s) {', '.join(missing)}"
    if kind == "uniqueItems":
        return f"{where}: {_short(value)} repeats an item; list each once"
    if kind == "pattern":
        return f"{where}: {_short(value)} does not match {expected}"
    return f"{where}: {error.message}"


def main(argv: list[str] | None = None) -> int:
    paths = (argv if argv is not None else sys.argv[1:]) or ["config.yaml"]
    config: dict = {}
    try:
        for path in paths:
            _merge(config, load_yaml(path))
        validate(config, paths)
    except ConfigFileError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"{', '.join(paths)}: valid")
    return 0


def _merge(base: dict, update: Mapping) -> None:
    """Snakemake's update_config: nested mappings merge, everything else replaces."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


if __name__ == "__main__":
    sys.exit(main())
