"""What a run folder keeps beside its snapshots: ``RUN_DIR/profile.yaml``, a copy of the device profile the run
learned with (the default for its export)."""

from __future__ import annotations

from pathlib import Path

from .device.profiles import Profile, load_profile, profile_names, to_yaml
from .files import atomic_write

PROFILE_FILE = "profile.yaml"


def write_run_profile(run_dir: str | Path, profile: Profile) -> None:
    """Keep a copy of the device profile in the run folder."""
    text = to_yaml(profile).encode("utf-8")
    atomic_write(Path(run_dir) / PROFILE_FILE, lambda f: f.write(text))


def run_profile(run_dir: str | Path, meta: dict) -> Profile:
    """The profile a run learned with: its copy in the run, else the shipped profile the snapshot
    names, else ``cpu``."""
    copy = Path(run_dir) / PROFILE_FILE
    if copy.is_file():
        return load_profile(copy)
    return load_profile(meta.get("profile") if meta.get("profile") in profile_names() else "cpu")
