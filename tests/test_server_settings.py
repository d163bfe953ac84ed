"""Server settings: roots and limits from the environment or the secrets file; paths kept inside roots."""
from __future__ import annotations

import pytest

from crystallm_core.product.generation import GenerationRequest
from crystallm_core.product.server_settings import (
    allowed_model_source,
    server_settings,
    within_roots,
)

VARIABLES = ["CRYSTALLM_MODEL_ROOTS", "CRYSTALLM_DATA_ROOTS", "CRYSTALLM_FINETUNE_DIR", "CRYSTALLM_MAX_STRUCTURES",
             "CRYSTALLM_MAX_JOBS", "CRYSTALLM_MAX_UPLOAD_MB"]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CRYSTALLM_SECRETS", str(tmp_path / "absent.toml"))
    return monkeypatch


def test_defaults_are_the_shipped_model_and_models_folder(clean_env):
    settings = server_settings()
    assert [p.name for p in settings.model_roots] == ["default_model", "models"]
    assert settings.max_structures == 256 and settings.max_jobs >= 1 and settings.max_upload_mb >= 1


def test_secrets_file_then_environment(clean_env, tmp_path):
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(f'[crystallm]\nmodel_roots = ["{tmp_path}"]\nmax_structures = 32\nmax_jobs = 2\n')
    clean_env.setenv("CRYSTALLM_SECRETS", str(secrets))
    settings = server_settings()
    assert tmp_path.resolve() in settings.model_roots and settings.max_structures == 32 and settings.max_jobs == 2
    clean_env.setenv("CRYSTALLM_MAX_STRUCTURES", "4")
    assert server_settings().max_structures == 4
    with pytest.raises(ValueError, match="number of structures must be between 1 and 4"):
        GenerationRequest(n=5).validate()
    clean_env.setenv("CRYSTALLM_MAX_JOBS", "many")
    with pytest.raises(ValueError, match="max_jobs must be a whole number"):
        server_settings()


def test_paths_stay_inside_roots(tmp_path):
    root = (tmp_path / "models").resolve()
    (root / "mine").mkdir(parents=True)
    (root / "escape").symlink_to(tmp_path)
    assert within_roots(root / "mine", (root,), "models") == root / "mine"
    for outside in [tmp_path, root / ".." / "x", root / "escape", root / "escape" / "models" / "..", "/etc/passwd"]:
        with pytest.raises(ValueError, match="outside the folders this server reads models from"):
            within_roots(outside, (root,), "models")


def test_model_source_roots_and_hub_ids(clean_env, tmp_path):
    clean_env.setenv("CRYSTALLM_MODEL_ROOTS", str(tmp_path))
    assert allowed_model_source(str(tmp_path / "m")) == str((tmp_path / "m").resolve())
    with pytest.raises(ValueError, match="outside"):
        allowed_model_source("/etc")
    assert allowed_model_source("owner/model-name", hub=True) == "owner/model-name"
    with pytest.raises(ValueError, match="not a hub id"):
        allowed_model_source("../../etc", hub=True)
