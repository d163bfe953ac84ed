"""Shared fixtures: a tiny random PKV model saved in our own format."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/prototypes.py


def tiny_config(**overrides):
    from crystallm_core.lm.model import PKVConfig

    settings = dict(n_layer=2, n_head=2, n_embd=32, n_positions=258, n_hidden_cond=16)
    settings.update(overrides)
    return PKVConfig(**settings)


def decode_two_rows(model, tokens, steps=3):
    """Logits of a prefill (5 tokens) and a few decode steps of two rows, in the model's dtype."""
    dtype = next(model.parameters()).dtype
    cond = torch.tensor([[0.3, 0.1], [0.5, 0.0]], dtype=dtype)
    cache = model.setup_cache(2, 32)
    cache.write_prefix(torch.arange(2), model.conditioning(cond))
    out = [model.forward_cached(tokens[:, :5].reshape(-1), torch.tensor([5, 5]), cache)]
    for step in range(steps):
        out.append(model.forward_cached(tokens[:, 5 + step], torch.tensor([1, 1]), cache))
    return torch.stack(out)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer model in our safetensors format (seeded)."""
    from crystallm_core.lm.checkpoints import save_model
    from crystallm_core.lm.model import CrystaLLMPKV

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_model")
    save_model(CrystaLLMPKV(tiny_config()), out, metadata={"name": "tiny-test-model", "trained_on": "nothing (random)"})
    return out


@pytest.fixture(scope="session")
def short_model_dir(tmp_path_factory) -> Path:
    """The tiny random model with a 64-token context: every sample ends fast, so runs take seconds."""
    from crystallm_core.lm.checkpoints import save_model
    from crystallm_core.lm.model import CrystaLLMPKV

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("short_model")
    save_model(CrystaLLMPKV(tiny_config(n_positions=66)), out, metadata={"name": "tiny-test-model"})
    return out


@pytest.fixture
def app_env(tmp_path, monkeypatch, short_model_dir):
    """The short tiny model as the default model; a fresh history database per test."""
    monkeypatch.setenv("CRYSTALLM_MODEL_DIR", str(short_model_dir))
    monkeypatch.setenv("CRYSTALLM_HISTORY_DB", str(tmp_path / "history.sqlite"))
    monkeypatch.setenv("CRYSTALLM_MODEL_ROOTS", str(tmp_path))  # models may be loaded from this test's folder
    monkeypatch.setenv("CRYSTALLM_FINETUNE_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("CRYSTALLM_DATA_ROOTS", str(tmp_path / "data"))
    return tmp_path
