"""Which campaign chunks run, and which of the finished ones are kept.

With `samples_per_target`: every chunk not yet on disk, each kept as it finishes.

With `valid_per_target` (samples_per_target is then the cap): each target's chunks are judged
in chunk order, and the target stops at the first chunk k whose chunks 0…k hold that many
valid samples. Workers may sample later chunks meanwhile; a chunk finished before the ones
ahead of it is held until they are in, and dropped when the target turned out to be done
without it. So the kept chunks are the ones a single worker would have kept, whatever the
number of workers or the order in which chunks finish, and a resumed campaign (whose kept
chunks are on disk) continues exactly. A target stops with up to one chunk of valid samples
more than asked.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

from crystallm_core.product.campaign_spec import CampaignSpec, WorkItem


class ChunkPlan:
    """Hands out work items (`next_item`) and decides what to keep (`finished`)."""

    def __init__(self, spec: CampaignSpec, done: dict[str, int]):
        """done: key → valid samples of every chunk already on disk."""
        self.wanted = spec.valid_per_target
        self.chunks: dict[int, list[WorkItem]] = defaultdict(list)
        for item in spec.work_items():
            self.chunks[item.target.index].append(item)
        self.valid = {key: n for key, n in done.items()}  # judged and kept
        self.held: dict[str, tuple[int, Any]] = {}  # finished, waiting for the chunks ahead of it
        self.dropped: set[str] = set()  # finished after their target was done
        self.dispatched = set(done)
        self.in_flight: dict[int, int] = defaultdict(int)

    def satisfied(self, target: int) -> bool:
        """The target's kept chunks hold the valid samples asked for (never, without valid_per_target)."""
        if self.wanted is None:
            return False
        return sum(self.valid.get(item.key, 0) for item in self.chunks[target]) >= self.wanted

    def next_item(self) -> WorkItem | None:
        """The next chunk to sample: targets still short, the one with the fewest chunks in flight
        first, each target's chunks in order; None when nothing more is needed now."""
        open_targets = [t for t in self.chunks if not self.satisfied(t)]
        for target in sorted(open_targets, key=lambda t: (self.in_flight[t], t)):
            item = next((i for i in self.chunks[target] if i.key not in self.dispatched), None)
            if item is not None:
                self.dispatched.add(item.key)
                self.in_flight[target] += 1
                return item
        return None

    def finished(self, item: WorkItem, n_valid: int, payload: Any) -> list[Any]:
        """A chunk was sampled: the payloads to keep now, in chunk order (this one's, earlier held
        ones', or none)."""
        target = item.target.index
        self.in_flight[target] -= 1
        if self.wanted is None:
            self.valid[item.key] = n_valid
            return [payload]
        self.held[item.key] = (n_valid, payload)
        kept = []
        for chunk in self.chunks[target]:
            if chunk.key in self.valid or chunk.key in self.dropped:
                continue  # judged before
            if chunk.key not in self.held:
                break  # a chunk ahead is not in yet: later ones wait
            n, held = self.held.pop(chunk.key)
            if self.satisfied(target):
                self.dropped.add(chunk.key)  # the target was done without it
                continue
            self.valid[chunk.key] = n
            kept.append(held)
        return kept

    def remaining_samples(self) -> int:
        """Samples still to draw at most (the cap, for targets still short)."""
        return sum(item.n for target, items in self.chunks.items() if not self.satisfied(target)
                   for item in items if item.key not in self.valid)
