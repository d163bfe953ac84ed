"""Versions of Python and the packages a run depends on, for manifests."""
from __future__ import annotations

import platform
from importlib import metadata

VERSIONED_PACKAGES = ("torch", "transformers", "pymatgen", "numpy", "safetensors", "chgnet", "lightgbm", "streamlit")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
