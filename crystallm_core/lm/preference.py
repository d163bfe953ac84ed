"""Direct preference optimisation (DPO, Rafailov et al. 2023) against a frozen reference model.

A pair is two sequences written for the same prompt (the same targets), one the judges
preferred ("chosen") over the other ("rejected"). The loss raises the chosen sequence's
log-likelihood relative to the reference more than the rejected one's:

    -log σ(β [(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))])

so the model moves toward what the judges prefer while the reference term keeps it near where
it started (β sets how near: the implicit KL penalty). As TRL's `DPOTrainer` with the sigmoid
loss; the reference log-likelihoods are computed once per batch without gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from crystallm_core.lm.model import CrystaLLMPKV
from crystallm_core.lm.packed_batch import PackedBatch


@dataclass
class PreferencePair:
    """Two token sequences for one prompt: `chosen` preferred over `rejected`."""

    chosen: np.ndarray
    rejected: np.ndarray
    conditions: np.ndarray  # (n_input_vector,) normalised targets, as `condition_vector` gives
    present: np.ndarray  # (n_input_vector,) bool: which targets are known


def pair_batch(pairs: list[PreferencePair], device: torch.device | str = "cpu") -> PackedBatch:
    """The chosen sequences, then the rejected ones, in one packed batch (rows i and i + n pair)."""
    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    conditions = np.stack([p.conditions for p in pairs] * 2).astype(np.float32)
    present = np.stack([p.present for p in pairs] * 2).astype(bool)
    return PackedBatch.from_sequences(sequences, conditions, present, device)


def sequence_log_likelihood(model: CrystaLLMPKV, batch: PackedBatch) -> torch.Tensor:
    """log π(sequence | targets) per row: minus the summed next-token NLL."""
    nll, _ = model.packed_sequence_loss(batch)
    return -nll


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean DPO loss and the share of pairs the policy already ranks right, from (2n,)
    log-likelihoods laid out as `pair_batch` lays out rows."""
    n = policy.shape[0] // 2
    margin = (policy[:n] - reference[:n]) - (policy[n:] - reference[n:])
    return -F.logsigmoid(beta * margin).mean(), (margin > 0).float().mean()


def preference_step(model: CrystaLLMPKV, reference: CrystaLLMPKV, optimizer: torch.optim.Optimizer,
                    pairs: list[PreferencePair], beta: float, grad_clip: float) -> tuple[float, float]:
    """One optimiser step on a batch of pairs; returns (loss, reward accuracy) before the step."""
    batch = pair_batch(pairs)
    with torch.no_grad():
        reference_ll = sequence_log_likelihood(reference, batch)
    loss, accuracy = dpo_loss(sequence_log_likelihood(model, batch), reference_ll, beta)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    optimizer.step()
    return float(loss), float(accuracy)
