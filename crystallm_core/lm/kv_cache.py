"""The static KV cache that sampling decodes into, and attention over it.

`StaticKVCache` (after gpt-fast) is allocated once per sampling call: one keys and one values
tensor per layer, (rows, heads, capacity, head_dim), and a length per row. Row r holds the
n_prefix ghost tokens of the property encoder first, then its CIF tokens. Writing is a scatter
at (row, position); rewinding a row is lowering its length (nothing is copied or cleared:
attention never looks past a row's length).

`RowQueries` is one group of query tokens for `CrystaLLMPKV.forward_cached`: which packed
tokens they are, and how far into its row each may look.
"""
from __future__ import annotations

import math
import mmap

import torch

from crystallm_core.lm.cache_attention import matmul_attention


def cache_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros for one layer's keys or values. On a CPU (where the OS offers it) the memory is
    advised for 2 MB pages: a decode step streams through the cache of every row, and with 4 kB
    pages address translation slowed that stream (a decode step at 32 rows over 325 cached
    tokens: 12.8-13.1 ms, 11.7-12.2 ms with large pages; 4 alternating runs)."""
    count = math.prod(shape)
    if device.type != "cpu" or count == 0 or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype, device=device)
    buffer = mmap.mmap(-1, count * torch.empty((), dtype=dtype).element_size())  # anonymous: zero-filled
    try:
        buffer.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # large pages switched off: ordinary pages
        pass
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)


class StaticKVCache:
    """Pre-allocated keys and values of `rows` sequences (see the module docstring)."""

    def __init__(self, n_layer: int, rows: int, n_head: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.capacity = capacity  # positions per row, prefix included
        shape = (rows, n_head, capacity, head_dim)
        self.keys = [cache_zeros(shape, dtype, device) for _ in range(n_layer)]
        self.values = [cache_zeros(shape, dtype, device) for _ in range(n_layer)]
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)

    @property
    def rows(self) -> int:
        return self.lengths.shape[0]

    def write_prefix(self, rows: torch.Tensor, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put the property encoder's (k, v) per layer, each (len(rows), H, P, D), at positions 0…P-1."""
        n_prefix = prefix[0][0].shape[2]
        for layer, (k, v) in enumerate(prefix):
            self.keys[layer][rows, :, :n_prefix] = k.to(self.keys[layer].dtype)
            self.values[layer][rows, :, :n_prefix] = v.to(self.values[layer].dtype)
        self.lengths[rows] = n_prefix

    def write(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Token i's key and value (k, v: (N, H, D)) go to row rows[i], position positions[i]."""
        self.keys[layer][rows, :, positions] = k.to(self.keys[layer].dtype)
        self.values[layer][rows, :, positions] = v.to(self.values[layer].dtype)

    def rewind(self, rows: torch.Tensor, lengths: torch.Tensor) -> None:
        """Forget everything after `lengths` positions of the given rows (no copy)."""
        self.lengths[rows] = lengths


SHARED_WIDTH = 8  # rows feeding at most this many tokens attend in one pass over the cache in place


def query_groups(starts: torch.Tensor, counts: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor | None,
                 cache_rows: torch.Tensor) -> list[RowQueries]:
    """How a packed forward's queries attend: row b's tokens are packed at starts[b]…, counts[b]
    of them, after lengths[b] cached positions.

    Reading the cache is what costs (attention is memory-bound here), and every query row of a
    padded pass costs a full read of its row. So: when most rows feed several tokens, all rows
    attend in one pass over the cache in place, padded to the widest (up to SHARED_WIDTH); when
    most feed one, they attend one token each in place and the few others their next tokens
    over copies of just their rows. A longer span (a prefill, a forced block of the CIF) attends
    the rest of its tokens alone: padding other rows to its width multiplied a step's work by
    the span's length (a 100-token forced header made a 32-row step about 2.5× slower, and
    constrained decoding met one in a sixth of its steps).
    """
    clipped = counts.clamp(max=SHARED_WIDTH)
    multi = torch.nonzero(clipped > 1)[:, 0]
    if multi.numel() * 2 > counts.numel():  # most rows feed several tokens: pad them all, in place
        shared = int(clipped.max())
        groups = [RowQueries.padded(starts, clipped, lengths, 0, shared, rows)]
    else:  # most feed one: one token each in place, the few others' next ones over copies of their rows
        shared = 1
        groups = [RowQueries.padded(starts, torch.ones_like(counts), lengths, 0, 1, rows)]
        if multi.numel():
            groups.append(RowQueries.padded(starts[multi], clipped[multi], lengths[multi], 1,
                                            int(clipped[multi].max()), cache_rows[multi]))
            shared = SHARED_WIDTH
    for b in torch.nonzero(counts > shared)[:, 0].tolist():  # a long span: the rest of it alone
        one = slice(b, b + 1)
        groups.append(RowQueries.padded(starts[one], counts[one], lengths[one], shared, int(counts[b]),
                                        cache_rows[one]))
    return groups


class RowQueries:
    """Query tokens laid out (B, T): packed token index[b, t] of cache row rows[b] (None = row b,
    for b < B) sees that row's positions 0…last[b, t]; `real` marks padding (None = none)."""

    def __init__(self, index: torch.Tensor, last: torch.Tensor, rows: torch.Tensor | None,
                 real: torch.Tensor | None = None):
        self.index, self.rows, self.real = index, rows, real
        self.span = int(last.max()) + 1
        positions = torch.arange(self.span, device=last.device)
        hidden = positions[None, None, :] > last[:, :, None]
        self.bias = torch.zeros(hidden.shape, device=last.device).masked_fill(hidden, float("-inf"))[:, None]

    @classmethod
    def padded(cls, starts: torch.Tensor, counts: torch.Tensor, lengths: torch.Tensor, first: int, width: int,
               rows: torch.Tensor | None) -> RowQueries:
        """Tokens first…width-1 of each row (packed from starts[b]), padding where a row has fewer."""
        steps = torch.arange(first, width, device=starts.device)
        real = steps[None, :] < counts[:, None]
        index = torch.where(real, starts[:, None] + steps[None, :], starts[:, None])
        # Padding sees no further than its row's last real token: a row near the end of the cache
        # would otherwise ask for positions past its capacity (a shape error that failed the run).
        seen = torch.minimum(steps[None, :], (counts[:, None] - 1).clamp(min=first))
        return cls(index, lengths[:, None] + seen, rows, None if bool(real.all()) else real)

    def attend(self, cache: StaticKVCache, layer: int, q: torch.Tensor, out: torch.Tensor) -> None:
        """out[token] = attention of q[token] (packed (N, H, D)) over its row's visible cache."""
        # A padded query never needs positions past the cache (its own row's are written there); the
        # cap keeps one odd row from failing the whole batch's shapes.
        span = min(self.span, cache.capacity)
        attended = matmul_attention(q[self.index].transpose(1, 2), cache.keys[layer], cache.values[layer],
                                    self.bias[..., :span], self.rows)  # (B, H, T, D), fp32
        attended = attended.transpose(1, 2).to(out.dtype)
        if self.real is None:
            out[self.index] = attended
        else:
            out[self.index[self.real]] = attended[self.real]
