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
from crystallm_core.lm.model import CrystaLLMPKV, PKVConfig
from crystallm_core.lm.packed_batch import PackedBatch
from crystallm_core.lm.training import TokenData, TrainConfig, learning_rate, make_optimizer, train, training_step


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


def tiny_model(dropout: float = 0.0) -> CrystaLLMPKV:
    torch.manual_seed(0)
    config = PKVConfig(n_layer=2, n_head=2, n_embd=32, n_hidden_cond=16, n_positions=66, resid_pdrop=dropout,
                       embd_pdrop=dropout, attn_pdrop=dropout, cond_dropout=dropout)
    return CrystaLLMPKV(config)


def conditioned_batch():
    """Four sequences of different lengths, one with an unknown band gap, one with both unknown."""
    rng = np.random.default_rng(3)
    sequences = [rng.integers(0, 370, n) for n in (5, 33, 12, 64)]
    conditions = rng.random((4, 2)).astype(np.float32)
    present = np.array([[True, True], [False, True], [False, False], [True, True]])
    return sequences, conditions, present


def reference_loss(model, sequences, conditions, present):
    ids = torch.full((len(sequences), max(map(len, sequences))), 371)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.from_numpy(seq)
    return model.sequence_loss(ids, torch.from_numpy(conditions), torch.from_numpy(present),
                               torch.tensor([len(s) for s in sequences]))


def test_packed_step_equals_the_padded_reference_in_loss_and_gradients():
    """Fast path (packed, fused SDPA with the prefix as extra keys) vs the padded, masked
    reference, fp32: per-row NLL within 1e-4 relative, every gradient within 1e-4 of its scale."""
    sequences, conditions, present = conditioned_batch()
    model = tiny_model()
    ref_nll, ref_count = reference_loss(model, sequences, conditions, present)
    (ref_nll.sum() / ref_count.sum()).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    nll, count = model.packed_sequence_loss(PackedBatch.from_sequences(sequences, conditions, present))
    (nll.sum() / count.sum()).backward()
    assert torch.equal(count, ref_count)
    assert torch.allclose(nll, ref_nll, rtol=1e-4)
    assert set(ref_grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    assert "conditioning.unknown_embedding" in ref_grads  # the unknown path is exercised
    for name, grad in ref_grads.items():
        fast = dict(model.named_parameters())[name].grad
        assert (fast - grad).abs().max() <= 1e-4 * grad.abs().max() + 1e-7, name


def test_packed_batch_layout():
    batch = PackedBatch.from_sequences([np.array([372, 5, 6]), np.array([372, 9])], np.zeros((2, 2)), np.ones((2, 2), bool))
    assert batch.tokens.tolist() == [372, 5, 6, 372, 9]
    assert batch.targets.tolist() == [5, 6, -100, 9, -100]
    assert batch.positions.tolist() == [0, 1, 2, 0, 1]
    assert batch.padded_index.tolist() == [0, 1, 2, 3, 4] and batch.max_length == 3
    with pytest.raises(ValueError):
        PackedBatch.from_sequences([np.array([], dtype=np.int64)], np.zeros((1, 2)), np.ones((1, 2), bool))


def test_training_step_lowers_the_loss_and_weights_scale_rows():
    sequences, conditions, present = conditioned_batch()
    model = tiny_model()
    cfg = TrainConfig(learning_rate=3e-3, bf16=True)  # bf16 only where the CPU computes it
    optimizer = make_optimizer(model, cfg)
    batch = PackedBatch.from_sequences(sequences, conditions, present)
    first = training_step(model, optimizer, batch, cfg, torch.device("cpu"))
    for _ in range(5):
        last = training_step(model, optimizer, batch, cfg, torch.device("cpu"))
    assert float(last) < float(first)
    zero = training_step(model, optimizer, batch, cfg, torch.device("cpu"), weights=torch.zeros(4))
    assert float(zero) == 0.0


def test_e_hull_balanced_batches_keep_a_third_high_and_every_other_row_once():
    rng = np.random.default_rng(0)
    n = 400
    hull = np.where(rng.random(n) < 0.08, 0.5, 0.01)  # 8 % at or above 0.1 eV/atom, like MP-20 + WBM
    labelled = rng.random(n) < 0.8
    npz = {"tokens": np.zeros(n * 3, np.uint16), "offsets": np.arange(0, 3 * n + 1, 3),
           "conditions": np.stack([np.zeros(n), hull / 5.418], 1).astype(np.float32),
           "present": np.stack([np.ones(n, bool), labelled], 1), "split": np.zeros(n, np.int8)}
    data = TokenData(npz, 0, 371)
    high = data.high_hull()
    batches = data.epoch_batches(16, seed=1, epoch=0, balance_e_hull=True)
    for batch in batches:
        assert len(batch) <= 16
        assert 3 * high[batch].sum() >= labelled[batch].sum()
    others = np.concatenate(batches)[~high[np.concatenate(batches)]]
    assert sorted(others.tolist()) == sorted(np.flatnonzero(~high).tolist())
    plain = np.concatenate(data.epoch_batches(16, seed=1, epoch=0))
    assert sorted(plain.tolist()) == list(range(n))
