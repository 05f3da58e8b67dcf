"""Device profiles: YAML files that say what a device has and how it may learn.

A profile is resolved by name (``NAME.yaml`` shipped in the package's ``device_profiles/``)
or by path, validated field by field against :data:`SCHEMA`, and turned into a frozen
:class:`Profile`. Nothing else in the package reads YAML. Budgets are bytes.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml

from ..errors import ProfileError

SCHEMA_VERSION = 1
PRECISIONS = ("fp32", "fp16", "bf16")
DEVICES = ("cpu", "cuda")
PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


@dataclass(frozen=True)
class Profile:
    """A validated device profile (flat; the YAML groups the same fields in sections)."""

    name: str
    description: str = ""
    schema_version: int = SCHEMA_VERSION
    # hardware
    memory_mb: int = 8192
    unified_memory: bool = False
    gpu_compute_capability: str | None = None
    sparse_tensor_cores: bool = False
    # budgets (bytes)
    training_peak_bytes: int = 4 * 2 ** 30
    buffer_bytes: int = 65536
    model_bytes: int | None = None
    # training
    training_supported: bool = True
    device: str = "cpu"
    fallback: str = "cpu"
    precision: str = "fp32"
    target_sparsity: float | None = 0.9
    batch_size: int = 32
    passes_per_chunk: int = 10
    threads: int = 0
    runtime_overhead_bytes: int = 0
    # export
    opset: int = 18
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    source: str = ""

    def replace(self, **changes: Any) -> "Profile":
        return dataclasses.replace(self, **changes)


def _int(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: type(v) is int and v >= low), f"must be an integer >= {low}"


def _optional(check: tuple[Callable[[Any], bool], str]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v is None or check[0](v)), f"{check[1]} or null"


_BOOL = ((lambda v: type(v) is bool), "must be true or false")
_SPARSITY = ((lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < 1.0),
             "must be a number in [0, 1)")
_CC = ((lambda v: isinstance(v, str) and len(v.split(".")) == 2 and all(p.isdigit() for p in v.split("."))),
       "must be a string like \"8.7\"")


def _choice(options: tuple[str, ...]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in options), f"must be one of {', '.join(options)}"


_PROVIDER_LIST = ((lambda v: isinstance(v, list) and v and all(p in PROVIDERS for p in v)),
                  f"must be a non-empty list of {', '.join(PROVIDERS)}")

# YAML section -> {key: (Profile field, (check, what it must be), required)}
SCHEMA: dict[str, dict[str, tuple[str, tuple[Callable[[Any], bool], str], bool]]] = {
    "hardware": {
        "memory_mb": ("memory_mb", _int(1), True),
        "unified_memory": ("unified_memory", _BOOL, True),
        "gpu_compute_capability": ("gpu_compute_capability", _optional(_CC), True),
        "sparse_tensor_cores": ("sparse_tensor_cores", _BOOL, True),
    },
    "budgets": {
        "training_peak_bytes": ("training_peak_bytes", _int(1), True),
        "buffer_bytes": ("buffer_bytes", _int(0), True),
        "model_bytes": ("model_bytes", _optional(_int(1)), False),
    },
    "training": {
        "supported": ("training_supported", _BOOL, False),
        "device": ("device", _choice(DEVICES), True),
        "fallback": ("fallback", _choice(("cpu",)), False),
        "precision": ("precision", _choice(PRECISIONS), False),
        "target_sparsity": ("target_sparsity", _optional(_SPARSITY), False),
        "batch_size": ("batch_size", _int(1), True),
        "passes_per_chunk": ("passes_per_chunk", _int(1), True),
        "threads": ("threads", _int(0), False),
        "runtime_overhead_bytes": ("runtime_overhead_bytes", _int(0), False),
    },
    "export": {
        "opset": ("opset", ((lambda v: type(v) is int and 7 <= v <= 23), "must be an integer from 7 to 23"), False),
        "providers": ("providers", _PROVIDER_LIST, False),
    },
}
_TOP = {"schema_version", "name", "description", "alias_of"}


def validate(raw: Any, where: str) -> Profile:
    """Turn a parsed YAML mapping into a Profile; one clear error naming the first bad field."""
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: a profile must be a YAML mapping, got {type(raw).__name__}")

    def bad(field: str, value: Any, want: str) -> ProfileError:
        return ProfileError(f"{where}: field '{field}': {want}, got {value!r}")

    for key in raw:
        if key not in _TOP and key not in SCHEMA:
            raise ProfileError(f"{where}: unknown field '{key}' (sections: {', '.join(SCHEMA)})")
    sv = raw.get("schema_version")
    if type(sv) is not int or sv < 1:
        raise bad("schema_version", sv, "must be a positive integer")
    if sv > SCHEMA_VERSION:
        raise bad("schema_version", sv, f"is newer than this esacl-edge reads ({SCHEMA_VERSION}); upgrade esacl-edge")
    values: dict[str, Any] = {}
    for key, want in (("name", "must be a non-empty string"), ("description", "must be a string")):
        if key in raw or key == "name":
            v = raw.get(key)
            if not isinstance(v, str) or (key == "name" and not v):
                raise bad(key, v, want)
            values[key] = v
    for section, fields in SCHEMA.items():
        body = raw.get(section)
        if body is None:
            if any(req for _, _, req in fields.values()):
                raise ProfileError(f"{where}: section '{section}' is missing")
            continue
        if not isinstance(body, dict):
            raise bad(section, body, "must be a mapping (section)")
        for key in body:
            if key not in fields:
                raise ProfileError(f"{where}: unknown field '{section}.{key}' (known: {', '.join(fields)})")
        for key, (attr, (check, want), required) in fields.items():
            if key not in body:
                if required:
                    raise ProfileError(f"{where}: field '{section}.{key}' is missing")
                continue
            if not check(body[key]):
                raise bad(f"{section}.{key}", body[key], want)
            values[attr] = tuple(body[key]) if isinstance(body[key], list) else body[key]
    if values.get("target_sparsity") is None and values.get("model_bytes") is None:
        raise ProfileError(f"{where}: field 'training.target_sparsity': set it, or set budgets.model_bytes "
                           "to derive it")
    memory = values["memory_mb"] * 2 ** 20
    for key in ("training_peak_bytes", "buffer_bytes", "model_bytes"):
        if (values.get(key) or 0) > memory:
            raise ProfileError(f"{where}: field 'budgets.{key}' = {values[key]:,} B is more than the device's memory "
                               f"(hardware.memory_mb = {values['memory_mb']:,} MB = {memory:,} B); check the units "
                               "(budgets are bytes, memory_mb megabytes)")
    if "target_sparsity" in values and values["target_sparsity"] is not None:
        values["target_sparsity"] = float(values["target_sparsity"])
    values.setdefault("target_sparsity", None)
    values["schema_version"] = sv
    return Profile(**values, source=where)


def to_yaml(profile: Profile) -> str:
    """The profile as YAML in the shipped layout (sections), loadable with :func:`load_profile`."""
    out: dict[str, Any] = {"schema_version": profile.schema_version, "name": profile.name,
                           "description": profile.description}
    for section, fields in SCHEMA.items():
        out[section] = {key: (list(v) if isinstance(v := getattr(profile, attr), tuple) else v)
                        for key, (attr, _, _) in fields.items()}
    return yaml.safe_dump(out, sort_keys=False)


def _folder():
    return resources.files("esacl_edge") / "device_profiles"


def profile_names() -> list[str]:
    """Names of the profiles shipped with the package."""
    return sorted(p.name[:-5] for p in _folder().iterdir() if p.name.endswith(".yaml"))


def _shipped(text_path: str) -> str | None:
    """The shipped profile a bare name means: ``jetson_orin`` or ``jetson_orin.yaml`` (no folder part)."""
    path = Path(text_path)
    if len(path.parts) != 1:
        return None
    name = path.stem if path.suffix in (".yaml", ".yml") else text_path
    return name if name in profile_names() else None


def load_profile(name_or_path: str | Path) -> Profile:
    """Resolve a profile: a YAML file that exists, else a shipped profile's name (``cpu``, ``jetson_orin``,
    or ``jetson_orin.yaml``). A bare ``NAME.yaml`` that is both a file here and a shipped profile is the
    file, with a warning saying so."""
    text_path = str(name_or_path)
    path = Path(text_path)
    shipped = _shipped(text_path)
    if path.is_file() or (shipped is None and (text_path.endswith((".yaml", ".yml")) or path.exists())):
        if not path.is_file():
            raise ProfileError(f"{path}: profile file not found (shipped profiles: {', '.join(profile_names())})")
        if shipped is not None:
            warnings.warn(f"{path}: using this file, not the shipped profile {shipped!r} of the same name "
                          f"(pass --profile {shipped} for the shipped one)", RuntimeWarning, stacklevel=2)
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ProfileError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                               "save the profile as UTF-8") from None
        except OSError as exc:
            raise ProfileError(f"{path}: cannot read the profile: {exc.strerror}") from None
    else:
        if shipped is None:
            raise ProfileError(f"unknown profile {text_path!r}: not a file, and not one of "
                               f"{', '.join(profile_names())}")
        res = _folder() / f"{shipped}.yaml"
        where, text = str(res), res.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ProfileError(f"{where}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if isinstance(raw, dict) and "alias_of" in raw:
        target = raw["alias_of"]
        if not isinstance(target, str) or target not in profile_names() or set(raw) - _TOP:
            raise ProfileError(f"{where}: field 'alias_of': must name a shipped profile and stand alone, "
                               f"got {target!r}")
        real = load_profile(target)
        return real.replace(name=str(raw.get("name", real.name)),
                            description=str(raw.get("description", real.description)), source=f"{where} -> {real.source}")
    return validate(raw, where)
