"""Sequences stored back to back: the training step's batch, with no padding to compute on.

A `PackedBatch` holds B token sequences of different lengths as one flat tensor (N tokens),
with each token's sequence (`row_of`), its position in it, its next-token target (-100 for
a sequence's last token, which predicts nothing) and where it sits in a (B, max_length)
layout for attention (`padded_index`). Everything is built once on the host from the
lengths, moved to the device in one go, and then the step needs no host synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class PackedBatch:
    tokens: torch.Tensor        # (N,) int64, the sequences back to back
    positions: torch.Tensor     # (N,) position of each token in its sequence (0 = <bos>)
    row_of: torch.Tensor        # (N,) which sequence a token belongs to
    padded_index: torch.Tensor  # (N,) row · max_length + position
    targets: torch.Tensor       # (N,) the next token, -100 after a sequence's last token
    conditions: torch.Tensor    # (B, n_properties) normalised targets
    present: torch.Tensor       # (B, n_properties) bool: False = "unknown"
    rows: int
    max_length: int

    @classmethod
    def from_sequences(cls, sequences: Sequence[np.ndarray], conditions: np.ndarray, present: np.ndarray,
                       device: torch.device | str = "cpu") -> "PackedBatch":
        """Pack `sequences` (token id arrays, each ≥ 1 token) with their condition rows."""
        lengths = np.array([len(seq) for seq in sequences], dtype=np.int64)
        if len(lengths) == 0 or lengths.min() < 1:
            raise ValueError("a packed batch needs at least one sequence, each of at least one token")
        tokens = np.concatenate([np.asarray(seq, dtype=np.int64) for seq in sequences])
        starts = np.cumsum(lengths) - lengths
        row_of = np.repeat(np.arange(len(lengths)), lengths)
        positions = np.arange(len(tokens)) - starts[row_of]
        targets = np.append(tokens[1:], -100)
        targets[starts + lengths - 1] = -100  # a sequence's last token predicts nothing
        max_length = int(lengths.max())
        host = dict(tokens=tokens, positions=positions, row_of=row_of, padded_index=row_of * max_length + positions,
                    targets=targets)
        moved = {name: torch.from_numpy(value).to(device, non_blocking=True) for name, value in host.items()}
        return cls(**moved, conditions=torch.as_tensor(conditions, dtype=torch.float32).to(device),
                   present=torch.as_tensor(present, dtype=torch.bool).to(device),
                   rows=len(lengths), max_length=max_length)

    def with_present(self, present: torch.Tensor) -> "PackedBatch":
        """The same batch with other "unknown" flags (conditioning dropout)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return PackedBatch(**{**values, "present": present})
