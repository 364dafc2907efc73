"""Teachers users define in YAML (``features.teacher_specs``), validated exactly like the registry entries.

``features.teacher_specs`` is either a mapping ``name -> spec fields`` inline in the run config, or the path
of a YAML file holding that mapping. The fields are TeacherSpec's (pipeline/teachers.py), checked by
pydantic (types, unknown keys) and then by the spec's own consistency checks; ``target_mpp`` and
``input_px`` must be written out, since they say at which scale and field of view the teacher was trained.
A spec may not reuse a registry name: ``features.weights`` is the way to run an entry with other weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from pipeline.errors import PathdistillError
from pipeline.teachers import TEACHERS, TeacherSpec

EXPLICIT = ("target_mpp", "input_px")
SPEC_FIELDS = TypeAdapter(TeacherSpec)


class TeacherSpecError(PathdistillError, ValueError):
    """A user-defined teacher spec is malformed; the message names the teacher, the key and where it was written."""


def parse_teacher_specs(value: dict[str, Any] | Path | str | None, where: str = "features.teacher_specs") -> dict[str, TeacherSpec]:
    """The specs ``value`` defines: a mapping written at ``where``, or the YAML file it names."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        where, value = str(value), _read_yaml(Path(value))
    return {name: _parse_one(name, fields, where) for name, fields in value.items()}


def spec_origin(value: dict[str, Any] | Path | str | None) -> str:
    """Where the specs of ``value`` are written, for listings."""
    return "features.teacher_specs" if isinstance(value, dict) else str(value)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise TeacherSpecError(f"teacher spec file {path} does not exist; fix features.teacher_specs")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise TeacherSpecError(f"teacher spec file {path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise TeacherSpecError(f"teacher spec file {path} must hold a mapping of teacher name -> spec fields")
    return data


def _parse_one(name: Any, fields: Any, where: str) -> TeacherSpec:
    what = f"teacher spec {name!r} in {where}"
    if not isinstance(name, str) or not isinstance(fields, dict):
        raise TeacherSpecError(f"{what}: each entry must be a teacher name mapping to its spec fields")
    if name in TEACHERS:
        raise TeacherSpecError(f"{what}: {name!r} is a registry entry; give yours another name (features.weights swaps an entry's weights)")
    if "name" in fields:
        raise TeacherSpecError(f"{what}: remove the key 'name': the entry's key is its name")
    if missing := [key for key in EXPLICIT if key not in fields]:
        raise TeacherSpecError(f"{what}: write out {missing}: the teacher's published scale and input size are never assumed")
    try:
        return SPEC_FIELDS.validate_python({"name": name, **fields})
    except ValidationError as error:
        problems = "; ".join(_problem(e) for e in error.errors())
        raise TeacherSpecError(f"{what}: {problems}") from error


def _problem(error: dict) -> str:
    key = ".".join(map(str, error["loc"]))
    if error["type"] == "unexpected_keyword_argument":
        return f"unknown key {key!r} (the fields are {', '.join(f.name for f in dataclasses.fields(TeacherSpec) if f.name != 'name')})"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key}: {message}" if key else message.split(": ", 1)[-1]  # the spec's own checks, without its name again
