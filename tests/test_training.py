"""CPU smoke test: a tiny config trains a few steps on prototype CIFs; loss falls; export reloads."""
import json

import numpy as np
import pytest
import torch
from prototypes import all_prototypes

from crystallm_core.chem.cif.cif_format import structure_to_model_cif, training_text
from crystallm_core.lm.checkpoints import load_model
from crystallm_core.lm.conditions import condition_vector
from crystallm_core.lm.tokenizer import get_tokenizer
from crystallm_core.lm.training import TrainConfig, learning_rate, train


def write_token_cache(path, repeats=6):
    tokenizer = get_tokenizer()
    sequences, conditions, present = [], [], []
    for i, structure in enumerate(list(all_prototypes().values()) * repeats):
        sequences.append(tokenizer.encode(training_text(structure_to_model_cif(structure))))
        values, mask = condition_vector(0.5 * (i % 7), None if i % 5 == 0 else 0.01)
        conditions.append(values)
        present.append(mask)
    offsets = np.cumsum([0] + [len(s) for s in sequences])
    split = np.array([1 if i % 6 == 0 else 0 for i in range(len(sequences))], dtype=np.int8)
    np.savez(path, tokens=np.concatenate(sequences).astype(np.uint16), offsets=offsets, conditions=np.array(conditions, np.float32),
             present=np.array(present), split=split, ids=np.array([f"row{i}" for i in range(len(sequences))]))


def test_tiny_training_run_learns_and_exports(tmp_path):
    write_token_cache(tmp_path / "tokens.npz")
    cfg = TrainConfig(data=str(tmp_path / "tokens.npz"), out_dir=str(tmp_path / "run"), n_layer=1, n_head=2, n_embd=32,
                      n_hidden_cond=16, batch_size=8, learning_rate=3e-3, warmup_steps=5, max_steps=40, eval_every=20,
                      eval_rows=64, checkpoint_every=20, log_every=20, bf16=False, device="cpu")
    model_dir = train(cfg, resume=False)
    log = json.loads((model_dir / "training_log.json").read_text())
    assert log[-1]["val_loss"] < log[0]["val_loss"] < 6.0  # uniform over 377 tokens would be 5.93
    loaded = load_model(model_dir, dtype=torch.float32)
    assert loaded.info.name == cfg.name
    stats = json.loads((model_dir / "training_data_stats.json").read_text())
    assert stats["n_band_gap"] > 0 and sum(stats["band_gap_hist"]["counts"]) == stats["n_band_gap"]


def test_resume_continues_where_it_stopped(tmp_path):
    write_token_cache(tmp_path / "tokens.npz", repeats=2)
    base = dict(data=str(tmp_path / "tokens.npz"), n_layer=1, n_head=2, n_embd=32, n_hidden_cond=16, batch_size=4,
                warmup_steps=2, eval_every=100, checkpoint_every=5, log_every=100, bf16=False, device="cpu")
    straight = train(TrainConfig(out_dir=str(tmp_path / "a"), max_steps=10, **base), resume=False)
    assert train(TrainConfig(out_dir=str(tmp_path / "b"), max_steps=10, **base), resume=False, stop_at_step=5) is None
    resumed = train(TrainConfig(out_dir=str(tmp_path / "b"), max_steps=10, **base), resume=True)
    a = load_model(straight, dtype=torch.float32).model.state_dict()
    b = load_model(resumed, dtype=torch.float32).model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize("step, expected", [(0, 1e-4), (9, 1e-3), (1000, 1e-4)])
def test_warmup_then_cosine_to_min(step, expected):
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(step, cfg, max_steps=1000) == pytest.approx(expected)
