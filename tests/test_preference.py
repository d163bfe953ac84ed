"""DPO against a frozen reference: the loss, and a step that moves the pair's margin the right way."""
import copy
import math

import numpy as np
import pytest
import torch

from crystallm_core.lm.model import CrystaLLMPKV, PKVConfig
from crystallm_core.lm.preference import PreferencePair, dpo_loss, pair_batch, preference_step, sequence_log_likelihood


def tiny_model() -> CrystaLLMPKV:
    torch.manual_seed(0)
    return CrystaLLMPKV(PKVConfig(n_layer=2, n_head=2, n_embd=32, n_hidden_cond=16, n_positions=66, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, cond_dropout=0.0)).eval()


def pairs() -> list[PreferencePair]:
    rng = np.random.default_rng(1)
    return [PreferencePair(rng.integers(0, 370, 20), rng.integers(0, 370, 31), np.array([0.3, 0.1], np.float32),
                           np.array([True, present])) for present in (True, False)]


def test_loss_is_log2_at_the_reference_and_falls_with_the_margin():
    same = torch.tensor([-10.0, -12.0, -11.0, -9.0])
    loss, accuracy = dpo_loss(same, same, beta=0.1)
    assert float(loss) == pytest.approx(math.log(2)) and float(accuracy) == 0.0
    better = same + torch.tensor([5.0, 5.0, 0.0, 0.0])  # the chosen rows gain likelihood
    loss, accuracy = dpo_loss(better, same, beta=0.1)
    assert float(loss) < math.log(2) and float(accuracy) == 1.0


def test_a_step_raises_chosen_over_rejected_and_leaves_the_reference_alone():
    model = tiny_model()
    reference = copy.deepcopy(model).requires_grad_(False)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = pair_batch(pairs())
    assert batch.rows == 4
    for _ in range(5):
        loss, _ = preference_step(model, reference, optimizer, pairs(), beta=0.1, grad_clip=1.0)
    with torch.no_grad():
        _, accuracy = dpo_loss(sequence_log_likelihood(model, batch), sequence_log_likelihood(reference, batch), 0.1)
    assert float(accuracy) == 1.0 and loss < math.log(2)
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
