"""How every stage builds its config: schema defaults ← preset ← YAML file ← dotted overrides.

The schemas live beside the code that reads them (`gramline.models.config`, `gramline.data.config`,
`gramline.train.config`, `gramline.train.recipes.dino.config`, `gramline.curate.config`,
`gramline.eval.*`); the preset values are in `gramline.presets`. Unknown keys, wrong types and
impossible values raise InputError naming the dotted field and what was expected (exit 2).
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from gramline.errors import InputError

C = TypeVar("C", bound=BaseModel)


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- generic machinery


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise InputError(f"--set {item!r}", "has no '='", "key=value, e.g. optim.lr=1e-3")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise InputError(f"--set {item!r}", "has an empty key", "a dotted key such as train.steps")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string; users mean a number
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.split("."), value


def _set_dotted(tree: dict[str, Any], parts: list[str], value: Any, full: str) -> None:
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise InputError(f"config key {full!r}", f"{where!r} is a value, not a section", "a valid key")
        node = child
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last] = deep_merge(node[last], value)  # a mapping value updates the section, key by key
    else:
        node[last] = value


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _describe_validation_error(cls: type[BaseModel], err: ValidationError) -> InputError:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "<root>"
    kind = first["type"]
    if kind == "extra_forbidden":
        parent_loc = first["loc"][:-1]
        model: Any = cls
        for part in parent_loc:
            annotation = model.model_fields[str(part)].annotation if hasattr(model, "model_fields") else None
            model = annotation
        valid = sorted(model.model_fields) if hasattr(model, "model_fields") else []
        return InputError(f"config key {field!r}", "does not exist", "one of " + ", ".join(valid))
    message = first["msg"].removeprefix("Value error, ")
    if not first["loc"] or isinstance(first.get("input"), dict):
        # a cross-field check: its message names the fields involved
        where = "config" if not first["loc"] else f"config section {field!r}"
        return InputError(where, message)
    return InputError(f"config field {field!r}", f"got {first.get('input')!r}: {message}")


def load_yaml_file(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--config {path}", "does not exist", "a YAML config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise InputError(f"--config {path}", f"is not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise InputError(f"--config {path}", "is not a mapping", "a YAML mapping of config sections")
    return data


def resolve_config(
    cls: type[C],
    base: Mapping[str, Any] | None = None,
    config_file: Path | str | None = None,
    overrides: Sequence[str] = (),
) -> C:
    """Build `cls` from defaults ← `base` (preset) ← YAML file ← dotted overrides, validating once."""
    tree: dict[str, Any] = dict(copy.deepcopy(base or {}))
    if config_file:
        tree = deep_merge(tree, load_yaml_file(config_file))
    for item in overrides:
        parts, value = parse_override(item)
        _set_dotted(tree, parts, value, item.split("=", 1)[0])
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        raise _describe_validation_error(cls, err) from None


def _sections(annotation: Any) -> list[Any]:
    """The config classes (or mappings of them) an annotation may hold: `X`, `X | None`, `dict[str, X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (dict, Mapping):
        return [("mapping", typing.get_args(annotation)[-1])]
    return [found for arg in typing.get_args(annotation) for found in _sections(arg)]


def check_override_keys(cls: type[BaseModel], overrides: Sequence[str]) -> None:
    """Every `--set` key names a field of `cls` (values are checked where the config is built).

    For callers that cannot build the whole config (it may depend on an input artifact), e.g. the
    host of a container run: a misspelt key fails there, before a container starts.
    """
    for item in overrides:
        parts, _ = parse_override(item)
        model: Any = cls
        for depth, part in enumerate(parts):
            if model is None:
                break  # below a plain value or an open mapping: the config build judges it
            if isinstance(model, tuple):  # dict[str, X]: any name, then X's fields
                model = next(iter(_sections(model[1])), None)
                continue
            if part not in model.model_fields:
                where = ".".join(parts[: depth + 1])
                raise InputError(f"config key {where!r}", "does not exist",
                                 "one of " + ", ".join(sorted(model.model_fields)))
            model = next(iter(_sections(model.model_fields[part].annotation)), None)


def dump_config(config: BaseModel) -> dict[str, Any]:
    return config.model_dump(mode="json")


def load_stage_config(cls: type[C], stage: str, preset: str, config_file: Path | str | None = None,
                      overrides: Sequence[str] = (), base: Mapping[str, Any] | None = None) -> C:
    """A stage's config: `base` (e.g. the config of the run a stage continues) ← the stage's preset
    `PRESETS[stage][preset]` ← YAML file ← dotted overrides."""
    from gramline.presets import stage_preset

    return resolve_config(cls, deep_merge(dict(base or {}), stage_preset(stage, preset)), config_file, overrides)
