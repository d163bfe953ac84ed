"""Where CrystaLLM Studio finds its inputs and keeps its outputs.

Everything is overridable by environment variable so that tests, CI and users can point
the package at other locations without code changes.
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
ASSETS_DIR = PACKAGE_DIR / "assets"
DEFAULT_MODEL_DIR = ASSETS_DIR / "default_model"
SURROGATE_DIR = ASSETS_DIR / "surrogates"


def data_dir() -> Path:
    """Raw shared data (read-only): $CRYSTALLM_DATA_DIR or ../shared/data next to the checkout."""
    return Path(os.environ.get("CRYSTALLM_DATA_DIR", REPO_DIR.parent / "shared" / "data"))


def cache_dir() -> Path:
    """Derived, git-ignored artefacts (tokenised arrays, graphs): $CRYSTALLM_CACHE_DIR or data/cache."""
    return Path(os.environ.get("CRYSTALLM_CACHE_DIR", REPO_DIR / "data" / "cache"))
