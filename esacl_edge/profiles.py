"""Device profiles: YAML files that say where and how a device learns.

A profile is resolved by name (a file ``NAME.yaml`` shipped in ``device_profiles/``) or by
path, validated field by field, and turned into a frozen :class:`Profile`. Nothing else in
the package reads YAML.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ProfileError

SCHEMA_VERSION = 1
PRECISIONS = ("fp32", "fp16", "bf16")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Profile:
    """Validated device profile. Budgets are bytes."""

    name: str
    device: str = "cpu"
    fallback: str = "cpu"
    precision: str = "fp32"
    target_sparsity: float = 0.9
    buffer_bytes: int = 65536
    batch_size: int = 32
    passes_per_chunk: int = 1
    threads: int = 0
    description: str = ""
    schema_version: int = SCHEMA_VERSION
    source: str = ""

    def replace(self, **changes: Any) -> "Profile":
        return dataclasses.replace(self, **changes)


def _check(where: str, field: str, value: Any, ok: bool, want: str) -> None:
    if not ok:
        raise ProfileError(f"{where}: field '{field}': {want}, got {value!r}")


def validate(raw: Any, where: str) -> Profile:
    """Turn a parsed YAML mapping into a Profile; one clear error per bad field."""
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: a profile must be a YAML mapping of fields, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(Profile)} - {"source"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ProfileError(f"{where}: unknown field '{unknown[0]}' (known: {', '.join(sorted(known))})")
    v = dict(raw)
    if "name" not in v:
        raise ProfileError(f"{where}: field 'name' is missing")
    _check(where, "name", v["name"], isinstance(v["name"], str) and v["name"] != "", "must be a non-empty string")
    sv = v.get("schema_version", SCHEMA_VERSION)
    _check(where, "schema_version", sv, type(sv) is int and 1 <= sv <= SCHEMA_VERSION,
           f"must be an integer from 1 to {SCHEMA_VERSION}")
    for key in ("device", "fallback"):
        if key in v:
            _check(where, key, v[key], v[key] in DEVICES, f"must be one of {', '.join(DEVICES)}")
    if "precision" in v:
        _check(where, "precision", v["precision"], v["precision"] in PRECISIONS,
               f"must be one of {', '.join(PRECISIONS)}")
    if "target_sparsity" in v:
        s = v["target_sparsity"]
        _check(where, "target_sparsity", s, isinstance(s, (int, float)) and not isinstance(s, bool)
               and 0.0 <= s < 1.0, "must be a number in [0, 1)")
        v["target_sparsity"] = float(s)
    for key, low in (("buffer_bytes", 0), ("batch_size", 1), ("passes_per_chunk", 1), ("threads", 0)):
        if key in v:
            _check(where, key, v[key], type(v[key]) is int and v[key] >= low,
                   f"must be an integer >= {low}")
    if "description" in v:
        _check(where, "description", v["description"], isinstance(v["description"], str), "must be a string")
    return Profile(**v, source=where)


def profile_names() -> list[str]:
    """Names of the profiles shipped with the package."""
    folder = resources.files("esacl_edge") / "device_profiles"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """Resolve a shipped profile name (``cpu``, ``jetson_orin``) or a path to a YAML file."""
    text_path = str(name_or_path)
    path = Path(text_path)
    if text_path.endswith((".yaml", ".yml")) or path.exists():
        if not path.is_file():
            raise ProfileError(f"{path}: profile file not found")
        where, text = str(path), path.read_text(encoding="utf-8")
    else:
        res = resources.files("esacl_edge") / "device_profiles" / f"{text_path}.yaml"
        if not res.is_file():
            raise ProfileError(f"unknown profile {text_path!r}: not a file, and not one of "
                               f"{', '.join(profile_names())}")
        where, text = f"{text_path}.yaml", res.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ProfileError(f"{where}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    return validate(raw, where)
